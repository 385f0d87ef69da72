//! From the trial file as written to a [`Trial`]: one check per table, each naming the field it
//! refuses. Nothing here reads other files (that is [`Trial::preflight`]).

use std::path::{Path, PathBuf};

use fedpeft_config::DatasetKind;
use fedpeft_config::data::{Column, check_classes, idx_labels_beside, text_columns};

use super::file::{BrokerSpec, DataSpec, LocalSpec, ModelSpec, TrialFile};
use super::{Broker, FLUSH_BUDGET_SECS, Trial, TrialError};
use crate::links::{LinkPlan, LinksSpec, Mechanism};

/// A field whose value cannot be used, and why; [`Invalid::in_file`] names the file.
#[derive(Debug)]
pub(super) struct Invalid {
    field: String,
    reason: String,
}

impl Invalid {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(super) fn in_file(self, path: &Path) -> TrialError {
        TrialError::Invalid {
            path: path.to_path_buf(),
            field: self.field,
            reason: self.reason,
        }
    }
}

type Check<T> = Result<T, Invalid>;

/// The trial `raw` describes, checked table by table.
pub(super) fn trial(mut raw: TrialFile, path: &Path) -> Check<Trial> {
    name(&raw.name)?;
    let sizes = sizes(&raw)?;
    data(&mut raw.data, raw.clients)?;
    model(&raw.model)?;
    let broker = broker(&raw.broker)?;
    let links = links(raw.links.as_ref(), raw.clients, raw.broker.max_packet_bytes)?;
    local(&raw.local)?;
    let (stragglers, straggle_secs) = faults(&raw)?;
    let global_dtype = global_dtype(&raw)?;
    Ok(Trial {
        global_dtype,
        signed: raw.signed,
        monitor: raw.monitor.clone(),
        secure_aggregation: raw.secure_aggregation.clone(),
        buffered: raw.buffered.clone(),
        secagg_dropouts: secagg_dropouts(&raw)?,
        run_id: fresh_run_id(),
        dropout: raw.dropout,
        dropout_offline_secs: raw.dropout_offline_secs,
        stragglers,
        straggle_secs,
        shared_cache: raw.shared_cache,
        links,
        path: path.to_path_buf(),
        name: raw.name,
        rounds: raw.rounds,
        clients: raw.clients,
        fraction: raw.fraction,
        min_clients: sizes.min_clients,
        start_clients: sizes.start_clients,
        quorum: sizes.quorum,
        round_timeout_secs: raw.round_timeout_secs,
        seed: raw.seed,
        strategy: raw.strategy,
        model: raw.model,
        data: raw.data,
        local: raw.local,
        broker,
        max_packet_bytes: raw.broker.max_packet_bytes,
        cache_dir: raw
            .cache_dir
            .unwrap_or_else(|| PathBuf::from("data/cache/activations")),
    })
}

fn name(name: &str) -> Check<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || !name.chars().all(allowed) {
        return Err(Invalid::new(
            "name",
            format!("{name:?} must be non-empty [A-Za-z0-9_.-]"),
        ));
    }
    Ok(())
}

/// How many clients a round needs, with the defaults filled in.
struct Sizes {
    min_clients: usize,
    start_clients: usize,
    quorum: usize,
}

/// Rounds, clients, sampling, quorum and the round deadline.
fn sizes(raw: &TrialFile) -> Check<Sizes> {
    let clients = raw.clients;
    if raw.rounds == 0 {
        return Err(Invalid::new("rounds", "must be at least 1"));
    }
    if clients == 0 || clients > 512 {
        return Err(Invalid::new(
            "clients",
            format!("{clients} is not in 1..=512"),
        ));
    }
    if !(raw.fraction > 0.0 && raw.fraction <= 1.0) {
        return Err(Invalid::new(
            "fraction",
            format!("{} is not in (0, 1]", raw.fraction),
        ));
    }
    let min_clients = raw.min_clients.unwrap_or(clients);
    if min_clients == 0 || min_clients > clients {
        return Err(Invalid::new(
            "min_clients",
            format!("{min_clients} is not in 1..={clients} (clients)"),
        ));
    }
    let start_clients = raw.start_clients.unwrap_or(clients);
    if start_clients < min_clients || start_clients > clients {
        return Err(Invalid::new(
            "start_clients",
            format!("{start_clients} is not in {min_clients}..={clients} (min_clients..=clients)"),
        ));
    }
    let sampled = ((raw.fraction * min_clients as f64).ceil() as usize).max(1);
    let quorum = raw.quorum.unwrap_or(sampled);
    if quorum == 0 || quorum > clients {
        return Err(Invalid::new(
            "quorum",
            format!("{quorum} is not in 1..={clients} (clients)"),
        ));
    }
    if !(raw.round_timeout_secs.is_finite() && raw.round_timeout_secs > 0.0) {
        return Err(Invalid::new(
            "round_timeout_secs",
            format!("{} must be a positive number", raw.round_timeout_secs),
        ));
    }
    Ok(Sizes {
        min_clients,
        start_clients,
        quorum,
    })
}

