"""Simple erf RNN NTK (NTK4A's network): the generated Numba kernel against a vectorised NumPy
implementation of the same recursion (TP2 App. E.2), in one process.

    python benchmarks/bench_rnn.py [--n 500] [--t 20] [--d 16]

Prints wall times, their ratio, the largest difference between the two Gram matrices, and the
peak memory the compiled call added (tracemalloc sees NumPy allocations) against the output
matrices' size.  The NumPy baseline evaluates every (t, r) step for a block of rows of the Gram
matrix at once with the closed forms of V_erf and V_erf' (Williams 1997).
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import sympy as sp

import symntk
from symntk import Bias, Input, Program, Readout, Weight, nonlin
from symntk.program import Pool, scan

VW, VU, VB, VV = 1.0, 2.0, 0.2, 1.0


def program(d: int) -> Program:
    a = sp.Symbol("a", real=True)
    xi = Input("xi", d, positions="t")
    W, U = Weight("W", variance=VW, parametrization="tp"), Weight("U", fan_in=d, variance=VU,
                                                                  parametrization="tp")
    b = Bias("b", variance=sp.Rational(1, 5), parametrization="tp")
    s = scan(lambda p: nonlin(sp.Lambda(a, sp.erf(a)), (W @ p + U @ xi + b).named("h"), name="s"),
             "t", name="s")
    return Program(Readout(Weight("v", fan_out=1, variance=VV, parametrization="tp"),
                           Pool(s, "mean")))


def numpy_ntk(X, block=100):
    """The mean-pooled erf RNN NTK, vectorised over a block of rows x all columns per (t, r)."""
    N, T, d = X.shape
    q = np.zeros((N, T + 1))                      # Sigma^{t,t}(x, x), diagonal recursion
    c = np.zeros((N, T + 1))
    for t in range(1, T + 1):
        q[:, t] = VW * c[:, t - 1] + VU * np.einsum("nd,nd->n", X[:, t - 1], X[:, t - 1]) / d + VB
        c[:, t] = 2 / np.pi * np.arcsin(2 * q[:, t] / (1 + 2 * q[:, t]))
    out = np.zeros((N, N))
    for lo in range(0, N, block):
        A = X[lo:lo + block]
        n = len(A)
        C = np.zeros((T + 1, T + 1, n, N))
        Dd = np.zeros((T + 2, T + 2, n, N))
        K = np.einsum("atd,brd->trab", A, X) / d
        for t in range(1, T + 1):
            qa = 1 + 2 * q[lo:lo + n, t][:, None]
            for r in range(1, T + 1):
                S = VW * C[t - 1, r - 1] + VU * K[t - 1, r - 1] + VB
                qb = 1 + 2 * q[:, r][None, :]
                C[t, r] = 2 / np.pi * np.arcsin(np.clip(2 * S / np.sqrt(qa * qb), -1, 1))
                Dd[t, r] = 4 / np.pi / np.sqrt(qa * qb - 4 * S ** 2)
        Dh = np.zeros((T + 2, T + 2, n, N))
        theta = np.zeros((n, N))
        for t in range(T, 0, -1):
            for r in range(T, 0, -1):
                Dh[t, r] = Dd[t, r] * (VV / T ** 2 + VW * Dh[t + 1, r + 1])
                theta += Dh[t, r] * (C[t - 1, r - 1] + K[t - 1, r - 1] + 1)
        theta += C[1:, 1:].sum(axis=(0, 1)) / T ** 2
        out[lo:lo + n] = theta
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--t", type=int, default=20)
    ap.add_argument("--d", type=int, default=16)
    args = ap.parse_args()
    X = np.random.default_rng(0).standard_normal((args.n, args.t, args.d))
    k = symntk.derive(program(args.d)).compile()
    k(X[:3])                                         # compile (or load from the cache)
    tracemalloc.start()
    t0 = time.perf_counter()
    K = k(X)
    t_gen = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t0 = time.perf_counter()
    R = numpy_ntk(X)
    t_np = time.perf_counter() - t0
    outputs = (2 + len(K.ntk_terms)) * K.ntk.nbytes
    print(f"N={args.n} T={args.t} d={args.d}: generated {t_gen:.2f} s, NumPy {t_np:.2f} s, "
          f"ratio {t_np / t_gen:.1f}x; max |diff| {np.abs(K.ntk - R).max():.1e}")
    print(f"peak traced memory of the compiled call {peak / 2**20:.1f} MiB = "
          f"{peak / outputs:.2f}x the output matrices ({outputs / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
