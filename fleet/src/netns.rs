//! Kernel link emulation: per client a network namespace and a veth pair, shaped by `tc`.
//!
//! Client `i` of a run gets namespace `fedpeft-<pid>-<run>-<i>`, a veth pair `fh<tag><i>` (host
//! side, `10.<a>.<i>.1/30`) and `fn<tag><i>` (inside, `10.<a>.<i>.2/30`), where `<tag>` is the
//! runner's pid and a per-process run counter: names are unique among live runs, so parallel
//! trials and tests do not collide. The second octet `a` is reserved per run with an atomic
//! `mkdir` under `/run/fedpeft-links/` (released at teardown; a reservation whose pid is gone is
//! reclaimed), and skipped when any host address already uses `10.<a>.0.0/16`.
//!
//! Shaping: a `tbf` root qdisc on the namespace's end (client -> broker) and one on the host's
//! end (broker -> client). When the kernel has `netem`, delay, jitter and loss go into a netem
//! qdisc above each tbf; when it has not (probed on the first link), the relay applies them in
//! user space and the results say so.
//!
//! [`KernelLinks`] tears everything down when dropped (error, panic unwinding, the runner's
//! Ctrl-C path): deleting a namespace deletes its veth pair; the host ends are deleted too in
//! case a namespace went first. Namespaces of runs whose pid no longer exists are removed when
//! the next run starts.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

use crate::links::ClientLink;

const RESERVATIONS: &str = "/run/fedpeft-links";

static RUNS: AtomicU32 = AtomicU32::new(0);

/// Why kernel shaping cannot be used here, or `None` when it can.
pub fn unavailable() -> Option<String> {
    if effective_uid() != Some(0) {
        return Some("kernel link shaping needs root (network namespaces, veth, tc)".into());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("kernel link shaping needs `{tool}` (iproute2)"));
        }
    }
    None
}

/// The effective uid of this process (from /proc; no libc call).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Runs a command; fails with its stderr.
fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    sh(Command::new("ip").args(args))
}

fn tc(args: &[&str]) -> anyhow::Result<String> {
    sh(Command::new("tc").args(args))
}

/// One client's namespace and veth pair.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

/// Byte counters of a host-side veth: `rx` is what the client sent, `tx` what it was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_packets: u64,
    pub down_packets: u64,
}

/// Every client's namespace; torn down on drop.
#[derive(Debug)]
pub struct KernelLinks {
    pub links: Vec<Netns>,
    /// Whether delay, jitter and loss are applied by netem (else by the relay).
    pub netem: bool,
    reservation: Option<PathBuf>,
}

impl KernelLinks {
    /// Creates one namespace + veth pair per client, shaped to its link. On any error whatever
    /// was created is removed before returning.
    pub fn create(clients: &[ClientLink]) -> anyhow::Result<KernelLinks> {
        if let Some(why) = unavailable() {
            bail!(why);
        }
        if clients.len() > 250 {
            bail!("kernel link shaping supports at most 250 clients per run");
        }
        reap_stale();
        let pid = std::process::id();
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let (octet, reservation) = reserve_subnet()?;
        let mut kl = KernelLinks {
            links: Vec::new(),
            netem: false,
            reservation: Some(reservation),
        };
        let tag = format!("{pid:x}{:x}", run % 16);
        for (i, link) in clients.iter().enumerate() {
            let ns = Netns {
                name: format!("fedpeft-{pid}-{run}-{i}"),
                host_if: format!("fh{tag}{i:02x}"),
                ns_if: format!("fn{tag}{i:02x}"),
                host_ip: Ipv4Addr::new(10, octet, i as u8, 1),
                ns_ip: Ipv4Addr::new(10, octet, i as u8, 2),
            };
            // Registered before it exists, so a half-made link is torn down too.
            kl.links.push(ns.clone());
            ns.create()
                .with_context(|| format!("creating namespace {}", ns.name))?;
            if i == 0 {
                kl.netem = probe_netem(&ns.host_if);
            }
            ns.shape(link, kl.netem)
                .with_context(|| format!("shaping {} ({})", ns.name, link.profile))?;
        }
        Ok(kl)
    }

