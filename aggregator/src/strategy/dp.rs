//! Client-level differential privacy at the aggregator: [`DpFedAvg`] wraps an averaging strategy,
//! noises the clipped sum and counts ε with the RDP accountant.

use super::accumulator::exact_sum_over;
use super::{Accumulator, AggregateStats, Strategy, StrategyError, StrategyState};
use crate::adapter::Adapter;

/// Client-level differential privacy at the aggregator (DP-FedAvg, McMahan et al., "Learning
/// Differentially Private Recurrent Language Models", ICLR 2018), validated config form.
///
/// Each round: every accepted delta is clipped to L2 norm `clip_norm` (S) by the round machine,
/// the clipped deltas are summed *unweighted* (every client weighs the same, whatever its
/// `num_examples`), the sum is divided by the fixed denominator `expected_clients` (W, not the
/// number that replied: a fixed denominator keeps the sensitivity of the average at S/W when a
/// client is added or removed), and Gaussian noise N(0, (σ·S/W)²) is added to every coordinate.
/// The noised average then goes through the inner strategy's step (FedAvg: added to the global;
/// FedAdam / FedYogi: server optimizer; post-processing, so no further privacy cost).
///
/// Accounting: each aggregated round is one application of the sampled Gaussian mechanism with
/// noise multiplier σ and sampling rate q = expected_clients / fleet_size, composed in Rényi DP
/// (`fedpeft_peft::accountant`, Mironov et al. 2019) and converted to ε at `delta`. The analysis
/// is for Poisson sampling of clients with rate q, as McMahan et al.; the aggregator samples a
/// fixed-size set uniformly (`sample_clients`), for which the Poisson figure is the usual
/// approximation. The guarantee is central DP at the user (client) level against anyone who sees
/// the published global adapters; the aggregator itself sees every raw update. Rounds that fail
/// (no quorum) publish nothing new and cost nothing.
///
/// Not supported: DP over coordinate-wise median or trimmed mean. The noise is calibrated to the
/// L2 sensitivity of a sum of clipped updates (S); one client can move an order statistic of every
/// coordinate at once, by up to S per coordinate, so its L2 sensitivity is up to S·√d for d
/// parameters, and noise σ·S would give no meaningful guarantee. The config refuses the
/// combination rather than report an ε that does not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientDp {
    /// S: L2 bound every client delta is clipped to.
    pub clip_norm: f64,
    /// σ: noise standard deviation in units of S (before dividing by W).
    pub noise_multiplier: f64,
    /// W: the fixed denominator of the average (expected sampled clients per round).
    pub expected_clients: usize,
    /// N: clients in the fleet, for q = W / N.
    pub fleet_size: usize,
    /// δ at which ε is reported.
    pub delta: f64,
    /// Seed of the noise. `None` (the default) draws it from the OS: noise an observer can
    /// predict protects nothing. A fixed seed is for tests only.
    pub noise_seed: Option<u64>,
    /// Distributed DP (a secure-aggregation run): the devices clipped their updates and added
    /// the noise, and the round's accumulator holds the one unmasked, already noised average
    /// (Σ clipped deltas / W + noise); this strategy adds nothing and only accounts.
    pub on_devices: bool,
}

impl ClientDp {
    /// q = expected_clients / fleet_size.
    pub fn sample_rate(&self) -> f64 {
        self.expected_clients as f64 / self.fleet_size as f64
    }

    /// Standard deviation of the noise on each coordinate of the average: σ·S / W.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm / self.expected_clients as f64
    }

    /// ε at `delta` after `rounds` noised rounds (what the accountant reports), computed afresh.
    pub fn epsilon_after(&self, rounds: u64) -> f64 {
        let mut acc = fedpeft_peft::accountant::RdpAccountant::new();
        let _ = acc.compose(self.sample_rate(), self.noise_multiplier, rounds);
        acc.epsilon(self.delta).0
    }
}

/// DP-FedAvg: wraps an averaging strategy (FedAvg, FedAdam, FedYogi); see [`ClientDp`].
#[derive(Debug)]
pub struct DpFedAvg {
    inner: Box<dyn Strategy>,
    dp: ClientDp,
    accountant: fedpeft_peft::accountant::RdpAccountant,
    rounds: u64,
    stats: AggregateStats,
}

impl DpFedAvg {
    /// Wraps `inner`; refuses strategies that do not average.
    pub fn wrap(inner: Box<dyn Strategy>, dp: ClientDp) -> Result<DpFedAvg, StrategyError> {
        if !matches!(inner.name(), "fedavg" | "fedadam" | "fedyogi") {
            return Err(StrategyError::State {
                strategy: inner.name(),
                reason: "client-level DP needs an averaging strategy (fedavg, fedadam, fedyogi): \
                         the noise is calibrated to a sum of clipped updates, not to an order \
                         statistic"
                    .into(),
            });
        }
        Ok(DpFedAvg {
            inner,
            dp,
            accountant: fedpeft_peft::accountant::RdpAccountant::new(),
            rounds: 0,
            stats: AggregateStats::default(),
        })
    }

