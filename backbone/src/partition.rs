//! Splitting a data set across federated clients: IID, Dirichlet(alpha) over labels, label
//! shards, natural (one client per key, e.g. a mailing list) and natural packed onto a fixed
//! number of clients; and the held-out split no client trains on. Deterministic given a seed.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use crate::error::{BackboneError, Result};

/// How to split samples across clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Partitioner {
    /// Shuffle and deal out evenly.
    Iid,
    /// For each class, client proportions drawn from Dirichlet(alpha) (small alpha: skewed).
    Dirichlet { alpha: f64 },
    /// Sort by label, cut into `clients * per_client` shards, give each client `per_client`.
    Shards { per_client: usize },
    /// One client per distinct key (samples without a key form the client `(none)`).
    Natural,
    /// Natural keys packed onto exactly `clients` clients, for a fleet of a given size: every
    /// key (e.g. a mailing list) stays whole on one client; keys go largest first to the client
    /// holding the fewest keyed samples so far (ties: the lower client). Samples without a key
    /// (for SpamAssassin: every spam and the ham that came through no list) are then spread
    /// over all clients by Dirichlet(alpha) over their labels, so clients differ in both topic
    /// and spam share (redrawn, up to 1000 times, while a client would be left without any
    /// sample; then it is an error).
    NaturalPacked { alpha: f64 },
}

/// One client's samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientShard {
    pub name: String,
    pub indices: Vec<usize>,
}

/// The result of partitioning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    pub clients: Vec<ClientShard>,
}

/// Per-client counts for reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientSummary {
    pub client: usize,
    pub name: String,
    pub samples: usize,
    /// Samples per class, indexed by label.
    pub per_class: Vec<usize>,
}

impl Partition {
    pub fn summary(&self, labels: &[u32], num_classes: usize) -> Vec<ClientSummary> {
        self.clients
            .iter()
            .enumerate()
            .map(|(client, c)| {
                let mut per_class = vec![0usize; num_classes];
                for &i in &c.indices {
                    if let Some(n) = per_class.get_mut(labels[i] as usize) {
                        *n += 1;
                    }
                }
                ClientSummary {
                    client,
                    name: c.name.clone(),
                    samples: c.indices.len(),
                    per_class,
                }
            })
            .collect()
    }
}

fn named(parts: Vec<Vec<usize>>) -> Partition {
    Partition {
        clients: parts
            .into_iter()
            .enumerate()
            .map(|(i, indices)| ClientShard {
                name: format!("client-{i:03}"),
                indices,
            })
            .collect(),
    }
}

