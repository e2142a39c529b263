"""x = A^T A v: the Zhat + Zdot calculus on its canonical example (TP3 Ex. 2.5, 2.8).

Exact: E Z^v Z^x = 1, E (Z^x)^2 = 2.  GIA (A^T independent of A): 0 and 1.

Run:  python derivations/ata_v.py [--width 4000 --seeds 8]
"""
import sys

import numpy as np

import symntk
from _gia_vs_exact import arguments, mean_sem, moment_case
from symntk import examples

if __name__ == "__main__":
    args = arguments(__doc__, width=4000)
    program = examples.ata_v()
    v = next(n for n in program.nodes if getattr(n, "name", None) == "v")
    x = program.output.vector
    print(symntk.gia_check(program))
    for mode in ("gia", "exact"):
        print(f"% {mode} derivation of the readout kernel")
        print(symntk.derive(program, mode=mode).latex(highlight_zdot=True))
    ev = {m: symntk.expectation(program, lambda Z, dZ: Z(v) * Z(x), m) for m in ("gia", "exact")}
    ex = {m: symntk.expectation(program, lambda Z, dZ: Z(x) ** 2, m) for m in ("gia", "exact")}
    n, vx, xx = args.width, [], []
    for seed in range(args.seeds):          # independent NumPy simulation
        rng = np.random.default_rng(seed)
        A = rng.standard_normal((n, n)) / np.sqrt(n)
        vv = rng.standard_normal(n)
        xv = A.T @ (A @ vv)
        vx.append(vv @ xv / n)
        xx.append(xv @ xv / n)
    ok = moment_case(f"width {n}, {args.seeds} seeds", [
        ("E Z^v Z^x", ev["exact"], ev["gia"], *mean_sem(vx)),
        ("E (Z^x)^2", ex["exact"], ex["gia"], *mean_sem(xx))])
    sys.exit(0 if ok else 1)
