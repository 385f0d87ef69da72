//! The averaging strategies: FedAvg, and the server optimizers FedAdam and FedYogi on the averaged
//! delta.

use super::{ServerOptParams, Strategy, StrategyError, StrategyState, apply_step};
use crate::adapter::Adapter;

/// FedAvg: new global = global + Σnᵢ·Δᵢ / Σnᵢ.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }
    fn apply_mean(
        &mut self,
        round: u64,
        global: &Adapter,
        mean: &[Vec<f64>],
    ) -> Result<Adapter, StrategyError> {
        apply_step(round, global, mean)
    }
}

/// Which second-moment rule a server optimizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOptKind {
    Adam,
    Yogi,
}

/// FedAdam / FedYogi: Δ = weighted mean delta; m ← β1·m + (1−β1)·Δ;
/// Adam: v ← β2·v + (1−β2)·Δ²; Yogi: v ← v − (1−β2)·Δ²·sign(v − Δ²);
/// x ← x + η·m / (√v + τ). m starts at 0 and v at τ² (Reddi et al. 2021, Algorithm 2).
#[derive(Debug, Clone)]
pub struct ServerOpt {
    kind: ServerOptKind,
    params: ServerOptParams,
    state: StrategyState,
}

impl ServerOpt {
    pub fn new(kind: ServerOptKind, params: ServerOptParams) -> ServerOpt {
        ServerOpt {
            kind,
            params,
            state: StrategyState::default(),
        }
    }
}

