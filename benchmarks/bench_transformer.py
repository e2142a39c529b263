"""NTK4A's Transformer NTK (TP2 App. E.5): the generated Numba kernel against a vectorised NumPy
implementation of the same formulas, in one process.

    python benchmarks/bench_transformer.py [--n 200] [--t 16] [--d 16] [--depth 2]

Prints wall times (compile excluded: one warm-up call on a small batch first), their ratio, the
largest relative difference between the two Gram matrices, and tracemalloc's peak during each
call against the output matrices' size.  The NumPy baseline,
:func:`symntk.attention.ntk4a_vectorised`, holds every (M, T, M, T) kernel of every layer and
applies the per-sequence attention matrices as (M, T, T) blocks (einsum, M^2 T^3 per product).
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import symntk
from symntk.attention import ntk4a_vectorised, transformer


def timed(fn, repeat=3):
    best, out = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--t", type=int, default=16)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--sigma-u2", type=float, default=2.0)
    args = ap.parse_args(argv)
    X = np.random.default_rng(0).standard_normal((args.n, args.t, args.d))
    k = symntk.derive(transformer(args.depth, sigma_u2=args.sigma_u2)).compile()
    start = time.perf_counter()
    k(X[:4])
    print(f"compile + first call: {time.perf_counter() - start:.1f} s")
    t_gen, m_gen, r = timed(lambda: k(X))
    t_np, m_np, (nngp, ntk) = timed(lambda: ntk4a_vectorised(X, args.depth, args.sigma_u2),
                                    repeat=1)
    out_bytes = 2 * args.n ** 2 * 8
    err = max(np.abs(r.ntk - ntk).max() / np.abs(ntk).max(),
              np.abs(r.nngp - nngp).max() / np.abs(nngp).max())
    print(f"N = {args.n} sequences of T = {args.t} tokens (d = {args.d}), depth {args.depth}")
    print(f"generated Numba: {t_gen:.2f} s   peak {m_gen / out_bytes:.2f}x outputs")
    print(f"NumPy vectorised: {t_np:.2f} s   peak {m_np / out_bytes:.0f}x outputs "
          f"({m_np / 2 ** 20:.0f} MB)")
    print(f"NumPy / generated: {t_np / t_gen:.1f}x   max relative difference {err:.1e}")


if __name__ == "__main__":
    main()
