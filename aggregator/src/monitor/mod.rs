//! The live view of a run (`[monitor]`): Prometheus metrics at `/metrics`, a dashboard at `/`,
//! and the state it draws at `/api/state` and, as it changes, `/api/events` (server-sent
//! events).
//!
//! The shell hands the monitor a snapshot ([`Live`]) at most every [`PUBLISH_EVERY_MS`] and at
//! once when a round closes; snapshots travel through a `watch` channel, which holds only the
//! newest. A slow or stalled dashboard therefore costs the aggregator nothing: its connection
//! reads the newest snapshot when it is ready for one, and nothing queues behind it.
//!
//! The dashboard's page and its vendored charting library are public (they carry no data);
//! `/metrics` and `/api/*` need the bearer token when one is configured. The page takes the
//! token from its URL's fragment (`/#token=...`, never sent to the server) and sends it as an
//! `Authorization` header.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedpeft_http::hyper::body::{Frame, Incoming};
use fedpeft_http::hyper::header::{self, HeaderValue};
use fedpeft_http::hyper::{Method, Request, Response, StatusCode};
use fedpeft_http::{Reply, error, json, reply};
use http_body_util::{BodyExt, StreamBody};
use serde::Serialize;
use tokio::sync::watch;

use crate::accounting::Ledger;
use crate::config::{Config, MonitorConfig};
use crate::report::RunInfo;
use crate::round::{MachineState, Phase};

pub mod metrics;

/// Snapshots go out at most this often (and at once when a round closes).
pub const PUBLISH_EVERY_MS: u64 = 250;

const PAGE: &str = include_str!("page.html");
const UPLOT_JS: &str = include_str!("../../assets/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/uplot/uPlot.min.css");

/// The run as the dashboard and the metrics see it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Live {
    pub fleet: String,
    /// As a string: a JavaScript number cannot hold every u64.
    pub run_id: String,
    pub strategy: String,
    pub peft: String,
    pub rounds_planned: u32,
    /// `waiting` (for clients), `collecting` (a round is open), `done`.
    pub phase: &'static str,
    /// The open round, or the next one.
    pub round: u32,
    pub round_started_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub sampled: Vec<String>,
    pub accepted: Vec<String>,
    /// Sampled clients that failed in the open round, with the reason.
    pub failed: BTreeMap<String, String>,
    pub finished: bool,
    pub now_ms: u64,
    pub settings: BTreeMap<String, String>,
    pub rounds: Vec<RoundRow>,
    pub clients: Vec<ClientRow>,
    pub totals: Totals,
}

/// One closed round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundRow {
    pub round: u32,
    pub status: String,
    pub eval_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub clients_ok: usize,
    pub clients_failed: usize,
    /// Bytes up and down in the round.
    pub bytes: u64,
    /// Bytes up and down from the start to the end of the round.
    pub cumulative_bytes: u64,
    pub duration_ms: u64,
    /// A secure round's stage times (keys, shares, masked input, unmasking), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_stage_ms: Option<[u64; 4]>,
}

/// One joined client.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientRow {
    pub id: String,
    pub label: Option<String>,
    pub online: bool,
    pub examples: u64,
    /// When the aggregator last heard from it (any message).
    pub last_seen_ms: Option<u64>,
    pub rounds_sampled: u32,
    pub rounds_trained: u32,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Refused messages that named it.
    pub refused: u64,
}

/// Whole-run counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_messages: u64,
    pub down_messages: u64,
    /// Up and down bytes by message kind.
    pub bytes_by_kind: BTreeMap<String, (u64, u64)>,
    pub full_model_fedavg_bytes: u64,
    pub updates_accepted: u64,
    pub refused: BTreeMap<String, u64>,
    pub clients_joined: usize,
    pub clients_online: usize,
    /// Client-level DP at the aggregator: ε so far.
    pub dp_epsilon: Option<f64>,
    /// Sample-level DP-SGD on the clients: the largest and the median ε stated.
    pub local_dp_epsilon_max: Option<f64>,
    pub local_dp_epsilon_median: Option<f64>,
}

/// The shell's side: builds snapshots and hands them to the server.
#[derive(Debug)]
pub struct Monitor {
    tx: watch::Sender<Arc<Live>>,
    pub addr: SocketAddr,
    labels: BTreeMap<String, String>,
    last_seen: HashMap<String, u64>,
    last_sent_ms: u64,
    settings: BTreeMap<String, String>,
    pub linger: Duration,
    /// Snapshots built, and the time building them took (the monitor's cost to the shell).
    pub snapshots: u64,
    pub snapshot_time: Duration,
}