impl Strategy for ServerOpt {
    fn name(&self) -> &'static str {
        match self.kind {
            ServerOptKind::Adam => "fedadam",
            ServerOptKind::Yogi => "fedyogi",
        }
    }
    fn apply_mean(
        &mut self,
        round: u64,
        global: &Adapter,
        delta: &[Vec<f64>],
    ) -> Result<Adapter, StrategyError> {
        let ServerOptParams {
            server_lr,
            beta1,
            beta2,
            tau,
        } = self.params;
        if self.state.m.is_empty() {
            self.state.m = delta.iter().map(|t| vec![0.0; t.len()]).collect();
            self.state.v = delta.iter().map(|t| vec![tau * tau; t.len()]).collect();
        }
        let mut step = Vec::with_capacity(delta.len());
        for ((d, m), v) in delta.iter().zip(&mut self.state.m).zip(&mut self.state.v) {
            let mut s = Vec::with_capacity(d.len());
            for ((&g, m), v) in d.iter().zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = beta1 * *m + (1.0 - beta1) * g;
                let g2 = g * g;
                *v = match self.kind {
                    ServerOptKind::Adam => beta2 * *v + (1.0 - beta2) * g2,
                    ServerOptKind::Yogi => *v - (1.0 - beta2) * g2 * (*v - g2).signum(),
                };
                s.push(server_lr * *m / (v.sqrt() + tau));
            }
            step.push(s);
        }
        apply_step(round, global, &step)
    }
    fn state(&self) -> StrategyState {
        self.state.clone()
    }
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        if state.m.len() != state.v.len() {
            return Err(StrategyError::State {
                strategy: self.name(),
                reason: format!(
                    "{} first-moment tensors but {} second-moment tensors",
                    state.m.len(),
                    state.v.len()
                ),
            });
        }
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::{global, one, run};

    #[test]
    fn fedavg_weights_deltas_by_num_examples() {
        // (1·[1,2] + 3·[5,−2]) / 4 = [4, −1]; global [10, 10] → [14, 9].
        let g = global(vec![10.0, 10.0]);
        let next = run(
            &mut FedAvg,
            &g,
            &[(1, vec![1.0, 2.0]), (3, vec![5.0, -2.0])],
        );
        assert_eq!(next.tensors[0].values, vec![14.0, 9.0]);
    }

    #[test]
    fn fedavg_result_does_not_depend_on_arrival_order() {
        let g = global(vec![0.1, -0.3, 0.7]);
        let ups = vec![
            (17, vec![0.123_456_7, -1.1e-3, 3.3]),
            (5, vec![-0.777, 2.5e-4, 0.1]),
            (123, vec![1e-6, 0.333_333, -2.0]),
        ];
        let a = run(&mut FedAvg, &g, &ups);
        let mut rev = ups.clone();
        rev.reverse();
        let b = run(&mut FedAvg, &g, &rev);
        assert_eq!(a, b);
    }

    #[test]
    fn fedavg_is_bit_identical_in_every_arrival_order_where_plain_f64_sums_are_not() {
        // Values of very different magnitudes: a plain f64 running sum depends on the order.
        let g = global(vec![0.25, -1.0]);
        let ups = vec![
            (2, vec![1.0e8, 0.1]),
            (7, vec![1.0e-9, 0.3]),
            (2, vec![-1.0e8, 0.7]),
            (9, vec![3.3e-7, -0.2]),
        ];
        let plain = |order: &[usize]| {
            order
                .iter()
                .map(|&i| ups[i].0 as f64 * f64::from(ups[i].1[0]))
                .fold(0.0f64, |a, x| a + x)
        };
        assert_ne!(
            plain(&[0, 1, 2, 3]),
            plain(&[0, 2, 1, 3]),
            "the example must matter"
        );
        let first = run(&mut FedAvg, &g, &ups);
        let orders = [
            [0, 1, 2, 3],
            [0, 2, 1, 3],
            [3, 2, 1, 0],
            [1, 3, 0, 2],
            [2, 0, 3, 1],
        ];
        for order in orders {
            let shuffled: Vec<_> = order.iter().map(|&i| ups[i].clone()).collect();
            assert_eq!(run(&mut FedAvg, &g, &shuffled), first, "order {order:?}");
        }
        // And it is the exact mean (the ±2e8 cancel), rounded as documented.
        let exact = (7.0 * f64::from(1.0e-9f32) + 9.0 * f64::from(3.3e-7f32)) / 20.0;
        assert_eq!(first.tensors[0].values[0], (0.25 + exact) as f32);
    }

    #[test]
    fn fedavg_with_no_updates_is_an_error_naming_the_round() {
        let g = global(vec![1.0]);
        let acc = FedAvg.configure_round(7, &g, 3);
        let err = FedAvg.aggregate(7, &g, &acc).unwrap_err();
        assert_eq!(err, StrategyError::NoUpdates { round: 7 });
    }

    #[test]
    fn fedadam_first_step_matches_hand_computed_value() {
        // Δ = 0.5, m = 0.1·0.5 = 0.05, v = 0.99·τ² + 0.01·0.25 with τ = 1e-3
        // = 9.9e-7 + 2.5e-3 = 0.00250099; x = 1 + 0.01·0.05/(√v + τ)
        let p = ServerOptParams::default();
        let mut s = ServerOpt::new(ServerOptKind::Adam, p);
        let g = global(vec![1.0]);
        let next = run(&mut s, &g, &[(2, vec![0.5])]);
        let v: f64 = 0.99 * 1e-6 + 0.01 * 0.25;
        let expected = 1.0 + 0.01 * 0.05 / (v.sqrt() + 1e-3);
        assert_eq!(next.tensors[0].values[0], expected as f32);
        assert!((expected - 1.009_804).abs() < 1e-5, "{expected}");
        // Second step with the same delta: m = 0.9·0.05 + 0.05 = 0.095.
        let v2 = 0.99 * v + 0.01 * 0.25;
        let expected2 = f64::from(next.tensors[0].values[0]) + 0.01 * 0.095 / (v2.sqrt() + 1e-3);
        let next2 = run(&mut s, &next, &[(2, vec![0.5])]);
        assert_eq!(next2.tensors[0].values[0], expected2 as f32);
    }

    #[test]
    fn fedyogi_moves_v_towards_delta_squared_additively() {
        // v0 = τ² = 1e-6 < Δ² = 0.25, so sign(v − Δ²) = −1 and v = 1e-6 + 0.01·0.25.
        let mut s = ServerOpt::new(ServerOptKind::Yogi, ServerOptParams::default());
        let g = global(vec![0.0]);
        let next = run(&mut s, &g, &[(1, vec![-0.5])]);
        let v: f64 = 1e-6 + 0.01 * 0.25;
        let expected = 0.01 * (-0.05) / (v.sqrt() + 1e-3);
        assert_eq!(next.tensors[0].values[0], expected as f32);
        let st = s.state();
        assert!((st.v[0][0] - v).abs() < 1e-15);
        assert!((st.m[0][0] + 0.05).abs() < 1e-15);
    }

    #[test]
    fn server_optimizer_state_survives_a_restore() {
        let g = global(vec![0.0, 1.0]);
        let mut a = ServerOpt::new(ServerOptKind::Adam, ServerOptParams::default());
        let g1 = run(&mut a, &g, &[(1, vec![0.2, -0.4])]);
        let mut b = ServerOpt::new(ServerOptKind::Adam, ServerOptParams::default());
        b.restore(a.state()).unwrap();
        assert_eq!(
            run(&mut a, &g1, &[(1, vec![0.1, 0.1])]),
            run(&mut b, &g1, &[(1, vec![0.1, 0.1])])
        );
    }

    #[test]
    fn non_finite_aggregate_is_refused() {
        let g = global(vec![f32::MAX]);
        let mut acc = FedAvg.configure_round(1, &g, 1);
        acc.fold(1, &one("w", vec![f32::MAX]));
        assert!(matches!(
            FedAvg.aggregate(1, &g, &acc),
            Err(StrategyError::NonFinite { .. })
        ));
    }
}
