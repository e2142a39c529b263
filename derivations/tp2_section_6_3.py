"""TP2 §6.3 / TP3 App. C: the gradient GIA gets wrong.

x^1 = W^1 xi + 1 at xi = 0 (so x^1 = 1), h^2 = W^2 x^1, x^2 = (h^2)^2, y = 1^T x^2 / n.
The gradient dx^1 = 2 W^2T W^2 1 has E = 2 and E^2 = 8 exactly; GIA says 0 and 4.

Run:  python derivations/tp2_section_6_3.py [--width 4000 --seeds 8]
"""
import sys

import numpy as np

import symntk
from _gia_vs_exact import arguments, mean_sem, moment_case
from symntk import examples

if __name__ == "__main__":
    args = arguments(__doc__, width=4000)
    program = examples.tp2_section_6_3()
    x1 = next(n for n in program.nodes if getattr(n, "name", None) == "x1")
    for mode in ("gia", "exact"):
        print(f"% {mode} derivation")
        print(symntk.derive(program, mode=mode).latex(highlight_zdot=True))
    stats = {mode: (symntk.expectation(program, lambda Z, dZ: dZ(x1), mode, x=[0.0]),
                    symntk.expectation(program, lambda Z, dZ: dZ(x1) ** 2, mode, x=[0.0]))
             for mode in ("gia", "exact")}
    n, means, seconds = args.width, [], []
    for seed in range(args.seeds):          # an independent NumPy simulation, no symntk code
        rng = np.random.default_rng(seed)
        W2 = rng.standard_normal((n, n)) / np.sqrt(n)
        dh2 = 2 * (W2 @ np.ones(n))          # x^1 = 1; dx^2 = n dy/dx^2 = 1; dh^2 = 2 h^2
        dx1 = W2.T @ dh2
        means.append(dx1.mean())
        seconds.append((dx1 ** 2).mean())
    ok = moment_case(f"gradient statistics at width {n}, {args.seeds} seeds", [
        ("E Z^{dx1}", stats["exact"][0], stats["gia"][0], *mean_sem(means)),
        ("E (Z^{dx1})^2", stats["exact"][1], stats["gia"][1], *mean_sem(seconds))])
    sys.exit(0 if ok else 1)