    /// The kernel's counters of client `i`'s host-side veth.
    pub fn counters(&self, i: usize) -> Counters {
        let read = |what: &str| {
            let path = format!("/sys/class/net/{}/statistics/{what}", self.links[i].host_if);
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        Counters {
            up_bytes: read("rx_bytes"),
            down_bytes: read("tx_bytes"),
            up_packets: read("rx_packets"),
            down_packets: read("tx_packets"),
        }
    }

    /// The same counters read inside the namespace (`ip -s link`), as a cross-check:
    /// (bytes the client's end sent, bytes it received).
    pub fn counters_inside(&self, i: usize) -> Option<(u64, u64)> {
        let ns = &self.links[i];
        let out = ip(&["-n", &ns.name, "-s", "-j", "link", "show", &ns.ns_if]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let stats = &v[0]["stats64"];
        Some((
            stats["tx"]["bytes"].as_u64()?,
            stats["rx"]["bytes"].as_u64()?,
        ))
    }

    /// Removes every namespace, veth and the subnet reservation (idempotent).
    pub fn teardown(&mut self) {
        for ns in self.links.drain(..) {
            ns.destroy();
        }
        if let Some(dir) = self.reservation.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for KernelLinks {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Netns {
    fn create(&self) -> anyhow::Result<()> {
        ip(&["netns", "add", &self.name])?;
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
            "netns",
            &self.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip),
            "dev",
            &self.host_if,
        ])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{}/30", self.ns_ip),
            "dev",
            &self.ns_if,
        ])?;
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"])?;
        ip(&["-n", &self.name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// tbf on both ends (and netem above it when the kernel has it).
    fn shape(&self, link: &ClientLink, netem: bool) -> anyhow::Result<()> {
        let p = &link.link;
        for (ns, dev, kbit) in [
            (Some(self.name.as_str()), self.ns_if.as_str(), p.up_kbit),
            (None, self.host_if.as_str(), p.down_kbit),
        ] {
            let mut base: Vec<String> = Vec::new();
            if let Some(ns) = ns {
                base.extend(["-n".into(), ns.into()]);
            }
            base.extend(["qdisc".into(), "add".into(), "dev".into(), dev.into()]);
            let mut tbf_parent = vec!["root".to_string()];
            if netem {
                let mut args = base.clone();
                args.extend(["root", "handle", "1:", "netem", "delay"].map(String::from));
                args.push(format!("{}ms", p.latency_ms));
                if p.jitter_ms > 0.0 {
                    args.push(format!("{}ms", p.jitter_ms));
                }
                if p.loss_percent > 0.0 {
                    args.extend(["loss".into(), format!("{}%", p.loss_percent)]);
                }
                // netem's own queue must hold what the delay keeps in flight.
                args.extend(["limit".into(), "100000".into()]);
                tc(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
                tbf_parent = vec!["parent".into(), "1:1".into(), "handle".into(), "10:".into()];
            }
            let rate_bps = (kbit * 1000.0).round() as u64;
            // The queue holds at least 256 KiB or 4 s at the rate: enough that TCP is
            // paced by the bucket, not by drops (which would make the time depend on TCP's
            // loss recovery rather than on the configured rate).
            let limit = ((rate_bps / 8) * 4).max(256 * 1024);
            let mut args = base.clone();
            args.extend(tbf_parent);
            args.extend([
                "tbf".into(),
                "rate".into(),
                format!("{rate_bps}bit"),
                "burst".into(),
                link.burst_bytes.to_string(),
                "limit".into(),
                limit.to_string(),
            ]);
            tc(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    fn destroy(&self) {
        let _ = ip(&["netns", "del", &self.name]);
        if Path::new("/sys/class/net").join(&self.host_if).exists() {
            let _ = ip(&["link", "del", &self.host_if]);
        }
    }
}

/// Whether this kernel has the netem qdisc: tried on `dev` and removed again.
fn probe_netem(dev: &str) -> bool {
    let ok = tc(&["qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"]).is_ok();
    if ok {
        let _ = tc(&["qdisc", "del", "dev", dev, "root"]);
    }
    ok
}

/// Reserves a second octet for `10.<a>.0.0/16` (atomic mkdir), skipping octets any host
/// address already uses.
fn reserve_subnet() -> anyhow::Result<(u8, PathBuf)> {
    std::fs::create_dir_all(RESERVATIONS).with_context(|| format!("creating {RESERVATIONS}"))?;
    let used = ip(&["-4", "-o", "addr", "show"]).unwrap_or_default();
    let start = (std::process::id() % 150) as u8;
    for k in 0..150u8 {
        let octet = 100 + (start + k) % 150;
        if used.contains(&format!("inet 10.{octet}.")) {
            continue;
        }
        let dir = Path::new(RESERVATIONS).join(format!("10.{octet}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                std::fs::write(dir.join("pid"), std::process::id().to_string())?;
                return Ok((octet, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner: Option<u32> = std::fs::read_to_string(dir.join("pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                // A stale reservation (its runner is gone) is reclaimed on a later pass.
                if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            Err(e) => return Err(e).with_context(|| format!("reserving {}", dir.display())),
        }
    }
    bail!("no free 10.x.0.0/16 subnet for the client links (10.100-249 are all in use)")
}

/// Deletes `fedpeft-<pid>-…` namespaces whose runner is no longer alive.
pub fn reap_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("fedpeft-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// The namespaces of this process's runs that still exist (for tests: none after a run).
pub fn namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("fedpeft-{pid}-");
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(String::from)
        .collect()
}