/// Whether a root names each client's own folder or file (`{client}` or `{index}` in it).
pub(super) fn is_pattern(root: &Path) -> bool {
    let s = root.to_string_lossy();
    s.contains("{client}") || s.contains("{index}")
}

/// `[data]`: a data set the fleet knows, where each client's part of it is, a split it can
/// make of it, and (own data) the held-out data and the class list. Fills in the partition.
fn data(data: &mut DataSpec, clients: usize) -> Check<()> {
    let kind = DatasetKind::parse(&data.dataset).ok_or_else(|| {
        Invalid::new(
            "data.dataset",
            format!("{:?} is not {}", data.dataset, DatasetKind::names()),
        )
    })?;
    let per_client = match (&data.root, &data.client_roots) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                "data.client_roots",
                "set either root (split across the clients, or a {client} pattern) or \
                 client_roots (one per client), not both",
            ));
        }
        (None, Some(roots)) if roots.len() != clients => {
            return Err(Invalid::new(
                "data.client_roots",
                format!("lists {} roots for {clients} clients", roots.len()),
            ));
        }
        (None, Some(_)) => true,
        (Some(root), None) => is_pattern(root),
        (None, None) => false,
    };
    if per_client && !kind.is_own() {
        return Err(Invalid::new(
            if data.client_roots.is_some() {
                "data.client_roots"
            } else {
                "data.root"
            },
            format!("a root per client is for the user's own data, not {kind}"),
        ));
    }
    if data.partition.is_empty() {
        data.partition = if per_client { "none" } else { "dirichlet" }.into();
    }
    match data.partition.as_str() {
        "none" if per_client || clients == 1 => {}
        "none" => {
            return Err(Invalid::new(
                "data.partition",
                "\"none\" with one root gives every client the same data: give each client its \
                 own (client_roots, or {client} in root) or split it (iid or dirichlet)",
            ));
        }
        other if per_client => {
            return Err(Invalid::new(
                "data.partition",
                format!(
                    "{other:?}: with a root per client each client trains on all of its own: \
                     use \"none\" (the default)"
                ),
            ));
        }
        "iid" | "dirichlet" => {}
        "natural" if kind == DatasetKind::SpamAssassin => {}
        "natural" => {
            return Err(Invalid::new(
                "data.partition",
                format!(
                    "\"natural\" needs a data set with a natural client key (spam-assassin: \
                     its mailing lists); {:?} has none: use iid, dirichlet or none",
                    data.dataset
                ),
            ));
        }
        other => {
            return Err(Invalid::new(
                "data.partition",
                format!("{other:?} is not iid, dirichlet, natural or none"),
            ));
        }
    }
    if !(data.alpha.is_finite() && data.alpha > 0.0) {
        return Err(Invalid::new(
            "data.alpha",
            format!("{} must be > 0", data.alpha),
        ));
    }
    own_data(data, kind, per_client)
}