    /// ε at the configured δ over every noised round so far.
    pub fn epsilon(&self) -> f64 {
        self.accountant.epsilon(self.dp.delta).0
    }

    fn noise_rng(&self, round: u64) -> rand::rngs::StdRng {
        use rand::SeedableRng;
        match self.dp.noise_seed {
            Some(seed) => {
                rand::rngs::StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => {
                let mut key = [0u8; 32];
                // getrandom fails only where the OS has no entropy source at all; noise from a
                // fixed key would be predictable, so that is fatal rather than silently weak.
                getrandom::fill(&mut key).expect("the OS random source is unavailable");
                rand::rngs::StdRng::from_seed(key)
            }
        }
    }
}

/// `sum / denom + N(0, std²)` per coordinate, the Gaussian mechanism on a clipped sum.
pub fn noised_mean(
    sum: &[Vec<f64>],
    denom: f64,
    std: f64,
    rng: &mut impl rand::Rng,
) -> Vec<Vec<f64>> {
    use rand_distr::Distribution;
    let normal = rand_distr::Normal::new(0.0, std.max(0.0)).expect("finite, non-negative std");
    sum.iter()
        .map(|t| t.iter().map(|&s| s / denom + normal.sample(rng)).collect())
        .collect()
}

/// The accountant refused to compose or restore: a state error of the DP wrapper.
fn accountant_error(e: impl std::fmt::Display) -> StrategyError {
    StrategyError::State {
        strategy: "dp-fedavg",
        reason: e.to_string(),
    }
}

impl Strategy for DpFedAvg {
    fn name(&self) -> &'static str {
        match self.inner.name() {
            "fedadam" => "dp-fedadam",
            "fedyogi" => "dp-fedyogi",
            _ => "dp-fedavg",
        }
    }
    fn configure_round(&self, round: u64, global: &Adapter, sampled: usize) -> Accumulator {
        let _ = (round, sampled);
        Accumulator::sum_for(global)
    }
    fn weighs_by_examples(&self) -> bool {
        false
    }
    fn aggregate(
        &mut self,
        round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError> {
        let Accumulator::Sum {
            weighted,
            error,
            count,
            ..
        } = acc
        else {
            return Err(StrategyError::State {
                strategy: "dp-fedavg",
                reason: "needs a streaming sum, got buffered deltas".into(),
            });
        };
        if *count == 0 {
            return Err(StrategyError::NoUpdates { round });
        }
        // Every delta was folded with weight 1, so weighted + error is the exact sum of the
        // clipped deltas (dividing by 1 is exact).
        let sum = exact_sum_over(weighted, error, 1.0);
        let std = self.dp.noise_std();
        let mean = if self.dp.on_devices {
            // The unmasked sum: already Σ clipped / W plus the devices' noise.
            if *count != 1 {
                return Err(StrategyError::State {
                    strategy: "dp-fedavg",
                    reason: format!(
                        "distributed DP expects the one unmasked sum of a secure round, got \
                         {count} deltas"
                    ),
                });
            }
            sum
        } else {
            let mut rng = self.noise_rng(round);
            noised_mean(&sum, self.dp.expected_clients as f64, std, &mut rng)
        };
        let next = self.inner.apply_mean(round, global, &mean)?;
        self.accountant
            .compose(self.dp.sample_rate(), self.dp.noise_multiplier, 1)
            .map_err(accountant_error)?;
        self.rounds += 1;
        self.stats = AggregateStats {
            dp_noise_std: Some(std),
            dp_epsilon: Some(self.epsilon()),
            dp_delta: Some(self.dp.delta),
            ..AggregateStats::default()
        };
        Ok(next)
    }
    fn state(&self) -> StrategyState {
        let mut s = self.inner.state();
        s.dp_rdp = self.accountant.rdp().to_vec();
        s.dp_rounds = self.rounds;
        s
    }
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        let orders = fedpeft_peft::accountant::default_orders();
        if !state.dp_rdp.is_empty() {
            self.accountant = fedpeft_peft::accountant::RdpAccountant::restore(
                orders,
                state.dp_rdp.clone(),
                state.dp_rounds,
            )
            .map_err(accountant_error)?;
        }
        self.rounds = state.dp_rounds;
        self.inner.restore(StrategyState {
            dp_rdp: Vec::new(),
            dp_rounds: 0,
            ..state
        })
    }
    fn last_stats(&self) -> AggregateStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::{global, one};
    use crate::strategy::{ServerOptParams, StrategyKind, build_with};