impl Monitor {
    /// Binds the address and starts serving on the current tokio runtime.
    pub async fn start(cfg: &MonitorConfig, config: &Config) -> anyhow::Result<Monitor> {
        let token = cfg
            .token_file
            .as_deref()
            .map(fedpeft_http::read_token)
            .transpose()?;
        let listener = fedpeft_http::bind(cfg.listen, token.is_some(), "the monitor").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(Arc::new(Live::default()));
        let app = Arc::new(App { rx, token });
        let handler: fedpeft_http::Handler =
            Arc::new(move |req| Box::pin(handle(app.clone(), req)));
        tokio::spawn(fedpeft_http::serve(
            listener,
            handler,
            std::future::pending(),
        ));
        tracing::info!(%addr, "monitor: dashboard at http://{addr}/, Prometheus metrics at /metrics");
        Ok(Monitor {
            tx,
            addr,
            labels: cfg.labels.clone(),
            last_seen: HashMap::new(),
            last_sent_ms: 0,
            settings: settings(config),
            linger: Duration::from_millis(cfg.linger_ms),
            snapshots: 0,
            snapshot_time: Duration::ZERO,
        })
    }

    /// A message from `client` arrived at `now`.
    pub fn seen(&mut self, client: &str, now: u64) {
        if let Some(t) = self.last_seen.get_mut(client) {
            *t = now;
        } else if self.last_seen.len() < 100_000 {
            self.last_seen.insert(client.to_string(), now);
        }
    }

    /// Hands a new snapshot to the server when the last is older than [`PUBLISH_EVERY_MS`],
    /// or `force`.
    pub fn publish(&mut self, view: View<'_>, now: u64, force: bool) {
        if !force && now.saturating_sub(self.last_sent_ms) < PUBLISH_EVERY_MS {
            return;
        }
        self.last_sent_ms = now;
        let began = std::time::Instant::now();
        let live = self.snapshot(view, now);
        self.tx.send_replace(Arc::new(live));
        self.snapshots += 1;
        self.snapshot_time += began.elapsed();
    }

    fn snapshot(&self, v: View<'_>, now: u64) -> Live {
        let report = crate::report::build(v.state, v.ledger, v.info, v.finished);
        let s = v.state;
        let mut live = Live {
            fleet: report.fleet.clone(),
            run_id: report.run_id.to_string(),
            strategy: report.strategy.clone(),
            peft: report.peft.clone(),
            rounds_planned: report.rounds_planned,
            finished: v.finished,
            now_ms: now,
            settings: self.settings.clone(),
            ..Live::default()
        };
        match &s.phase {
            Phase::Waiting { next_round } => {
                live.phase = "waiting";
                live.round = *next_round;
            }
            Phase::Collecting(open) => {
                live.phase = "collecting";
                live.round = open.round;
                live.round_started_ms = Some(open.started_unix_ms);
                live.deadline_ms = Some(open.deadline_unix_ms);
                live.sampled = open.sampled.iter().cloned().collect();
                live.accepted = open.accepted.keys().cloned().collect();
                live.failed = open
                    .failed
                    .iter()
                    .map(|(c, r)| (c.clone(), r.to_string()))
                    .collect();
            }
            Phase::Done => {
                live.phase = "done";
                live.round = report.rounds.last().map_or(0, |r| r.round);
            }
        }
        let mut cumulative = 0;
        let mut sampled: HashMap<&str, u32> = HashMap::new();
        let mut trained: HashMap<&str, u32> = HashMap::new();
        for r in &report.rounds {
            let bytes = r.traffic.up_bytes + r.traffic.down_bytes;
            cumulative += bytes;
            for c in &r.sampled {
                *sampled.entry(c.as_str()).or_default() += 1;
                if !r.failed_clients.contains_key(c) {
                    *trained.entry(c.as_str()).or_default() += 1;
                }
            }
            live.rounds.push(RoundRow {
                round: r.round,
                status: r.status.as_str().to_string(),
                eval_accuracy: r.eval_accuracy,
                eval_loss: r.eval_loss,
                clients_ok: r.clients_ok,
                clients_failed: r.clients_failed,
                bytes,
                cumulative_bytes: cumulative,
                duration_ms: r.duration_ms,
                secure_stage_ms: r.secure.as_ref().map(|x| x.stage_ms),
            });
        }
        for (id, info) in &s.clients {
            let traffic = report.clients.get(id).copied().unwrap_or_default();
            live.clients.push(ClientRow {
                id: id.clone(),
                label: self.labels.get(id).cloned(),
                online: info.online,
                examples: info.num_examples,
                last_seen_ms: self.last_seen.get(id).copied(),
                rounds_sampled: sampled.get(id.as_str()).copied().unwrap_or(0),
                rounds_trained: trained.get(id.as_str()).copied().unwrap_or(0),
                bytes_up: traffic.up_bytes,
                bytes_down: traffic.down_bytes,
                refused: s.rejected_by_client.get(id).copied().unwrap_or(0),
            });
        }
        let t = &report.totals;
        live.totals = Totals {
            up_bytes: t.up_bytes,
            down_bytes: t.down_bytes,
            up_messages: t.up_messages,
            down_messages: t.down_messages,
            bytes_by_kind: v
                .ledger
                .per_kind
                .iter()
                .map(|(k, t)| (k.clone(), (t.up_bytes, t.down_bytes)))
                .collect(),
            full_model_fedavg_bytes: t.full_model_fedavg_bytes,
            updates_accepted: report
                .rounds
                .iter()
                .map(|r| r.clients_ok as u64)
                .sum::<u64>()
                + live.accepted.len() as u64,
            refused: report
                .rejected
                .iter()
                .map(|(r, n)| (r.as_str().to_string(), *n))
                .collect(),
            clients_joined: s.clients.len(),
            clients_online: s.clients.values().filter(|c| c.online).count(),
            dp_epsilon: report.robust.dp_epsilon,
            local_dp_epsilon_max: report.local_dp.as_ref().map(|d| d.max),
            local_dp_epsilon_median: report.local_dp.as_ref().map(|d| d.median),
        };
        live
    }
}