/// Splits `labels.len()` samples into `clients` parts (ignored for [`Partitioner::Natural`],
/// which needs `keys`).
pub fn partition(
    labels: &[u32],
    keys: Option<&[Option<String>]>,
    clients: usize,
    how: &Partitioner,
    seed: u64,
) -> Result<Partition> {
    let n = labels.len();
    if *how != Partitioner::Natural && (clients == 0 || clients > n) {
        return Err(BackboneError::Partition(format!(
            "cannot split {n} samples across {clients} clients"
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    match how {
        Partitioner::Iid => {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng);
            let mut parts = vec![Vec::new(); clients];
            for (k, i) in idx.into_iter().enumerate() {
                parts[k % clients].push(i);
            }
            Ok(named(parts))
        }
        Partitioner::Dirichlet { alpha } => dirichlet(labels, clients, *alpha, &mut rng),
        Partitioner::Shards { per_client } => {
            let shards = clients * per_client;
            if *per_client == 0 || shards > n {
                return Err(BackboneError::Partition(format!(
                    "{clients} clients x {per_client} shards does not fit {n} samples"
                )));
            }
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng); // ties within a label in random order
            idx.sort_by_key(|&i| labels[i]);
            let mut order: Vec<usize> = (0..shards).collect();
            order.shuffle(&mut rng);
            let mut parts = vec![Vec::new(); clients];
            for (k, s) in order.into_iter().enumerate() {
                let (a, b) = (s * n / shards, (s + 1) * n / shards);
                parts[k / per_client].extend_from_slice(&idx[a..b]);
            }
            Ok(named(parts))
        }
        Partitioner::Natural => {
            let keys = keys.ok_or_else(|| {
                BackboneError::Partition("natural partition needs per-sample keys".into())
            })?;
            if keys.len() != n {
                return Err(BackboneError::Partition(format!(
                    "{} keys for {n} samples",
                    keys.len()
                )));
            }
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, k) in keys.iter().enumerate() {
                groups
                    .entry(k.clone().unwrap_or_else(|| "(none)".into()))
                    .or_default()
                    .push(i);
            }
            Ok(Partition {
                clients: groups
                    .into_iter()
                    .map(|(name, indices)| ClientShard { name, indices })
                    .collect(),
            })
        }
        Partitioner::NaturalPacked { alpha } => {
            natural_packed(labels, keys, clients, *alpha, &mut rng)
        }
    }
}

fn natural_packed(
    labels: &[u32],
    keys: Option<&[Option<String>]>,
    clients: usize,
    alpha: f64,
    rng: &mut StdRng,
) -> Result<Partition> {
    let n = labels.len();
    let keys = keys.ok_or_else(|| {
        BackboneError::Partition("natural partition needs per-sample keys".into())
    })?;
    if keys.len() != n {
        return Err(BackboneError::Partition(format!(
            "{} keys for {n} samples",
            keys.len()
        )));
    }
    let gamma = Gamma::new(alpha, 1.0)
        .map_err(|e| BackboneError::Partition(format!("Dirichlet alpha {alpha}: {e}")))?;
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut unkeyed = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match k {
            Some(k) => groups.entry(k.as_str()).or_default().push(i),
            None => unkeyed.push(i),
        }
    }
    let mut lists: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
    // Largest first; the sort is stable, so equal sizes stay in name order.
    lists.sort_by_key(|(_, idx)| std::cmp::Reverse(idx.len()));
    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); clients];
    let mut names: Vec<Vec<&str>> = vec![Vec::new(); clients];
    for (name, idx) in lists {
        let c = (0..clients)
            .min_by_key(|&c| (parts[c].len(), c))
            .expect("at least one client");
        parts[c].extend_from_slice(&idx);
        names[c].push(name);
    }
    if !unkeyed.is_empty() {
        let classes = unkeyed
            .iter()
            .map(|&i| labels[i] as usize + 1)
            .max()
            .unwrap_or(0);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
        for &i in &unkeyed {
            by_class[labels[i] as usize].push(i);
        }
        // As for Dirichlet: redraw until every client without a list got some samples.
        let mut spread = dirichlet_draw(&by_class, clients, &gamma, rng);
        for _ in 0..1000 {
            if (0..clients).all(|c| !parts[c].is_empty() || !spread[c].is_empty()) {
                break;
            }
            spread = dirichlet_draw(&by_class, clients, &gamma, rng);
        }
        for (c, s) in spread.into_iter().enumerate() {
            parts[c].extend(s);
        }
    }
    let mut out = Vec::with_capacity(clients);
    for (c, (mut indices, names)) in parts.into_iter().zip(names).enumerate() {
        if indices.is_empty() {
            return Err(BackboneError::Partition(format!(
                "client {c} of {clients} got no sample (no key and nothing from 1000 \
                 Dirichlet({alpha}) draws over the {} samples without a key): use fewer clients \
                 or a larger alpha",
                unkeyed.len()
            )));
        }
        indices.sort_unstable();
        let name = if names.is_empty() {
            format!("client-{c:03} (no key)")
        } else {
            format!("client-{c:03} {}", names.join("+"))
        };
        out.push(ClientShard { name, indices });
    }
    Ok(Partition { clients: out })
}

