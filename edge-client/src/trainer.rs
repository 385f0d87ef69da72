//! Local training behind a small trait, and its real implementation on a PEFT tail over
//! cached trunk activations.
//!
//! The trunk is frozen, so its activations for the client's data are computed once (see the
//! backbone crate's cache) and every epoch of every round runs only the tail: that is what
//! [`TailTrainer`] holds — the tail, the activations and the labels.

use std::sync::Arc;
use std::time::Instant;

use fedpeft_peft::{AdamW, Batch, DpSgd, DpSgdConfig, FedProx, NamedTensor, Optimizer, Sgd, Tail};
use ndarray::{ArrayD, Axis};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::types::{GlobalAdapter, Metrics, OptimizerPlan, TrainPlan, TrainedUpdate};

/// The δ at which a DP client reports ε.
pub const DP_DELTA: f64 = 1e-5;

/// Why local training or evaluation failed. Each names the tensor, field or step involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("the global adapter does not fit this tail: {0}")]
    Adapter(#[source] fedpeft_peft::PeftError),
    #[error("training step failed: {0}")]
    Step(#[source] fedpeft_peft::PeftError),
    #[error("invalid round plan: {field}: {reason}")]
    Plan { field: &'static str, reason: String },
    #[error("no local examples to {what}")]
    NoData { what: &'static str },
    #[error("local data: {0}")]
    Data(String),
    #[error("delta of tensor `{name}` has a non-finite value at {position}")]
    NonFiniteDelta { name: String, position: usize },
}

/// A client's cached trunk activations, `[N, ...]`: in memory, or the backbone crate's
/// activation cache (which may keep them in a spill file and read rows on demand).
#[derive(Debug, Clone)]
pub enum Activations {
    Memory(ArrayD<f32>),
    Cached(Arc<fedpeft_backbone::Features>),
}

impl Activations {
    pub fn len(&self) -> usize {
        match self {
            Activations::Memory(a) => a.shape().first().copied().unwrap_or(0),
            Activations::Cached(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows at `idx`, as one batch.
    pub fn rows(&self, idx: &[usize]) -> Result<ArrayD<f32>, TrainError> {
        match self {
            Activations::Memory(a) => {
                if let Some(&bad) = idx.iter().find(|&&i| i >= self.len()) {
                    return Err(TrainError::Data(format!(
                        "row {bad} outside the {} cached activations",
                        self.len()
                    )));
                }
                Ok(a.select(Axis(0), idx))
            }
            Activations::Cached(f) => f.rows(idx).map_err(|e| TrainError::Data(e.to_string())),
        }
    }
}

impl From<ArrayD<f32>> for Activations {
    fn from(a: ArrayD<f32>) -> Self {
        Activations::Memory(a)
    }
}

impl From<Arc<fedpeft_backbone::Features>> for Activations {
    fn from(f: Arc<fedpeft_backbone::Features>) -> Self {
        Activations::Cached(f)
    }
}

/// What the session needs from local training.
pub trait LocalTrainer: Send {
    /// Local training examples (the FedAvg weight).
    fn num_examples(&self) -> u64;
    /// Trains from `global` following `plan`; returns `local - global` for every trainable
    /// tensor, in the adapter's order, and the training metrics.
    fn train(
        &mut self,
        global: &GlobalAdapter,
        plan: &TrainPlan,
    ) -> Result<TrainedUpdate, TrainError>;
    /// Loss and accuracy of `adapter` on the client's evaluation data.
    fn evaluate(&mut self, adapter: &GlobalAdapter) -> Result<Metrics, TrainError>;
}

/// A PEFT tail trained on cached trunk activations.
#[derive(Debug)]
pub struct TailTrainer {
    tail: Box<dyn Tail>,
    features: Activations,
    /// `[N, S]` attention masks of a text tail's activations (`None` for images).
    masks: Option<Activations>,
    labels: Vec<usize>,
    eval: Option<(Activations, Vec<usize>)>,
    /// Mixed into every round's seed so clients with the same round seed shuffle differently.
    client_seed: u64,
    /// DP-SGD state lives across rounds: the accountant adds up every step ever taken.
    dp: Option<DpSgd>,
    /// The tail's frozen prefix of every training row, computed at the first round.
    frozen: Frozen,
    /// Largest frozen prefix kept, bytes.
    frozen_budget: usize,
}

/// The training rows' frozen prefix ([`Tail::frozen_prefix`]): the part of the tail's forward
/// pass no trained tensor affects, the same every step and every round.
#[derive(Debug)]
enum Frozen {
    /// Not computed yet.
    Pending,
    /// The method has none, or it would not fit the budget: every step computes it.
    Off,
    Rows(ArrayD<f32>),
}

impl Frozen {
    /// The kept rows, if any.
    fn rows(&self) -> Option<&ArrayD<f32>> {
        match self {
            Frozen::Rows(r) => Some(r),
            Frozen::Pending | Frozen::Off => None,
        }
    }
}

/// Default [`TailTrainer::with_frozen_budget`]: 128 MiB.
pub const DEFAULT_FROZEN_BUDGET: usize = 128 << 20;

impl TailTrainer {
    /// `features` is `[N, ...]` trunk activations, `labels` their N classes.
    pub fn new(
        tail: Box<dyn Tail>,
        features: impl Into<Activations>,
        labels: Vec<usize>,
        client_seed: u64,
    ) -> Result<TailTrainer, TrainError> {
        let features = features.into();
        let n = features.len();
        if n != labels.len() {
            return Err(TrainError::Data(format!(
                "{n} activation rows but {} labels",
                labels.len()
            )));
        }
        let classes = tail.num_classes();
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l >= classes) {
            return Err(TrainError::Data(format!(
                "label {l} of example {i} is out of range for {classes} classes"
            )));
        }
        Ok(TailTrainer {
            tail,
            features,
            masks: None,
            labels,
            eval: None,
            client_seed,
            dp: None,
            frozen: Frozen::Pending,
            frozen_budget: DEFAULT_FROZEN_BUDGET,
        })
    }

    /// Keeps the tail's frozen prefix of the training rows (pooled features when only the head
    /// trains, the conv head's frozen product for bias and LoRA) if it takes at most `bytes`,
    /// so that every step after the first round skips that part of the forward pass; 0 turns
    /// it off.
    pub fn with_frozen_budget(mut self, bytes: usize) -> Self {
        self.frozen_budget = bytes;
        self
    }

    /// Computes the frozen prefix of every training row once, if the method has one and it
    /// fits the budget.
    fn prepare_frozen(&mut self) -> Result<(), TrainError> {
        if !matches!(self.frozen, Frozen::Pending) {
            return Ok(());
        }
        self.frozen = Frozen::Off;
        let n = self.labels.len();
        if self.frozen_budget == 0 || n == 0 {
            return Ok(());
        }
        let start = Instant::now();
        let all: Vec<usize> = (0..n).collect();
        let mut rows: Option<ArrayD<f32>> = None;
        let mut at = 0;
        for idx in all.chunks(256) {
            let b = Self::batch_of(&self.features, self.masks.as_ref(), None, idx)?;
            let Some(part) = self.tail.frozen_prefix(&b).map_err(TrainError::Step)? else {
                return Ok(());
            };
            let out = match &mut rows {
                Some(r) => r,
                None => {
                    let mut shape = part.shape().to_vec();
                    shape[0] = n;
                    let bytes = shape.iter().product::<usize>() * std::mem::size_of::<f32>();
                    if bytes > self.frozen_budget {
                        tracing::info!(
                            bytes,
                            budget = self.frozen_budget,
                            "frozen prefix over budget; computed every step"
                        );
                        return Ok(());
                    }
                    rows.insert(ArrayD::zeros(shape))
                }
            };
            out.slice_axis_mut(Axis(0), (at..at + idx.len()).into())
                .assign(&part);
            at += idx.len();
        }
        let rows = rows.expect("at least one row");
        tracing::info!(
            shape = ?rows.shape(),
            bytes = rows.len() * std::mem::size_of::<f32>(),
            ms = start.elapsed().as_millis() as u64,
            "frozen prefix kept"
        );
        self.frozen = Frozen::Rows(rows);
        Ok(())
    }

    /// Attention masks `[N, S]` of the activations (1 for real tokens, 0 for padding), for a
    /// transformer tail; also used when evaluating on the training data.
    pub fn with_masks(mut self, masks: impl Into<Activations>) -> Result<Self, TrainError> {
        let masks = masks.into();
        if masks.len() != self.features.len() {
            return Err(TrainError::Data(format!(
                "{} attention masks for {} activation rows",
                masks.len(),
                self.features.len()
            )));
        }
        self.masks = Some(masks);
        Ok(self)
    }

    /// Evaluates on this held-out set instead of the training data.
    pub fn with_eval_set(mut self, features: impl Into<Activations>, labels: Vec<usize>) -> Self {
        self.eval = Some((features.into(), labels));
        self
    }

    /// The tail's current trainable tensors (the round-0 adapter when nothing was set).
    pub fn trainable(&self) -> Vec<NamedTensor> {
        self.tail.trainable()
    }

    pub fn tail(&self) -> &dyn Tail {
        self.tail.as_ref()
    }

    fn load(&mut self, adapter: &GlobalAdapter) -> Result<(), TrainError> {
        self.tail
            .set_trainable(&adapter.tensors)
            .map_err(TrainError::Adapter)
    }

    fn optimizer(
        plan: &TrainPlan,
        global: &[NamedTensor],
    ) -> Result<Box<dyn Optimizer>, TrainError> {
        let lr = plan.learning_rate;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(TrainError::Plan {
                field: "learning_rate",
                reason: format!("{lr} must be finite and > 0"),
            });
        }
        let base: Box<dyn Optimizer> = match plan.optimizer {
            OptimizerPlan::Sgd {
                momentum,
                weight_decay,
            } => Box::new(Sgd::with(lr, momentum, weight_decay)),
            OptimizerPlan::AdamW {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => {
                let mut adam = AdamW::new(lr);
                adam.betas = (beta1, beta2);
                adam.eps = epsilon;
                adam.weight_decay = weight_decay;
                Box::new(adam)
            }
        };
        if plan.proximal_mu < 0.0 || !plan.proximal_mu.is_finite() {
            return Err(TrainError::Plan {
                field: "fedprox_mu",
                reason: format!("{} must be finite and >= 0", plan.proximal_mu),
            });
        }
        Ok(if plan.proximal_mu > 0.0 {
            Box::new(FedProx::new(base, plan.proximal_mu, global))
        } else {
            base
        })
    }

    fn batch_of(
        features: &Activations,
        masks: Option<&Activations>,
        frozen: Option<&ArrayD<f32>>,
        idx: &[usize],
    ) -> Result<Batch, TrainError> {
        let mask = match masks {
            Some(m) => Some(
                m.rows(idx)?
                    .into_dimensionality::<ndarray::Ix2>()
                    .map_err(|e| TrainError::Data(format!("attention masks: {e}")))?,
            ),
            None => None,
        };
        let mut batch = Batch::new(features.rows(idx)?, mask);
        batch.frozen = frozen.map(|f| f.select(Axis(0), idx));
        Ok(batch)
    }
}

impl LocalTrainer for TailTrainer {
    fn num_examples(&self) -> u64 {
        self.labels.len() as u64
    }

    fn train(
        &mut self,
        global: &GlobalAdapter,
        plan: &TrainPlan,
    ) -> Result<TrainedUpdate, TrainError> {
        let start = Instant::now();
        let n = self.labels.len();
        if n == 0 {
            return Err(TrainError::NoData { what: "train on" });
        }
        if plan.batch_size == 0 {
            return Err(TrainError::Plan {
                field: "batch_size",
                reason: "must be at least 1".into(),
            });
        }
        self.load(global)?;
        self.prepare_frozen()?;
        let frozen = self.frozen.rows();
        let mut opt = Self::optimizer(plan, &global.tensors)?;
        let batch = (plan.batch_size as usize).min(n);
        if let Some(dp) = plan.dp {
            let config = DpSgdConfig {
                clip_norm: f64::from(dp.clip_norm),
                noise_multiplier: f64::from(dp.noise_multiplier),
                sample_rate: batch as f64 / n as f64,
                expected_batch_size: Some(batch),
            };
            match &mut self.dp {
                Some(state) if *state.config() == config => {}
                slot => {
                    *slot = Some(
                        DpSgd::new(config, self.client_seed ^ 0x0d9_5ed)
                            .map_err(TrainError::Step)?,
                    )
                }
            }
        }

        let mut rng = StdRng::seed_from_u64(plan.seed ^ self.client_seed.rotate_left(17));
        let mut order: Vec<usize> = (0..n).collect();
        let (mut steps, mut loss_sum, mut correct, mut seen) = (0u32, 0.0f64, 0usize, 0usize);
        for _epoch in 0..plan.local_epochs {
            order.shuffle(&mut rng);
            // Metrics describe the last epoch, when the tail is closest to what is sent.
            (loss_sum, correct, seen) = (0.0, 0, 0);
            for idx in order.chunks(batch) {
                let b = Self::batch_of(&self.features, self.masks.as_ref(), frozen, idx)?;
                let labels: Vec<usize> = idx.iter().map(|&i| self.labels[i]).collect();
                let stats = match (&mut self.dp, plan.dp) {
                    (Some(dp), Some(_)) => self.tail.train_step_dp(&b, &labels, dp, opt.as_mut()),
                    _ => self.tail.train_step(&b, &labels, opt.as_mut()),
                }
                .map_err(TrainError::Step)?;
                steps += 1;
                loss_sum += stats.loss * stats.samples as f64;
                correct += stats.correct;
                seen += stats.samples;
            }
        }

        let local = self.tail.trainable();
        let mut deltas = Vec::with_capacity(global.tensors.len());
        for g in &global.tensors {
            let l = local.iter().find(|t| t.name == g.name).ok_or_else(|| {
                TrainError::Adapter(fedpeft_peft::PeftError::MissingTensor {
                    name: g.name.clone(),
                })
            })?;
            let values: Vec<f32> = l.values.iter().zip(&g.values).map(|(a, b)| a - b).collect();
            if let Some(position) = values.iter().position(|v| !v.is_finite()) {
                return Err(TrainError::NonFiniteDelta {
                    name: g.name.clone(),
                    position,
                });
            }
            deltas.push(NamedTensor {
                name: g.name.clone(),
                shape: g.shape.clone(),
                values,
            });
        }
        let seen_f = seen.max(1) as f64;
        Ok(TrainedUpdate {
            deltas,
            metrics: Metrics {
                loss: (loss_sum / seen_f) as f32,
                accuracy: (correct as f64 / seen_f) as f32,
                num_examples: n as u64,
                steps,
                elapsed_ms: start.elapsed().as_millis().min(u32::MAX as u128) as u32,
                epsilon: self.dp.as_ref().map(|d| d.epsilon(DP_DELTA) as f32),
            },
        })
    }

    fn evaluate(&mut self, adapter: &GlobalAdapter) -> Result<Metrics, TrainError> {
        let start = Instant::now();
        self.load(adapter)?;
        let (features, masks, labels, frozen) = match &self.eval {
            Some((f, l)) => (f, None, l, None),
            None => (
                &self.features,
                self.masks.as_ref(),
                &self.labels,
                self.frozen.rows(),
            ),
        };
        if labels.is_empty() {
            return Err(TrainError::NoData { what: "evaluate" });
        }
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let all: Vec<usize> = (0..labels.len()).collect();
        for idx in all.chunks(256) {
            let b = Self::batch_of(features, masks, frozen, idx)?;
            let l: Vec<usize> = idx.iter().map(|&i| labels[i]).collect();
            let s = self.tail.evaluate(&b, &l).map_err(TrainError::Step)?;
            loss += s.loss_sum;
            correct += s.correct;
        }
        let n = labels.len() as f64;
        Ok(Metrics {
            loss: (loss / n) as f32,
            accuracy: (correct as f64 / n) as f32,
            num_examples: labels.len() as u64,
            steps: 0,
            elapsed_ms: start.elapsed().as_millis().min(u32::MAX as u128) as u32,
            epsilon: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fedpeft_peft::{Family, FrozenWeights, Method, PeftConfig, build_tail};
    use rand::Rng;

    use super::*;
    use crate::types::WireDtype;

    const CLASSES: usize = 3;

    /// A small conv head (4 channels -> 8, 2x2 spatial) with a fresh 3-class head.
    fn tail(method: Method) -> Box<dyn Tail> {
        let mut rng = StdRng::seed_from_u64(1);
        let mut w = HashMap::new();
        let conv: Vec<f32> = (0..32).map(|_| rng.random_range(-0.5..0.5)).collect();
        w.insert("conv_head.weight".to_string(), (vec![8, 4], conv));
        w.insert("bn_head.scale".to_string(), (vec![8], vec![1.0f32; 8]));
        w.insert("bn_head.shift".to_string(), (vec![8], vec![0.1f32; 8]));
        let weights = FrozenWeights::from_map(w).unwrap();
        build_tail(
            Family::ConvHead,
            &weights,
            PeftConfig::new(method, CLASSES, 7),
        )
        .unwrap()
    }

    /// Linearly separable activations: class c has channel c switched on.
    fn data(n: usize, seed: u64) -> (ArrayD<f32>, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let labels: Vec<usize> = (0..n).map(|i| i % CLASSES).collect();
        let mut x = ArrayD::<f32>::zeros(vec![n, 4, 2, 2]);
        for (i, &c) in labels.iter().enumerate() {
            for ch in 0..4 {
                for p in 0..4 {
                    let on = if ch == c { 2.0 } else { 0.0 };
                    x[[i, ch, p / 2, p % 2]] = on + rng.random_range(-0.3..0.3);
                }
            }
        }
        (x, labels)
    }

    fn plan(epochs: u32, mu: f32) -> TrainPlan {
        TrainPlan {
            local_epochs: epochs,
            batch_size: 16,
            learning_rate: 0.5,
            optimizer: OptimizerPlan::Sgd {
                momentum: 0.0,
                weight_decay: 0.0,
            },
            dp: None,
            proximal_mu: mu,
            dtype: WireDtype::F32,
            top_k: None,
            seed: 3,
        }
    }

    fn trainer(method: Method) -> (TailTrainer, GlobalAdapter) {
        let (x, y) = data(96, 5);
        let t = TailTrainer::new(tail(method), x, y, 11).unwrap();
        let global = GlobalAdapter {
            run_id: 1,
            round: 0,
            tensors: t.trainable(),
        };
        (t, global)
    }

    #[test]
    fn local_training_returns_local_minus_global_for_every_trainable_tensor() {
        let (mut t, global) = trainer(Method::Bias);
        let update = t.train(&global, &plan(2, 0.0)).unwrap();
        let local = t.trainable();
        assert_eq!(update.deltas.len(), global.tensors.len());
        for ((d, g), l) in update.deltas.iter().zip(&global.tensors).zip(&local) {
            assert_eq!((&d.name, &d.shape), (&g.name, &g.shape));
            for i in 0..d.values.len() {
                assert!(
                    (g.values[i] + d.values[i] - l.values[i]).abs() < 1e-6,
                    "{} [{i}]",
                    d.name
                );
            }
        }
        assert!(
            update
                .deltas
                .iter()
                .any(|d| d.values.iter().any(|v| *v != 0.0))
        );
        assert_eq!(update.metrics.num_examples, 96);
        assert_eq!(update.metrics.steps, 2 * 6);
    }

    #[test]
    fn training_improves_accuracy_on_separable_data() {
        let (mut t, global) = trainer(Method::Head);
        let before = t.evaluate(&global).unwrap();
        let update = t.train(&global, &plan(5, 0.0)).unwrap();
        let trained = GlobalAdapter {
            run_id: 1,
            round: 1,
            tensors: global
                .tensors
                .iter()
                .zip(&update.deltas)
                .map(|(g, d)| NamedTensor {
                    name: g.name.clone(),
                    shape: g.shape.clone(),
                    values: g.values.iter().zip(&d.values).map(|(a, b)| a + b).collect(),
                })
                .collect(),
        };
        let after = t.evaluate(&trained).unwrap();
        assert!(
            after.accuracy > 0.9,
            "accuracy {} -> {}",
            before.accuracy,
            after.accuracy
        );
        assert!(after.loss < before.loss);
    }

    #[test]
    fn the_same_seed_gives_the_same_update() {
        let (mut a, global) = trainer(Method::Head);
        let (mut b, _) = trainer(Method::Head);
        assert_eq!(
            a.train(&global, &plan(1, 0.0)).unwrap().deltas,
            b.train(&global, &plan(1, 0.0)).unwrap().deltas
        );
    }

    #[test]
    fn a_strong_proximal_term_keeps_the_update_small() {
        let norm = |u: &TrainedUpdate| -> f32 {
            u.deltas
                .iter()
                .flat_map(|d| &d.values)
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt()
        };
        let (mut a, global) = trainer(Method::Head);
        let (mut b, _) = trainer(Method::Head);
        let free = norm(&a.train(&global, &plan(3, 0.0)).unwrap());
        let prox = norm(&b.train(&global, &plan(3, 1.5)).unwrap());
        assert!(prox < 0.8 * free, "fedprox {prox} vs free {free}");
    }

    #[test]
    fn an_adapter_with_an_unknown_tensor_is_refused_by_name() {
        let (mut t, mut global) = trainer(Method::Head);
        global.tensors[0].name = "nope.weight".into();
        let err = t.train(&global, &plan(1, 0.0)).unwrap_err();
        assert!(matches!(err, TrainError::Adapter(_)));
        assert!(err.to_string().contains("nope.weight"), "{err}");
    }

    #[test]
    fn labels_outside_the_head_are_refused() {
        let (x, mut y) = data(6, 1);
        y[4] = 9;
        let err = TailTrainer::new(tail(Method::Head), x, y, 0).unwrap_err();
        assert!(err.to_string().contains("label 9 of example 4"), "{err}");
    }

    #[test]
    fn a_bad_plan_is_an_error_not_a_panic() {
        let (mut t, global) = trainer(Method::Head);
        let mut p = plan(1, 0.0);
        p.batch_size = 0;
        assert!(matches!(
            t.train(&global, &p),
            Err(TrainError::Plan {
                field: "batch_size",
                ..
            })
        ));
        let mut p = plan(1, 0.0);
        p.learning_rate = f32::NAN;
        assert!(matches!(
            t.train(&global, &p),
            Err(TrainError::Plan {
                field: "learning_rate",
                ..
            })
        ));
    }

    #[test]
    fn dp_sgd_reports_a_growing_epsilon() {
        let (mut t, global) = trainer(Method::Head);
        let mut p = plan(1, 0.0);
        p.dp = Some(crate::types::DpPlan {
            clip_norm: 1.0,
            noise_multiplier: 1.1,
        });
        let e1 = t.train(&global, &p).unwrap().metrics.epsilon.unwrap();
        let e2 = t.train(&global, &p).unwrap().metrics.epsilon.unwrap();
        assert!(e1 > 0.0 && e2 > e1, "{e1} then {e2}");
    }

    #[test]
    fn the_frozen_prefix_changes_the_speed_not_the_update() {
        let lora = Method::Lora(fedpeft_peft::LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.1,
            targets: vec![],
        });
        let mut dp = plan(1, 0.0);
        dp.dp = Some(crate::types::DpPlan {
            clip_norm: 1.0,
            noise_multiplier: 0.5,
        });
        for (method, p) in [
            (Method::Head, plan(2, 0.0)),
            (Method::Bias, plan(2, 0.1)),
            (lora.clone(), plan(2, 0.0)),
            (Method::Head, dp.clone()),
            (lora, dp),
        ] {
            let name = method.name();
            let (mut with, global) = trainer(method.clone());
            let (without, _) = trainer(method);
            let mut without = without.with_frozen_budget(0);
            // Two rounds: the prefix is computed in the first and reused in the second.
            for round in 0..2 {
                let a = with.train(&global, &p).unwrap();
                let b = without.train(&global, &p).unwrap();
                assert!(
                    matches!(with.frozen, Frozen::Rows(_)),
                    "{name}: no prefix kept"
                );
                assert!(matches!(without.frozen, Frozen::Off));
                assert!(
                    (a.metrics.loss - b.metrics.loss).abs() < 1e-5,
                    "{name} round {round}"
                );
                for (x, y) in a.deltas.iter().zip(&b.deltas) {
                    let d = x
                        .values
                        .iter()
                        .zip(&y.values)
                        .map(|(p, q)| (p - q).abs())
                        .fold(0.0f32, f32::max);
                    assert!(d < 1e-5, "{name} round {round}: {} differs by {d}", x.name);
                }
            }
            let ea = with.evaluate(&global).unwrap();
            let eb = without.evaluate(&global).unwrap();
            assert!((ea.loss - eb.loss).abs() < 1e-5 && ea.accuracy == eb.accuracy);
        }
    }

    #[test]
    fn a_frozen_prefix_over_its_budget_is_not_kept() {
        let (t, global) = trainer(Method::Bias);
        // 96 rows x 4 pixels x 8 channels x 4 bytes = 12 288 bytes.
        let mut t = t.with_frozen_budget(12_287);
        t.train(&global, &plan(1, 0.0)).unwrap();
        assert!(matches!(t.frozen, Frozen::Off));
        let (t, _) = trainer(Method::Bias);
        let mut t = t.with_frozen_budget(12_288);
        t.train(&global, &plan(1, 0.0)).unwrap();
        assert!(matches!(t.frozen, Frozen::Rows(_)));
        let (mut full, global) = trainer(Method::FullTail);
        full.train(&global, &plan(1, 0.0)).unwrap();
        assert!(
            matches!(full.frozen, Frozen::Off),
            "full-tail has no prefix"
        );
    }
}