/// What a snapshot is built from.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub state: &'a MachineState,
    pub ledger: &'a Ledger,
    pub info: &'a RunInfo,
    pub finished: bool,
}

/// The run's settings, as the dashboard lists them.
fn settings(c: &Config) -> BTreeMap<String, String> {
    let r = &c.run;
    let mut s = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        s.insert(k.to_string(), v);
    };
    put("rounds", r.rounds.to_string());
    put("fraction", r.fraction.to_string());
    put("min_clients", r.min_clients.to_string());
    put("quorum", r.quorum.to_string());
    put(
        "round_timeout_secs",
        format!("{}", r.round_timeout_ms as f64 / 1000.0),
    );
    put("strategy", format!("{:?}", c.strategy));
    put("peft", format!("{:?}", c.model.peft));
    put("global_dtype", format!("{:?}", r.global_dtype));
    put(
        "backbone",
        c.model
            .backbone
            .as_ref()
            .map_or("none".into(), |b| b.display().to_string()),
    );
    put(
        "dp",
        if c.dp.is_some() {
            "client-level"
        } else {
            "off"
        }
        .into(),
    );
    s
}

struct App {
    rx: watch::Receiver<Arc<Live>>,
    token: Option<String>,
}

/// Requests larger than this are refused: nothing here takes a body.
const MAX_REQUEST_BODY: u64 = 1024;

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let public = matches!(
        path.as_str(),
        "/" | "/index.html" | "/assets/uPlot.iife.min.js" | "/assets/uPlot.min.css"
    );
    let known = public || matches!(path.as_str(), "/metrics" | "/api/state" | "/api/events");
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            format!("no `{path}` here: /, /metrics, /api/state, /api/events"),
        );
    }
    if let Err(r) = fedpeft_http::check_method(&req, &[Method::GET]) {
        return *r;
    }
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_REQUEST_BODY)
    {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the monitor is read-only: requests carry no body",
        );
    }
    if !public && let Err(r) = fedpeft_http::check_token(&req, app.token.as_deref()) {
        return *r;
    }
    let live = app.rx.borrow().clone();
    match path.as_str() {
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/assets/uPlot.iife.min.js" => reply(StatusCode::OK, "text/javascript", UPLOT_JS),
        "/assets/uPlot.min.css" => reply(StatusCode::OK, "text/css", UPLOT_CSS),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(&live),
        ),
        "/api/state" => json(
            StatusCode::OK,
            &serde_json::to_value(&*live).unwrap_or_default(),
        ),
        _ => events(app.rx.clone()),
    }
}

/// `/api/events`: the current snapshot, then each newer one, as server-sent events; a comment
/// every 15 s keeps idle connections open through proxies.
fn events(mut rx: watch::Receiver<Arc<Live>>) -> Reply {
    rx.mark_changed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let frame = tokio::select! {
            changed = rx.changed() => {
                changed.ok()?;
                let live = rx.borrow_and_update().clone();
                let data = serde_json::to_string(&*live).unwrap_or_default();
                format!("event: state\ndata: {data}\n\n")
            }
            _ = tokio::time::sleep(Duration::from_secs(15)) => ": keep-alive\n\n".to_string(),
        };
        Some((
            Ok::<_, Infallible>(Frame::data(fedpeft_http::hyper::body::Bytes::from(frame))),
            rx,
        ))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_library_is_the_one_its_checksums_name() {
        use sha2::{Digest, Sha256};
        let sums = include_str!("../../assets/uplot/SHA256SUMS");
        for (name, body) in [
            ("uPlot.iife.min.js", UPLOT_JS),
            ("uPlot.min.css", UPLOT_CSS),
        ] {
            let want = sums
                .lines()
                .find(|l| l.ends_with(name))
                .and_then(|l| l.split_whitespace().next())
                .unwrap_or_else(|| panic!("{name} not in SHA256SUMS"));
            assert_eq!(hex::encode(Sha256::digest(body.as_bytes())), want, "{name}");
        }
    }
}
