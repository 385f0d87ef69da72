//! The RDP accountant against Google's `dp-accounting` (PyPI). The table is the output of
//! `scripts/peft/accountant_reference.py`, pasted verbatim.

use fedpeft_peft::accountant::{RdpAccountant, rdp_subsampled_gaussian};
use fedpeft_peft::{DpSgd, DpSgdConfig};

#[rustfmt::skip]
const REFERENCE: &[(f64, f64, u64, f64, f64, f64)] = &[
    // dp-accounting 0.6.0: (q, sigma, steps, delta, epsilon, order)
    (0.01, 1.1, 1000, 1e-05, 1.7117701662429012, 9.6),
    (0.004, 1.0, 10000, 1e-05, 2.3896982714001758, 8.5),
    (0.06, 0.8, 500, 1e-05, 16.244133281092456, 2.3),
    (0.1, 2.0, 200, 1e-06, 4.117567643450246, 6.5),
    (0.25, 5.0, 50, 1e-05, 1.562647881828956, 12.0),
    (0.02, 0.6, 3000, 1e-05, 27.89850775955243, 1.9),
    (1.0, 10.0, 10, 1e-05, 1.3084972690274297, 14.0),
    (0.001, 1.5, 100000, 1e-07, 1.1977353164154578, 22.0),
];

#[test]
fn epsilon_matches_dp_accounting_within_one_percent_on_eight_settings() {
    for &(q, sigma, steps, delta, eps_ref, order_ref) in REFERENCE {
        let mut acc = RdpAccountant::new();
        acc.compose(q, sigma, steps).unwrap();
        let (eps, order) = acc.epsilon(delta);
        let rel = (eps - eps_ref).abs() / eps_ref;
        assert!(
            rel < 0.01,
            "q={q} sigma={sigma} steps={steps} delta={delta}: {eps} vs {eps_ref} ({rel:e})"
        );
        assert_eq!(order, order_ref, "optimal order for q={q} sigma={sigma}");
    }
}

#[test]
fn composition_over_rounds_equals_one_long_run() {
    let mut a = RdpAccountant::new();
    for _round in 0..10 {
        a.compose(0.02, 1.0, 50).unwrap();
    }
    let mut b = RdpAccountant::new();
    b.compose(0.02, 1.0, 500).unwrap();
    assert_eq!(a.steps(), 500);
    let saved = RdpAccountant::restore(a.orders().to_vec(), a.rdp().to_vec(), a.steps()).unwrap();
    assert_eq!(saved, a);
    assert!(RdpAccountant::restore(vec![2.0], vec![], 0).is_err());
    assert!((a.epsilon(1e-5).0 - b.epsilon(1e-5).0).abs() < 1e-9);
}

#[test]
fn full_batch_rdp_is_the_gaussian_mechanism_and_more_noise_means_less_epsilon() {
    assert!((rdp_subsampled_gaussian(1.0, 2.0, 8.0) - 8.0 / 8.0).abs() < 1e-12);
    assert_eq!(rdp_subsampled_gaussian(0.0, 1.0, 8.0), 0.0);
    let eps = |sigma| {
        let mut a = RdpAccountant::new();
        a.compose(0.01, sigma, 1000).unwrap();
        a.epsilon(1e-5).0
    };
    assert!(eps(0.8) > eps(1.0) && eps(1.0) > eps(2.0));
    assert!(RdpAccountant::new().compose(1.5, 1.0, 1).is_err());
}

#[test]
fn dp_sgd_config_is_validated() {
    let ok = DpSgdConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        sample_rate: 0.01,
        expected_batch_size: None,
    };
    assert!(DpSgd::new(ok.clone(), 0).is_ok());
    assert!(
        DpSgd::new(
            DpSgdConfig {
                clip_norm: 0.0,
                ..ok.clone()
            },
            0
        )
        .is_err()
    );
    assert!(
        DpSgd::new(
            DpSgdConfig {
                sample_rate: 0.0,
                ..ok.clone()
            },
            0
        )
        .is_err()
    );
    assert!(
        DpSgd::new(
            DpSgdConfig {
                noise_multiplier: f64::NAN,
                ..ok
            },
            0
        )
        .is_err()
    );
}