/// The keys of the user's own data: present where required, refused where they do not apply.
fn own_data(data: &DataSpec, kind: DatasetKind, per_client: bool) -> Check<()> {
    text_columns(
        kind,
        data.text_column.as_deref(),
        data.label_column.as_deref(),
    )
    .map_err(|(column, why)| match column {
        Column::Text => Invalid::new("data.text_column", why),
        Column::Label => Invalid::new("data.label_column", why),
    })?;
    if kind != DatasetKind::Idx {
        for (field, set) in [
            ("data.labels", data.labels.is_some()),
            ("data.eval_labels", data.eval_labels.is_some()),
        ] {
            if set {
                return Err(Invalid::new(field, "is for dataset = \"idx\""));
            }
        }
    }
    if !kind.is_own() {
        if data.classes.is_some() {
            return Err(Invalid::new(
                "data.classes",
                format!("is for the user's own data; {kind}'s classes are fixed"),
            ));
        }
        return Ok(());
    }
    if data.root.is_none() && data.client_roots.is_none() {
        return Err(Invalid::new(
            "data.root",
            format!(
                "is required with dataset = {kind:?}: the data split across the clients, a \
                 {{client}} pattern, or client_roots",
                kind = kind.name()
            ),
        ));
    }
    let Some(eval_root) = &data.eval_root else {
        return Err(Invalid::new(
            "data.eval_root",
            format!(
                "is required with dataset = {:?}: the held-out data the aggregator evaluates on \
                 (never a client's)",
                kind.name()
            ),
        ));
    };
    match &data.classes {
        Some(list) => check_classes(list).map_err(|why| Invalid::new("data.classes", why))?,
        None if kind == DatasetKind::ImageFolder => {}
        None => {
            return Err(Invalid::new(
                "data.classes",
                format!(
                    "is required with dataset = {:?}: the fleet's class list, in label-id order",
                    kind.name()
                ),
            ));
        }
    }
    if kind == DatasetKind::Idx {
        if per_client && data.labels.is_some() {
            return Err(Invalid::new(
                "data.labels",
                "names one labels file; with a root per client each is found beside its \
                 images file by MNIST's naming (…-images-idx3-… → …-labels-idx1-…)",
            ));
        }
        let images: Vec<&Path> = match (&data.root, &data.client_roots) {
            (_, Some(roots)) => roots.iter().map(PathBuf::as_path).collect(),
            (Some(root), None) if data.labels.is_none() => vec![root.as_path()],
            _ => Vec::new(),
        };
        for (field, path) in images.into_iter().map(|p| ("data.labels", p)).chain(
            (data.eval_labels.is_none()).then_some(("data.eval_labels", eval_root.as_path())),
        ) {
            if idx_labels_beside(path).is_none() {
                return Err(Invalid::new(
                    field,
                    format!(
                        "is required: the name of {} has no `images-idx3` to find its labels \
                         file by",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `[model]`: the method's sizes and the clients' runtime.
fn model(model: &ModelSpec) -> Check<()> {
    if let Some(n) = model.max_seq_len
        && !(2..=512).contains(&n)
    {
        return Err(Invalid::new(
            "model.max_seq_len",
            format!("{n} is not in 2..=512"),
        ));
    }
    for (field, v) in [
        ("model.bottleneck", model.bottleneck),
        ("model.prompt_tokens", model.prompt_tokens),
        ("model.lora_rank", model.lora_rank),
    ] {
        if v == Some(0) {
            return Err(Invalid::new(field, "must be at least 1"));
        }
    }
    if !matches!(model.runtime.as_str(), "auto" | "ort" | "tract") {
        return Err(Invalid::new(
            "model.runtime",
            format!("{:?} is not auto, ort or tract", model.runtime),
        ));
    }
    Ok(())
}

/// `[broker]`: where the clients find it, and a packet size the fleet can chunk to.
fn broker(broker: &BrokerSpec) -> Check<Broker> {
    let found = match (broker.kind.as_str(), &broker.url) {
        ("embedded", None) => Broker::Embedded,
        ("embedded", Some(_)) => {
            return Err(Invalid::new(
                "broker.url",
                "is only for kind = \"external\"",
            ));
        }
        ("external", Some(url)) if url.starts_with("mqtt://") => {
            Broker::External { url: url.clone() }
        }
        ("external", _) => {
            return Err(Invalid::new(
                "broker.url",
                "an external broker needs mqtt://host:port",
            ));
        }
        (other, _) => {
            return Err(Invalid::new(
                "broker.kind",
                format!("{other:?} is not embedded or external"),
            ));
        }
    };
    if broker.max_packet_bytes < 1024 {
        return Err(Invalid::new(
            "broker.max_packet_bytes",
            format!("{} is below 1024", broker.max_packet_bytes),
        ));
    }
    Ok(found)
}

/// `[links]`: one link per client, each fast enough up to flush a whole packet in time. `None`
/// when there is no table or its mechanism is `none`.
fn links(
    spec: Option<&LinksSpec>,
    clients: usize,
    max_packet_bytes: usize,
) -> Check<Option<LinkPlan>> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let plan = spec
        .plan(clients)
        .map_err(|(field, reason)| Invalid::new(field, reason))?;
    // The edge client's MQTT library gives each flush of its socket 5 s (rumqttc's network
    // timeout) and reconnects when it is exceeded: on a slow uplink a whole packet must fit in
    // that, or no update ever gets through.
    for link in &plan.clients {
        let secs = max_packet_bytes as f64 / link.link.up_bytes_per_sec();
        if secs > FLUSH_BUDGET_SECS {
            return Err(Invalid::new(
                "broker.max_packet_bytes",
                format!(
                    "{max_packet_bytes} B take {secs:.1} s on the {} uplink ({} kbit/s), more \
                     than the {FLUSH_BUDGET_SECS} s an edge client's MQTT flush may take (its \
                     5 s network timeout less a margin): use at most {} here",
                    link.profile,
                    link.link.up_kbit,
                    (FLUSH_BUDGET_SECS * link.link.up_bytes_per_sec()) as u64
                ),
            ));
        }
    }
    Ok((plan.mechanism != Mechanism::None).then_some(plan))
}

/// `[local]`: DP-SGD takes both of its settings or neither.
fn local(local: &LocalSpec) -> Check<()> {
    if local.dp_clip_norm.is_some() != local.dp_noise_multiplier.is_some() {
        return Err(Invalid::new(
            "local.dp_clip_norm",
            "DP-SGD needs both dp_clip_norm and dp_noise_multiplier",
        ));
    }
    Ok(())
}

/// Dropout and `[stragglers]`: the straggling clients (picked by the seed) and their delay.
fn faults(raw: &TrialFile) -> Check<(Vec<usize>, f64)> {
    if !(0.0..1.0).contains(&raw.dropout) {
        return Err(Invalid::new(
            "dropout",
            format!(
                "{} is not a probability in [0, 1) (at 1 no update would ever arrive)",
                raw.dropout
            ),
        ));
    }
    let away = raw.dropout_offline_secs;
    if !(away.is_finite() && (0.0..=3600.0).contains(&away)) {
        return Err(Invalid::new(
            "dropout_offline_secs",
            format!("{away} is not in 0..=3600 seconds"),
        ));
    }
    let Some(st) = &raw.stragglers else {
        return Ok((Vec::new(), 0.0));
    };
    if !(st.fraction > 0.0 && st.fraction <= 1.0) {
        return Err(Invalid::new(
            "stragglers.fraction",
            format!("{} is not in (0, 1]", st.fraction),
        ));
    }
    if !(st.delay_secs.is_finite() && st.delay_secs > 0.0 && st.delay_secs <= 86_400.0) {
        return Err(Invalid::new(
            "stragglers.delay_secs",
            format!("{} is not in (0, 86400] seconds", st.delay_secs),
        ));
    }
    Ok((
        pick_stragglers(raw.clients, st.fraction, raw.seed),
        st.delay_secs,
    ))
}

/// The global adapter's encoding: as set, else the clients' update encoding, else f32.
fn global_dtype(raw: &TrialFile) -> Check<String> {
    let dtype = raw
        .global_dtype
        .clone()
        .or_else(|| raw.local.update_dtype.clone())
        .unwrap_or_else(|| "f32".into());
    if !matches!(dtype.as_str(), "f32" | "f16" | "int8") {
        let field = if raw.global_dtype.is_some() {
            "global_dtype"
        } else {
            "local.update_dtype"
        };
        return Err(Invalid::new(
            field,
            format!("{dtype:?} is not f32, f16 or int8"),
        ));
    }
    Ok(dtype)
}

/// [`fedpeft_protocol::keyed_unit`]'s purpose for picking stragglers.
const STRAGGLER_PURPOSE: u64 = 0x51_0e;

/// The straggling clients: the round(fraction x clients) (at least 1) with the smallest keyed
/// draws for this seed, sorted.
pub fn pick_stragglers(clients: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let n = ((fraction * clients as f64).round() as usize).clamp(1, clients);
    let mut order: Vec<(f64, usize)> = (0..clients)
        .map(|i| {
            (
                fedpeft_protocol::keyed_unit(seed, STRAGGLER_PURPOSE, i as u64, 0),
                i,
            )
        })
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut picked: Vec<usize> = order.into_iter().take(n).map(|(_, i)| i).collect();
    picked.sort_unstable();
    picked
}

/// A run id no earlier run used (with overwhelming probability): 63 random bits (so it prints
/// the same in every tool), from the operating system, or from the clock and the process id
/// where the system has no randomness to give.
fn fresh_run_id() -> u64 {
    let mut bytes = [0u8; 8];
    let random = getrandom::fill(&mut bytes).map(|()| u64::from_le_bytes(bytes));
    let id = random.unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        fedpeft_protocol::SplitMix64::new(nanos ^ (u64::from(std::process::id()) << 32)).next_u64()
    });
    (id >> 1).max(1)
}

/// `[secagg_dropouts]`: client indices in range, each at one stage at most, and only with
/// secure aggregation on.
fn secagg_dropouts(raw: &TrialFile) -> Check<super::file::SecAggDropouts> {
    let Some(d) = raw.secagg_dropouts.clone() else {
        return Ok(Default::default());
    };
    let on = match &raw.secure_aggregation {
        None | Some(toml::Value::Boolean(false)) => false,
        Some(toml::Value::Table(t)) => t.get("enabled") != Some(&toml::Value::Boolean(false)),
        Some(_) => true,
    };
    if !on {
        return Err(Invalid::new(
            "secagg_dropouts",
            "emulates dropouts of the secure-aggregation protocol: set secure_aggregation too",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, list) in [
        ("keys", &d.keys),
        ("shares", &d.shares),
        ("masked", &d.masked),
    ] {
        for &i in list {
            if i >= raw.clients {
                return Err(Invalid::new(
                    "secagg_dropouts",
                    format!(
                        "{key}: client {i} does not exist (clients 0..{})",
                        raw.clients
                    ),
                ));
            }
            if !seen.insert(i) {
                return Err(Invalid::new(
                    "secagg_dropouts",
                    format!("client {i} is listed at more than one stage"),
                ));
            }
        }
    }
    Ok(d)
}