/// A held-out split no client trains on: `fraction` of every (label, key) group, drawn with
/// `seed`. Returns `(train, test)`: `train` in ascending order, `test` in a seeded random order
/// (so its first `m` samples are a random subset of it, stratified in expectation).
pub fn held_out_split(
    labels: &[u32],
    keys: Option<&[Option<String>]>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(BackboneError::Partition(format!(
            "held-out fraction {fraction} is not in (0, 1)"
        )));
    }
    if let Some(k) = keys
        && k.len() != labels.len()
    {
        return Err(BackboneError::Partition(format!(
            "{} keys for {} samples",
            k.len(),
            labels.len()
        )));
    }
    let mut groups: BTreeMap<(u32, Option<&str>), Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        let key = keys.and_then(|k| k[i].as_deref());
        groups.entry((l, key)).or_default().push(i);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (_, mut idx) in groups {
        idx.shuffle(&mut rng);
        let m = (fraction * idx.len() as f64).round() as usize;
        test.extend_from_slice(&idx[..m]);
        train.extend_from_slice(&idx[m..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    test.shuffle(&mut rng);
    Ok((train, test))
}

fn dirichlet(labels: &[u32], clients: usize, alpha: f64, rng: &mut StdRng) -> Result<Partition> {
    let gamma = Gamma::new(alpha, 1.0)
        .map_err(|e| BackboneError::Partition(format!("Dirichlet alpha {alpha}: {e}")))?;
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    // As in the FedAvg/FedPEFT literature: redraw until no client is empty.
    for _ in 0..1000 {
        let parts = dirichlet_draw(&by_class, clients, &gamma, rng);
        if parts.iter().all(|p| !p.is_empty()) {
            return Ok(named(parts));
        }
    }
    Err(BackboneError::Partition(format!(
        "Dirichlet({alpha}) left a client empty in 1000 draws; use fewer clients or a larger alpha"
    )))
}

/// One Dirichlet draw: for each class, client proportions from Gamma(alpha) samples.
fn dirichlet_draw(
    by_class: &[Vec<usize>],
    clients: usize,
    gamma: &Gamma<f64>,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    let mut parts = vec![Vec::new(); clients];
    for idx in by_class {
        let mut idx = idx.clone();
        idx.shuffle(rng);
        let g: Vec<f64> = (0..clients).map(|_| gamma.sample(rng)).collect();
        let total: f64 = g.iter().sum();
        let mut cum = 0.0;
        let mut start = 0;
        for (c, part) in parts.iter_mut().enumerate() {
            cum += g[c];
            let end = if c + 1 == clients || total <= 0.0 {
                if c + 1 == clients { idx.len() } else { start }
            } else {
                ((cum / total) * idx.len() as f64).round() as usize
            };
            let end = end.clamp(start, idx.len());
            part.extend_from_slice(&idx[start..end]);
            start = end;
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, classes: u32) -> Vec<u32> {
        (0..n).map(|i| i as u32 % classes).collect()
    }

    fn covers_every_sample_once(p: &Partition, n: usize) {
        let mut all: Vec<usize> = p.clients.iter().flat_map(|c| c.indices.clone()).collect();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn every_partitioner_assigns_each_sample_exactly_once() {
        let l = labels(1000, 10);
        for how in [
            Partitioner::Iid,
            Partitioner::Dirichlet { alpha: 0.5 },
            Partitioner::Shards { per_client: 2 },
        ] {
            let p = partition(&l, None, 16, &how, 7).unwrap();
            assert_eq!(p.clients.len(), 16, "{how:?}");
            covers_every_sample_once(&p, 1000);
        }
    }

    #[test]
    fn same_seed_same_split_and_different_seed_different_split() {
        let l = labels(600, 10);
        let how = Partitioner::Dirichlet { alpha: 0.3 };
        let a = partition(&l, None, 8, &how, 1).unwrap();
        let b = partition(&l, None, 8, &how, 1).unwrap();
        let c = partition(&l, None, 8, &how, 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn small_alpha_concentrates_classes_more_than_iid() {
        let l = labels(5000, 10);
        let max_share = |p: &Partition| {
            let s = p.summary(&l, 10);
            s.iter()
                .map(|c| *c.per_class.iter().max().unwrap() as f64 / c.samples as f64)
                .sum::<f64>()
                / s.len() as f64
        };
        let iid = partition(&l, None, 10, &Partitioner::Iid, 3).unwrap();
        let skew = partition(&l, None, 10, &Partitioner::Dirichlet { alpha: 0.1 }, 3).unwrap();
        assert!(max_share(&iid) < 0.2, "{}", max_share(&iid));
        assert!(max_share(&skew) > 0.5, "{}", max_share(&skew));
    }

    #[test]
    fn shards_give_each_client_at_most_per_client_labels_when_shards_align() {
        let l = labels(1000, 10); // 100 per class; 20 shards of 50 each hold one label
        let p = partition(&l, None, 10, &Partitioner::Shards { per_client: 2 }, 5).unwrap();
        for s in p.summary(&l, 10) {
            assert_eq!(s.samples, 100);
            assert!(s.per_class.iter().filter(|&&n| n > 0).count() <= 2);
        }
    }

    #[test]
    fn natural_partition_groups_by_key_and_summary_counts_classes() {
        let l = vec![0, 1, 1, 0, 1];
        let keys = vec![
            Some("a".to_string()),
            Some("b".into()),
            Some("a".into()),
            None,
            Some("b".into()),
        ];
        let p = partition(&l, Some(&keys), 0, &Partitioner::Natural, 0).unwrap();
        let names: Vec<_> = p.clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["(none)", "a", "b"]);
        let s = p.summary(&l, 2);
        assert_eq!(s[1].per_class, vec![1, 1]);
        assert_eq!(s[2].per_class, vec![0, 2]);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"per_class\":[0,2]"));
    }

    /// 12 keyed samples in lists a (5), b (3), c (3), d (1), and 40 unkeyed ones of 2 labels.
    fn keyed() -> (Vec<u32>, Vec<Option<String>>) {
        let mut labels = Vec::new();
        let mut keys = Vec::new();
        for (k, n) in [("a", 5), ("b", 3), ("c", 3), ("d", 1)] {
            for _ in 0..n {
                labels.push(0);
                keys.push(Some(k.to_string()));
            }
        }
        for i in 0..40 {
            labels.push(i % 2);
            keys.push(None);
        }
        (labels, keys)
    }

    #[test]
    fn natural_packed_keeps_each_list_whole_and_spreads_the_unkeyed_samples() {
        let (l, keys) = keyed();
        let how = Partitioner::NaturalPacked { alpha: 100.0 };
        let p = partition(&l, Some(&keys), 3, &how, 9).unwrap();
        assert_eq!(p.clients.len(), 3);
        covers_every_sample_once(&p, l.len());
        // Largest first to the least-filled client: a -> 0, b -> 1, c -> 2, d -> 1 (3 < 5).
        let lists: Vec<Vec<&str>> = p
            .clients
            .iter()
            .map(|c| {
                let mut ks: Vec<&str> = c
                    .indices
                    .iter()
                    .filter_map(|&i| keys[i].as_deref())
                    .collect();
                ks.dedup();
                ks
            })
            .collect();
        assert_eq!(lists, [vec!["a"], vec!["b", "d"], vec!["c"]]);
        assert_eq!(p.clients[1].name, "client-001 b+d");
        // With a large alpha every client gets a share of both unkeyed labels.
        for s in p.summary(&l, 2) {
            assert!(s.per_class[1] >= 4, "{s:?}");
        }
        assert_eq!(p, partition(&l, Some(&keys), 3, &how, 9).unwrap());
        assert_ne!(p, partition(&l, Some(&keys), 3, &how, 10).unwrap());
    }

    #[test]
    fn natural_packed_with_more_clients_than_lists_fills_the_rest_from_unkeyed_samples() {
        let (l, keys) = keyed();
        let p = partition(
            &l,
            Some(&keys),
            6,
            &Partitioner::NaturalPacked { alpha: 100.0 },
            1,
        )
        .unwrap();
        covers_every_sample_once(&p, l.len());
        assert_eq!(p.clients[5].name, "client-005 (no key)");
        assert!(p.clients[5].indices.iter().all(|&i| keys[i].is_none()));
        // Without keys, or with no unkeyed samples to fill a list-less client, it is an error.
        assert!(partition(&l, None, 3, &Partitioner::NaturalPacked { alpha: 1.0 }, 1).is_err());
        let only_keyed: Vec<Option<String>> = (0..6).map(|i| Some(format!("k{}", i % 2))).collect();
        let err = partition(
            &[0; 6],
            Some(&only_keyed),
            3,
            &Partitioner::NaturalPacked { alpha: 1.0 },
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("client 2 of 3"), "{err}");
    }

    #[test]
    fn held_out_split_takes_the_fraction_of_every_label_and_key_and_is_seeded() {
        let (l, keys) = keyed();
        let (train, test) = held_out_split(&l, Some(&keys), 0.2, 5).unwrap();
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..l.len()).collect::<Vec<_>>());
        assert!(train.windows(2).all(|w| w[0] < w[1]));
        // a: round(1.0) = 1, b, c: round(0.6) = 1, d: 0; unkeyed: 4 of each label's 20.
        assert_eq!(test.len(), 1 + 1 + 1 + 4 + 4);
        assert_eq!(
            test.iter()
                .filter(|&&i| keys[i].as_deref() == Some("a"))
                .count(),
            1
        );
        assert_eq!(
            (train.clone(), test.clone()),
            held_out_split(&l, Some(&keys), 0.2, 5).unwrap()
        );
        assert_ne!(test, held_out_split(&l, Some(&keys), 0.2, 6).unwrap().1);
        assert!(held_out_split(&l, None, 1.0, 5).is_err());
    }

    #[test]
    fn impossible_requests_are_errors() {
        let l = labels(10, 2);
        assert!(partition(&l, None, 11, &Partitioner::Iid, 0).is_err());
        assert!(partition(&l, None, 5, &Partitioner::Shards { per_client: 3 }, 0).is_err());
        assert!(partition(&l, None, 2, &Partitioner::Natural, 0).is_err());
        assert!(partition(&l, None, 2, &Partitioner::Dirichlet { alpha: -1.0 }, 0).is_err());
    }
}