    fn dp(noise_multiplier: f64, expected_clients: usize, fleet_size: usize) -> ClientDp {
        ClientDp {
            clip_norm: 2.0,
            noise_multiplier,
            expected_clients,
            fleet_size,
            delta: 1e-6,
            noise_seed: Some(7),
            on_devices: false,
        }
    }

    #[test]
    fn dp_noise_has_the_documented_scale_and_the_unweighted_mean() {
        // 40 000 coordinates, 4 clients folded with weight 1 (what the machine does under DP),
        // denominator W = 5: mean = sum / 5; noise std = σ·S/W = 1.5·2/5 = 0.6.
        let d = 40_000;
        let g = global(vec![0.0; d]);
        let mut s = build_with(&StrategyKind::FedAvg, Some(&dp(1.5, 5, 50))).unwrap();
        assert!(!s.weighs_by_examples());
        let mut acc = s.configure_round(1, &g, 4);
        for c in 0..4 {
            acc.fold(1, &one("w", vec![0.25 * c as f32; d]));
        }
        let next = s.aggregate(1, &g, &acc).unwrap();
        let expected_mean = 0.25 * (0.0 + 1.0 + 2.0 + 3.0) / 5.0;
        let v: Vec<f64> = next.tensors[0]
            .values
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let mean = v.iter().sum::<f64>() / d as f64;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (d - 1) as f64).sqrt();
        // Standard errors: 0.6/√d = 0.003 for the mean, 0.6/√(2d) = 0.0021 for the std: 5 σ.
        assert!(
            (mean - expected_mean).abs() < 0.015,
            "mean {mean} vs {expected_mean}"
        );
        assert!((std - 0.6).abs() < 0.011, "std {std} vs 0.6");
        assert_eq!(s.last_stats().dp_noise_std, Some(0.6));
        // A fixed seed is reproducible; the same round again gives the same noise.
        let mut s2 = build_with(&StrategyKind::FedAvg, Some(&dp(1.5, 5, 50))).unwrap();
        assert_eq!(s2.aggregate(1, &g, &acc).unwrap(), next);
    }

    #[test]
    fn dp_epsilon_grows_every_round_matches_dp_accounting_and_survives_a_restore() {
        // dp-accounting 0.6.0 (peft/tests/accountant.rs): q = 0.1, σ = 2, 200 compositions,
        // δ = 1e-6 → ε = 4.117567643450246. Here: 10 expected clients of a fleet of 100.
        let cfg = dp(2.0, 10, 100);
        let g = global(vec![0.0; 3]);
        let mut s = build_with(&StrategyKind::FedAvg, Some(&cfg)).unwrap();
        assert_eq!(s.name(), "dp-fedavg");
        let mut last = 0.0;
        let mut restored = None;
        for r in 1..=200u64 {
            let mut acc = s.configure_round(r, &g, 10);
            acc.fold(1, &one("w", vec![0.1, 0.2, 0.3]));
            s.aggregate(r, &g, &acc).unwrap();
            let eps = s.last_stats().dp_epsilon.unwrap();
            assert!(eps > last, "round {r}: ε {eps} did not grow from {last}");
            last = eps;
            if r == 100 {
                // A restart from the checkpointed state goes on from the same ε.
                let mut b = build_with(&StrategyKind::FedAvg, Some(&cfg)).unwrap();
                b.restore(s.state()).unwrap();
                restored = Some(b);
            }
        }
        assert!(
            (last - 4.117_567_643_450_246).abs() / 4.117_567_643_450_246 < 0.01,
            "{last}"
        );
        assert!((cfg.epsilon_after(200) - last).abs() < 1e-9);
        let mut b = restored.unwrap();
        for r in 101..=200u64 {
            let mut acc = b.configure_round(r, &g, 10);
            acc.fold(1, &one("w", vec![0.1, 0.2, 0.3]));
            b.aggregate(r, &g, &acc).unwrap();
        }
        assert!((b.last_stats().dp_epsilon.unwrap() - last).abs() < 1e-9);
        assert_eq!(b.state().dp_rounds, 200);
    }

    #[test]
    fn dp_refuses_to_wrap_an_order_statistic() {
        for kind in [
            StrategyKind::Median,
            StrategyKind::TrimmedMean { trim: 0.1 },
        ] {
            let err = build_with(&kind, Some(&dp(1.0, 5, 50))).unwrap_err();
            assert!(err.to_string().contains("averaging strategy"), "{err}");
        }
        let s = build_with(
            &StrategyKind::FedAdam(ServerOptParams::default()),
            Some(&dp(1.0, 5, 50)),
        );
        assert_eq!(s.unwrap().name(), "dp-fedadam");
    }
}
