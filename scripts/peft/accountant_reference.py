#!/usr/bin/env python3
"""Reference ε values for fedpeft-peft's RDP accountant, from Google's PyPI `dp-accounting`.

Re-run (prints the Rust table pinned in peft/tests/accountant.rs):
    python3 -m venv .venv-dp && .venv-dp/bin/pip install dp-accounting
    .venv-dp/bin/python scripts/peft/accountant_reference.py
Each row composes `steps` Poisson-subsampled Gaussian steps (sampling rate q, noise multiplier
sigma) in `dp_accounting.rdp.RdpAccountant` with its default orders and reports ε at δ.
"""
import importlib.metadata

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

SETTINGS = [
    # (q, sigma, steps, delta)
    (0.01, 1.1, 1000, 1e-5),
    (0.004, 1.0, 10000, 1e-5),
    (0.06, 0.8, 500, 1e-5),
    (0.1, 2.0, 200, 1e-6),
    (0.25, 5.0, 50, 1e-5),
    (0.02, 0.6, 3000, 1e-5),
    (1.0, 10.0, 10, 1e-5),
    (0.001, 1.5, 100000, 1e-7),
]

print(f"// dp-accounting {importlib.metadata.version('dp-accounting')}: (q, sigma, steps, delta, epsilon, order)")
for q, sigma, steps, delta in SETTINGS:
    acc = rdp.RdpAccountant()
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc.compose(event)
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    print(f"    ({float(q)!r}, {float(sigma)!r}, {steps}, {delta!r}, {float(eps)!r}, {float(order)!r}),")
