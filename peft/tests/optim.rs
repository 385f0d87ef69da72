//! Optimizers against `torch.optim` (PyPI torch 2.15, reference numbers from this snippet):
//!
//! ```python
//! p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
//! opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)   # or SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
//! for g in ([0.5, -1.0, 2.0], [0.1, 0.3, -0.2], [-0.4, 0.0, 1.0]):
//!     p.grad = torch.tensor(g); opt.step()
//! p = torch.nn.Parameter(torch.tensor([3.0, 4.0])); p.grad = torch.tensor([3.0, 4.0])
//! torch.nn.utils.clip_grad_norm_([p], 1.0)
//! ```

use fedpeft_peft::optim::clip_grad_norm;
use fedpeft_peft::*;

const GRADS: [[f32; 3]; 3] = [[0.5, -1.0, 2.0], [0.1, 0.3, -0.2], [-0.4, 0.0, 1.0]];

fn run(opt: &mut dyn Optimizer) -> Vec<f32> {
    let mut w = vec![1.0f32, -2.0, 0.5];
    for g in GRADS {
        let mut g = g.to_vec();
        opt.step(&mut [ParamSlot {
            name: "w",
            value: &mut w,
            grad: &mut g,
        }])
        .unwrap();
    }
    w
}

fn close(a: &[f32], b: &[f32]) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
}

#[test]
fn adamw_matches_torch_over_three_steps() {
    close(
        &run(&mut AdamW::new(0.1)),
        &[0.807_609_26, -1.818_391_1, 0.270_010_14],
    );
}

#[test]
fn sgd_with_momentum_and_weight_decay_matches_torch_over_three_steps() {
    close(
        &run(&mut Sgd::with(0.1, 0.9, 0.01)),
        &[0.880_094_77, -1.775_139_5, -0.106_062_82],
    );
}

#[test]
fn gradient_norm_clipping_matches_torch() {
    let mut w = vec![3.0f32, 4.0];
    let mut g = vec![3.0f32, 4.0];
    let norm = clip_grad_norm(
        &mut [ParamSlot {
            name: "p",
            value: &mut w,
            grad: &mut g,
        }],
        1.0,
    );
    assert_eq!(norm, 5.0);
    close(&g, &[0.599_999_9, 0.799_999_8]);
}

#[test]
fn fedprox_adds_mu_times_the_distance_to_the_global_tensors() {
    let global = vec![NamedTensor::new("w", vec![3], vec![0.0, 0.0, 0.0]).unwrap()];
    let mut opt = FedProx::new(Sgd::new(1.0), 0.5, &global);
    let mut w = vec![1.0f32, -2.0, 0.5];
    let mut g = vec![0.0f32; 3];
    opt.step(&mut [ParamSlot {
        name: "w",
        value: &mut w,
        grad: &mut g,
    }])
    .unwrap();
    // gradient = mu·(w − w_global) = [0.5, −1, 0.25]; w − 1·gradient
    close(&w, &[0.5, -1.0, 0.25]);
    let mut g = vec![0.0f32; 3];
    let e = opt
        .step(&mut [ParamSlot {
            name: "other",
            value: &mut w,
            grad: &mut g,
        }])
        .unwrap_err();
    assert!(e.to_string().contains("other"), "{e}");
}
