//! Link profiles: how each client's network link is emulated (rate each way, one-way latency,
//! jitter, loss), the presets, and the `[links]` table of a trial file.
//!
//! ```toml
//! [links]
//! mechanism = "auto"        # auto (kernel when root and available, else userspace) | kernel
//!                           # | userspace | none. Default auto once [links] is present.
//! profile = "nb-iot"        # every client on one profile ...
//! # ... or a mix, in client order (shares are rounded; the last entry takes the rest):
//! # assign = [ { profile = "lte-m", share = 0.5 }, { profile = "nb-iot", share = 0.5 } ]
//! # assign = [ { profile = "wifi", clients = 6 }, { profile = "3g", clients = 2 } ]
//! # burst_bytes = 3028      # token-bucket depth (kernel tbf and userspace); default
//!                           # max(2 full Ethernet frames, 2 ms at the profile's rate)
//!
//! [links.profiles.slow-sat] # custom profiles, usable by name like a preset
//! up_kbit = 256.0           # client -> broker, kbit/s (1000 bit/s); required
//! down_kbit = 512.0         # broker -> client, kbit/s; required
//! latency_ms = 300.0        # added one-way delay, each direction (RTT grows by 2x); default 0
//! jitter_ms = 30.0          # uniform +-jitter on that delay (order is kept); default 0
//! loss_percent = 0.5        # segments lost (and resent) each direction; default 0
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

/// One direction's and both directions' link properties. Rates are kbit/s (1 kbit = 1000 bit),
/// latency is one-way, added to each direction.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    pub up_kbit: f64,
    pub down_kbit: f64,
    #[serde(default)]
    pub latency_ms: f64,
    #[serde(default)]
    pub jitter_ms: f64,
    #[serde(default)]
    pub loss_percent: f64,
}

impl LinkProfile {
    /// Bytes per second client -> broker.
    pub fn up_bytes_per_sec(&self) -> f64 {
        self.up_kbit * 1000.0 / 8.0
    }

    /// Bytes per second broker -> client.
    pub fn down_bytes_per_sec(&self) -> f64 {
        self.down_kbit * 1000.0 / 8.0
    }

    /// Why the profile is impossible, naming the field, or `None`.
    pub fn check(&self) -> Option<(&'static str, String)> {
        let rate = |v: f64| v.is_finite() && v > 0.0 && v <= 10_000_000.0;
        if !rate(self.up_kbit) {
            return Some((
                "up_kbit",
                format!("{} is not a rate in (0, 10 000 000] kbit/s", self.up_kbit),
            ));
        }
        if !rate(self.down_kbit) {
            return Some((
                "down_kbit",
                format!("{} is not a rate in (0, 10 000 000] kbit/s", self.down_kbit),
            ));
        }
        let delay = |v: f64| v.is_finite() && (0.0..=60_000.0).contains(&v);
        if !delay(self.latency_ms) {
            return Some((
                "latency_ms",
                format!("{} is not in [0, 60 000] ms", self.latency_ms),
            ));
        }
        if !delay(self.jitter_ms) || self.jitter_ms > self.latency_ms {
            return Some((
                "jitter_ms",
                format!(
                    "{} must be in [0, latency_ms = {}] (a delay cannot go negative)",
                    self.jitter_ms, self.latency_ms
                ),
            ));
        }
        if !(self.loss_percent.is_finite() && (0.0..50.0).contains(&self.loss_percent)) {
            return Some((
                "loss_percent",
                format!("{} is not in [0, 50) %", self.loss_percent),
            ));
        }
        None
    }
}

/// The built-in profiles. Figures are typical of a device in reasonable coverage, not peak
/// rates; each comes from the kind of source named beside it (paraphrased, not quoted).
pub fn preset(name: &str) -> Option<LinkProfile> {
    Some(match name {
        // NB-IoT (3GPP Release 13, Cat-NB1, one 180 kHz carrier). The 3GPP feasibility study and
        // operators' developer guides give peak MAC rates of roughly 60 kbit/s uplink
        // (multi-tone) and 25-30 kbit/s downlink, and field measurements published by
        // operators and in academic NB-IoT studies put round trips at 1.5-2 s in normal coverage
        // (far more in extended coverage). Loss after HARQ/RLC retransmission is small but
        // not zero.
        "nb-iot" => LinkProfile {
            up_kbit: 60.0,
            down_kbit: 30.0,
            latency_ms: 800.0,
            jitter_ms: 200.0,
            loss_percent: 1.0,
        },
        // LTE-M (Cat-M1, 1.4 MHz, half-duplex FDD as most modules are): the GSMA and module
        // vendors' datasheets give ~375 kbit/s uplink and ~300 kbit/s downlink in half-duplex;
        // published latency measurements are 50-200 ms RTT.
        "lte-m" => LinkProfile {
            up_kbit: 375.0,
            down_kbit: 300.0,
            latency_ms: 75.0,
            jitter_ms: 20.0,
            loss_percent: 0.5,
        },
        // 3G (UMTS/HSPA): national regulators' and operators' mobile measurement reports put
        // typical HSPA throughput around 2 Mbit/s down and a few hundred kbit/s up (the R99
        // 384 kbit/s bearer), RTTs around 100-150 ms.
        "3g" => LinkProfile {
            up_kbit: 384.0,
            down_kbit: 2000.0,
            latency_ms: 60.0,
            jitter_ms: 15.0,
            loss_percent: 0.5,
        },
        // Wi-Fi (802.11n/ac, a device a room away from its access point): tens of Mbit/s of TCP
        // goodput each way in vendor and consumer-lab tests, a few ms RTT, rare losses.
        "wifi" => LinkProfile {
            up_kbit: 50_000.0,
            down_kbit: 50_000.0,
            latency_ms: 2.0,
            jitter_ms: 1.0,
            loss_percent: 0.0,
        },
        _ => return None,
    })
}

