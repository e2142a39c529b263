"""The semicircle program (TP3 §3): moments of A = W + W^T are Catalan numbers.

W ~ N(0, 1/(2n)), z^t = W z^{t-1} + W^T z^{t-1}, z^0 ~ N(0, 1): E Z^{z^0} Z^{z^t} = 1, 0, 1, 0, 2,
0, 5, 0, 14 for t = 0..8 by the exact Zhat + Zdot calculus; GIA (W^T independent of W) misses
every Zdot correction.

Run:  python derivations/semicircle.py [--width 4000 --seeds 8]
"""
import sys

import numpy as np

import symntk
from _gia_vs_exact import arguments, mean_sem, moment_case
from symntk import examples

T = 8

if __name__ == "__main__":
    args = arguments(__doc__, width=4000)
    program, z = examples.semicircle(T)
    print(symntk.gia_check(program))
    exact = [symntk.expectation(program, lambda Z, dZ, t=t: Z(z[0]) * Z(z[t]), "exact")
             for t in range(T + 1)]
    gia = [symntk.expectation(program, lambda Z, dZ, t=t: Z(z[0]) * Z(z[t]), "gia")
           for t in range(T + 1)]
    n, samples = args.width, []
    for seed in range(args.seeds):          # independent NumPy simulation
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((n, n)) / np.sqrt(2 * n)
        A = W + W.T
        z0 = rng.standard_normal(n)
        zt, row = z0, []
        for t in range(T + 1):
            row.append(z0 @ zt / n)
            zt = A @ zt
        samples.append(row)
    samples = np.array(samples)
    rows = [(f"E Z^(z0) Z^(z{t})", exact[t], gia[t], *mean_sem(samples[:, t])) for t in range(T + 1)]
    ok = moment_case(f"width {n}, {args.seeds} seeds", rows)
    sys.exit(0 if ok else 1)
