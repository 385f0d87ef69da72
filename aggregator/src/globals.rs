//! Every round's global adapter, kept: `globals/round-NNNN.bin` (the envelope exactly as it
//! was published, so a signed one can still be verified) and `globals/index.json`, which says
//! which round each file is, its held-out accuracy and loss, the best and the last round, and
//! the model the adapters fit (what `edge-client predict` and `export` rebuild the tail from).
//! `[output] keep_globals` bounds how many files stay: all, the best and the last, or the last
//! N and the best. `global-adapter.bin` beside the report is always the newest.
//!
//! Written after every publication and evaluation, each file atomically: a run stopped at any
//! point leaves an index that names only files that exist. A resumed run reads the index back.

use std::path::{Path, PathBuf};

use fedpeft_config::aggregator::{KeepGlobals, KeepPolicy};
use fedpeft_config::report::{AdapterModel, GLOBALS_SCHEMA, GlobalEntry, GlobalIndex};

use crate::checkpoint::write_atomic;

/// The folder under the output folder.
pub const GLOBALS_DIR: &str = "globals";
/// The index in [`GLOBALS_DIR`].
pub const INDEX_FILE: &str = "index.json";

/// The kept global adapters of a run.
#[derive(Debug)]
pub struct GlobalStore {
    out: PathBuf,
    keep: KeepGlobals,
    index: GlobalIndex,
}