/// The preset names, in the order the book's "Constrained links" guide lists them.
pub const PRESETS: [&str; 4] = ["nb-iot", "lte-m", "3g", "wifi"];

/// How links are emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// Kernel when running as root with `ip netns`, veth and `tc` available, else userspace.
    Auto,
    /// A network namespace and veth pair per client, shaped by `tc` (tbf; netem when present).
    Kernel,
    /// A token-bucket TCP relay per client in the runner process.
    Userspace,
    /// No emulation: clients talk to the broker on loopback.
    None,
}

impl Mechanism {
    pub fn parse(s: &str) -> Option<Mechanism> {
        Some(match s {
            "auto" => Mechanism::Auto,
            "kernel" => Mechanism::Kernel,
            "userspace" => Mechanism::Userspace,
            "none" => Mechanism::None,
            _ => return None,
        })
    }
}

/// One entry of `links.assign`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assign {
    pub profile: String,
    /// This many clients...
    pub clients: Option<usize>,
    /// ... or this share of them.
    pub share: Option<f64>,
}

/// `[links]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinksSpec {
    #[serde(default = "default_mechanism")]
    pub mechanism: String,
    pub profile: Option<String>,
    pub assign: Option<Vec<Assign>>,
    pub burst_bytes: Option<u64>,
    #[serde(default)]
    pub profiles: BTreeMap<String, LinkProfile>,
}

fn default_mechanism() -> String {
    "auto".into()
}

/// A client's link: its profile's name and figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct ClientLink {
    pub profile: String,
    #[serde(flatten)]
    pub link: LinkProfile,
    /// Token-bucket depth, bytes (each direction).
    pub burst_bytes: u64,
}

/// The validated `[links]`: the mechanism asked for and one link per client.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkPlan {
    pub mechanism: Mechanism,
    pub clients: Vec<ClientLink>,
}

/// Default token-bucket depth: two full Ethernet frames, or 2 ms at the slower rate if more (a
/// deeper bucket would let a whole ~100 KB update through a Wi-Fi link in one burst).
pub fn default_burst(p: &LinkProfile) -> u64 {
    let rate = p.up_bytes_per_sec().min(p.down_bytes_per_sec());
    ((rate * 0.002) as u64).max(2 * 1514)
}

