//! A trial's emulated links while it runs: per client a relay between the client and the broker
//! (the user-space shaper, or the runner's tap behind a kernel-shaped veth in the client's own
//! network namespace), and at the end what they measured.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use fedpeft_config::report::Report;

use crate::link_report::{self, KernelCounters, LinkReport};
use crate::links::{ClientLink, LinkPlan, Mechanism};
use crate::netns::{Counters, KernelLinks};
use crate::relay::{Relay, RelaySpec};
use crate::shaper::DirectionSpec;
use crate::trial::Trial;

/// The links of a running trial. Fields drop in order: the relays, then the namespaces.
#[derive(Debug)]
pub(super) struct Shaping {
    mechanism: Mechanism,
    relays: Vec<Relay>,
    kernel: Option<KernelLinks>,
    /// Each client's veth counters before its client started (kernel links only).
    counters_before: Vec<Counters>,
}

impl Shaping {
    /// Makes `plan`'s links to the broker at `broker_url` (a namespace and veth per client for
    /// kernel links) and starts a relay per client; `epoch` is the run's start.
    pub(super) fn start(
        trial: &Trial,
        plan: &LinkPlan,
        broker_url: &str,
        epoch: Instant,
    ) -> anyhow::Result<Shaping> {
        let mechanism = plan.mechanism;
        let upstream = broker_addr(broker_url)?;
        let kernel = match mechanism {
            Mechanism::Kernel => Some(KernelLinks::create(&plan.clients)?),
            _ => None,
        };
        let netem = kernel.as_ref().is_some_and(|k| k.netem);
        let mut relays = Vec::with_capacity(plan.clients.len());
        for (index, link) in plan.clients.iter().enumerate() {
            let listen = match &kernel {
                Some(k) => (k.links[index].host_ip, 0).into(),
                None => ([127, 0, 0, 1], 0).into(),
            };
            let spec = RelaySpec {
                listen,
                upstream,
                up: direction(link, mechanism, netem, link.link.up_bytes_per_sec()),
                down: direction(link, mechanism, netem, link.link.down_bytes_per_sec()),
                seed: trial.seed ^ (index as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
            };
            relays.push(Relay::start(spec, epoch)?);
        }
        println!(
            "fleet: links: {} ({}), {}",
            match mechanism {
                Mechanism::Kernel => "kernel: a namespace + veth per client, rate by tbf",
                _ => "userspace: a token-bucket relay per client",
            },
            if mechanism == Mechanism::Kernel && netem {
                "delay/jitter/loss by netem"
            } else {
                "delay/jitter/loss by the relay"
            },
            link_report::profile_summary(&plan.clients)
        );
        let counters_before = match &kernel {
            Some(k) => (0..plan.clients.len()).map(|i| k.counters(i)).collect(),
            None => Vec::new(),
        };
        Ok(Shaping {
            mechanism,
            relays,
            kernel,
            counters_before,
        })
    }

    /// Where client `index` finds the broker: its relay.
    pub(super) fn client_url(&self, index: usize) -> String {
        format!("mqtt://{}", self.relays[index].addr)
    }

    /// The network namespace client `index` runs in (kernel links).
    pub(super) fn netns(&self, index: usize) -> Option<&str> {
        let kernel = self.kernel.as_ref()?;
        Some(kernel.links[index].name.as_str())
    }

    /// What the links measured over the run; the rounds' wall times from the aggregator's
    /// `report`, if it wrote one.
    pub(super) fn measure(
        &self,
        trial: &Trial,
        plan: &LinkPlan,
        report: Option<&Report>,
    ) -> LinkReport {
        let kernel_counters = self.kernel.as_ref().map(|k| {
            (0..plan.clients.len())
                .map(|i| {
                    let now = k.counters(i);
                    KernelCounters::between(self.counters_before[i], now, k.counters_inside(i))
                })
                .collect()
        });
        let stats = self.relays.iter().map(Relay::snapshot).collect();
        let netem = self.kernel.as_ref().is_some_and(|k| k.netem);
        LinkReport::build(
            trial,
            plan,
            self.mechanism,
            netem,
            stats,
            kernel_counters,
            report,
        )
    }

    /// Stops the relays, then removes the namespaces.
    pub(super) fn teardown(self) {
        let Shaping {
            relays, mut kernel, ..
        } = self;
        drop(relays);
        if let Some(k) = &mut kernel {
            k.teardown();
        }
    }
}

/// What the relay applies in one direction of `link` at `rate` bytes/s: the rate itself in
/// user space (the kernel's tbf applies it otherwise), delay, jitter and loss unless netem does.
fn direction(link: &ClientLink, mechanism: Mechanism, netem: bool, rate: f64) -> DirectionSpec {
    let p = &link.link;
    DirectionSpec {
        rate: (mechanism == Mechanism::Userspace).then_some((rate, link.burst_bytes as f64)),
        latency_secs: if netem { 0.0 } else { p.latency_ms / 1000.0 },
        jitter_secs: if netem { 0.0 } else { p.jitter_ms / 1000.0 },
        loss: if netem { 0.0 } else { p.loss_percent / 100.0 },
    }
}

/// The socket address of an `mqtt://host:port` URL.
fn broker_addr(url: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("mqtt://")
        .with_context(|| format!("broker URL {url} is not mqtt://host:port"))?;
    let with_port = if rest.contains(':') {
        rest.to_string()
    } else {
        format!("{rest}:1883")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving broker {url}"))?
        .next()
        .with_context(|| format!("broker {url} resolves to no address"))
}