impl GlobalStore {
    /// The store of the run writing to `out`; the index of an earlier start of the same run
    /// (same fleet and run id) is read back, another run's is replaced.
    pub fn open(
        out: &Path,
        keep: KeepGlobals,
        fleet: &str,
        run_id: u64,
        model: AdapterModel,
    ) -> std::io::Result<GlobalStore> {
        let dir = out.join(GLOBALS_DIR);
        std::fs::create_dir_all(&dir)?;
        let earlier = std::fs::read(dir.join(INDEX_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<GlobalIndex>(&b).ok())
            .filter(|i| i.schema == GLOBALS_SCHEMA && i.fleet == fleet && i.run_id == run_id);
        let index = GlobalIndex {
            schema: GLOBALS_SCHEMA.into(),
            fleet: fleet.into(),
            run_id,
            model,
            keep: keep.to_string(),
            rounds: earlier.map(|i| i.rounds).unwrap_or_default(),
            best: None,
            last: None,
        };
        let mut store = GlobalStore {
            out: out.to_path_buf(),
            keep,
            index,
        };
        store.settle()?;
        Ok(store)
    }

    pub fn index(&self) -> &GlobalIndex {
        &self.index
    }

    /// The global adapter of `round` was published as `envelope`: kept as the round's file and
    /// as `latest` (the run's `global-adapter.bin`).
    pub fn published(&mut self, round: u32, envelope: &[u8], latest: &Path) -> std::io::Result<()> {
        let file = format!("{GLOBALS_DIR}/round-{round:04}.bin");
        write_atomic(&self.out.join(&file), envelope)?;
        write_atomic(latest, envelope)?;
        let bytes = envelope.len() as u64;
        match self.index.rounds.iter_mut().find(|e| e.round == round) {
            // A re-publication (a resumed run): the same round, the same tensors.
            Some(e) => {
                e.file = Some(file);
                e.bytes = bytes;
            }
            None => {
                self.index.rounds.push(GlobalEntry {
                    round,
                    file: Some(file),
                    bytes,
                    eval_accuracy: None,
                    eval_loss: None,
                });
                self.index.rounds.sort_by_key(|e| e.round);
            }
        }
        self.settle()
    }

    /// The held-out evaluation of `round`'s global adapter.
    pub fn evaluated(&mut self, round: u32, accuracy: f64, loss: f64) -> std::io::Result<()> {
        match self.index.rounds.iter_mut().find(|e| e.round == round) {
            Some(e) => {
                e.eval_accuracy = Some(accuracy);
                e.eval_loss = Some(loss);
            }
            None => self.index.rounds.push(GlobalEntry {
                round,
                file: None,
                bytes: 0,
                eval_accuracy: Some(accuracy),
                eval_loss: Some(loss),
            }),
        }
        self.index.rounds.sort_by_key(|e| e.round);
        self.settle()
    }

    /// Marks the best and the last round, removes the files the policy no longer keeps, and
    /// writes the index.
    fn settle(&mut self) -> std::io::Result<()> {
        let with_file = |e: &&GlobalEntry| e.file.is_some();
        self.index.last = self
            .index
            .rounds
            .iter()
            .filter(with_file)
            .map(|e| e.round)
            .max();
        self.index.best = best_round(&self.index.rounds);
        let (best, last) = (self.index.best, self.index.last);
        let newest: Vec<u32> = match self.keep {
            KeepGlobals::Policy(KeepPolicy::All) => Vec::new(),
            KeepGlobals::Policy(KeepPolicy::Best) => last.into_iter().collect(),
            KeepGlobals::Last(n) => {
                let mut rounds: Vec<u32> = self
                    .index
                    .rounds
                    .iter()
                    .filter(with_file)
                    .map(|e| e.round)
                    .collect();
                rounds.sort_unstable_by(|a, b| b.cmp(a));
                rounds.truncate(n as usize);
                rounds
            }
        };
        if self.keep != KeepGlobals::Policy(KeepPolicy::All) {
            for e in &mut self.index.rounds {
                let kept = Some(e.round) == best || newest.contains(&e.round);
                if let (false, Some(file)) = (kept, &e.file) {
                    match std::fs::remove_file(self.out.join(file)) {
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        Err(err) => return Err(err),
                    }
                    e.file = None;
                }
            }
        }
        let json = serde_json::to_vec_pretty(&self.index).map_err(std::io::Error::other)?;
        write_atomic(&self.out.join(GLOBALS_DIR).join(INDEX_FILE), &json)
    }
}

/// The evaluated round with the highest accuracy (the earliest of equals) whose file exists or
/// still may (an evaluation can precede its publication).
fn best_round(rounds: &[GlobalEntry]) -> Option<u32> {
    let mut best: Option<(&GlobalEntry, f64)> = None;
    for e in rounds {
        if let Some(a) = e.eval_accuracy
            && best.is_none_or(|(_, b)| a > b)
        {
            best = Some((e, a));
        }
    }
    best.map(|(e, _)| e.round)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> AdapterModel {
        AdapterModel {
            backbone: None,
            backbone_id: None,
            backbone_sha256: None,
            peft: "head".into(),
            lora_rank: None,
            lora_alpha: None,
            bottleneck: None,
            prompt_tokens: None,
            classes: vec![],
            image_size: None,
            max_seq_len: None,
            tensors: vec![],
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join(GLOBALS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn run(keep: KeepGlobals, accuracies: &[f64]) -> (tempfile::TempDir, GlobalStore) {
        let dir = tempfile::tempdir().unwrap();
        let latest = dir.path().join("global-adapter.bin");
        let mut s = GlobalStore::open(dir.path(), keep, "f", 7, model()).unwrap();
        for (r, &a) in accuracies.iter().enumerate() {
            s.published(r as u32, &[r as u8; 3], &latest).unwrap();
            s.evaluated(r as u32, a, 1.0 - a).unwrap();
        }
        (dir, s)
    }

    #[test]
    fn every_round_is_kept_by_default_with_its_accuracy_and_the_best_and_last_marked() {
        let (dir, s) = run(KeepGlobals::Policy(KeepPolicy::All), &[0.1, 0.5, 0.7, 0.6]);
        assert_eq!(
            files(dir.path()),
            [
                "index.json",
                "round-0000.bin",
                "round-0001.bin",
                "round-0002.bin",
                "round-0003.bin"
            ]
        );
        let i = s.index();
        assert_eq!((i.best, i.last), (Some(2), Some(3)));
        assert_eq!(i.entry(2).unwrap().eval_accuracy, Some(0.7));
        assert_eq!(
            std::fs::read(dir.path().join("global-adapter.bin")).unwrap(),
            [3u8; 3]
        );
        let back: GlobalIndex =
            serde_json::from_slice(&std::fs::read(dir.path().join("globals/index.json")).unwrap())
                .unwrap();
        assert_eq!(&back, i);
    }

    #[test]
    fn best_keeps_the_best_and_the_last_and_forgets_the_others_files() {
        let (dir, s) = run(KeepGlobals::Policy(KeepPolicy::Best), &[0.1, 0.8, 0.7, 0.6]);
        assert_eq!(
            files(dir.path()),
            ["index.json", "round-0001.bin", "round-0003.bin"]
        );
        let i = s.index();
        assert_eq!(i.rounds.len(), 4, "every round's figures stay");
        assert!(i.entry(0).unwrap().file.is_none() && i.entry(2).unwrap().file.is_none());
    }

    #[test]
    fn last_n_keeps_the_newest_n_and_the_best() {
        let (dir, _) = run(KeepGlobals::Last(2), &[0.9, 0.2, 0.3, 0.4, 0.5]);
        assert_eq!(
            files(dir.path()),
            [
                "index.json",
                "round-0000.bin",
                "round-0003.bin",
                "round-0004.bin"
            ]
        );
    }

    #[test]
    fn a_resumed_run_reads_its_index_back_and_another_run_starts_afresh() {
        let (dir, _) = run(KeepGlobals::Policy(KeepPolicy::All), &[0.1, 0.5]);
        let again = GlobalStore::open(
            dir.path(),
            KeepGlobals::Policy(KeepPolicy::All),
            "f",
            7,
            model(),
        )
        .unwrap();
        assert_eq!(again.index().rounds.len(), 2);
        assert_eq!(again.index().best, Some(1));
        let other = GlobalStore::open(
            dir.path(),
            KeepGlobals::Policy(KeepPolicy::All),
            "f",
            8,
            model(),
        )
        .unwrap();
        assert!(other.index().rounds.is_empty());
    }
}