impl LinksSpec {
    /// Validates the table for `clients` clients; errors name the key (`links.…`).
    pub fn plan(&self, clients: usize) -> Result<LinkPlan, (String, String)> {
        let mechanism = Mechanism::parse(&self.mechanism).ok_or_else(|| {
            (
                "links.mechanism".to_string(),
                format!(
                    "{:?} is not auto, kernel, userspace or none",
                    self.mechanism
                ),
            )
        })?;
        for (name, p) in &self.profiles {
            if preset(name).is_some() {
                return Err((
                    format!("links.profiles.{name}"),
                    "is a preset's name; give a custom profile its own name".into(),
                ));
            }
            if let Some((field, why)) = p.check() {
                return Err((format!("links.profiles.{name}.{field}"), why));
            }
        }
        let lookup = |key: String, name: &str| {
            preset(name)
                .or_else(|| self.profiles.get(name).copied())
                .ok_or_else(|| {
                    (
                        key,
                        format!(
                            "{name:?} is neither a preset ({}) nor in [links.profiles]",
                            PRESETS.join(", ")
                        ),
                    )
                })
        };
        if let Some(burst) = self.burst_bytes
            && !(1514..=64 << 20).contains(&burst)
        {
            return Err((
                "links.burst_bytes".into(),
                format!("{burst} is not in 1514..=67108864 (at least one full frame)"),
            ));
        }
        let make = |name: &str, p: LinkProfile| ClientLink {
            profile: name.to_string(),
            link: p,
            burst_bytes: self.burst_bytes.unwrap_or_else(|| default_burst(&p)),
        };
        let links = match (&self.profile, &self.assign) {
            (Some(_), Some(_)) => {
                return Err((
                    "links.assign".into(),
                    "give either `profile` (every client) or `assign`, not both".into(),
                ));
            }
            (None, None) => {
                return Err((
                    "links.profile".into(),
                    "is missing: name a profile for every client, or an `assign` list".into(),
                ));
            }
            (Some(name), None) => {
                let p = lookup("links.profile".into(), name)?;
                vec![make(name, p); clients]
            }
            (None, Some(list)) => {
                if list.is_empty() {
                    return Err(("links.assign".into(), "is empty".into()));
                }
                let mut out = Vec::with_capacity(clients);
                for (i, a) in list.iter().enumerate() {
                    let key = |f: &str| format!("links.assign[{i}].{f}");
                    let p = lookup(key("profile"), &a.profile)?;
                    let left = clients - out.len();
                    let n = match (a.clients, a.share) {
                        (Some(n), None) => n,
                        (None, Some(s)) if s.is_finite() && s > 0.0 && s <= 1.0 => {
                            if i + 1 == list.len() {
                                left
                            } else {
                                (s * clients as f64).round() as usize
                            }
                        }
                        (None, Some(s)) => {
                            return Err((key("share"), format!("{s} is not in (0, 1]")));
                        }
                        _ => {
                            return Err((
                                key("clients"),
                                "give exactly one of `clients` or `share`".into(),
                            ));
                        }
                    };
                    if n > left {
                        return Err((
                            key("clients"),
                            format!("{n} more clients, but only {left} of {clients} are left"),
                        ));
                    }
                    out.extend(std::iter::repeat_n(make(&a.profile, p), n));
                }
                if out.len() != clients {
                    return Err((
                        "links.assign".into(),
                        format!("covers {} clients, the trial has {clients}", out.len()),
                    ));
                }
                out
            }
        };
        Ok(LinkPlan {
            mechanism,
            clients: links,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> LinksSpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn every_preset_is_a_valid_profile() {
        for name in PRESETS {
            let p = preset(name).unwrap();
            assert_eq!(p.check(), None, "{name}");
        }
        assert!(preset("5g-mmwave").is_none());
    }

    #[test]
    fn a_half_and_half_mix_splits_in_client_order() {
        let plan = spec(
            r#"assign = [{ profile = "lte-m", share = 0.5 }, { profile = "nb-iot", share = 0.5 }]"#,
        )
        .plan(5)
        .unwrap();
        let names: Vec<_> = plan.clients.iter().map(|c| c.profile.as_str()).collect();
        // round(2.5) = 3 on lte-m; the last entry takes the rest.
        assert_eq!(names, ["lte-m", "lte-m", "lte-m", "nb-iot", "nb-iot"]);
        assert_eq!(plan.mechanism, Mechanism::Auto);
    }

    #[test]
    fn custom_profiles_are_used_by_name_and_checked() {
        let plan = spec(
            "profile = \"slow\"\nmechanism = \"userspace\"\n[profiles.slow]\nup_kbit = 100.0\ndown_kbit = 200.0\n",
        )
        .plan(2)
        .unwrap();
        assert_eq!(plan.clients[1].link.up_kbit, 100.0);
        assert_eq!(plan.clients[1].burst_bytes, 3028);
        let err = spec("profile = \"slow\"\n[profiles.slow]\nup_kbit = -5.0\ndown_kbit = 200.0\n")
            .plan(2)
            .unwrap_err();
        assert_eq!(err.0, "links.profiles.slow.up_kbit");
    }

    #[test]
    fn wrong_tables_name_their_key() {
        for (text, key) in [
            ("profile = \"5g\"", "links.profile"),
            (
                "mechanism = \"magic\"\nprofile = \"wifi\"",
                "links.mechanism",
            ),
            ("", "links.profile"),
            (
                "assign = [{ profile = \"wifi\", clients = 9 }]",
                "links.assign[0].clients",
            ),
            (
                "assign = [{ profile = \"wifi\", clients = 1 }]",
                "links.assign",
            ),
            (
                "assign = [{ profile = \"wifi\", share = -1.0 }]",
                "links.assign[0].share",
            ),
            (
                "assign = [{ profile = \"dsl\", share = 1.0 }]",
                "links.assign[0].profile",
            ),
            ("profile = \"wifi\"\nburst_bytes = 10", "links.burst_bytes"),
            (
                "profile = \"wifi\"\n[profiles.wifi]\nup_kbit = 1.0\ndown_kbit = 1.0",
                "links.profiles.wifi",
            ),
            (
                "profile = \"x\"\n[profiles.x]\nup_kbit = 1.0\ndown_kbit = 1.0\njitter_ms = 5.0",
                "links.profiles.x.jitter_ms",
            ),
            (
                "profile = \"x\"\n[profiles.x]\nup_kbit = 1.0\ndown_kbit = 1.0\nloss_percent = 70.0",
                "links.profiles.x.loss_percent",
            ),
        ] {
            let err = spec(text).plan(4).unwrap_err();
            assert_eq!(err.0, key, "{text}: {err:?}");
        }
    }
}
