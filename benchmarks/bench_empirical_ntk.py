"""Empirical NTK: structured contraction vs brute-force per-example Jacobian (symntk.finite).

Default case: depth-3 ReLU MLP with biases, width 2048, N = 256 inputs of dimension
d = 100, NTK parametrization.  Both methods run on the *same* sampled network in the same process;
wall time (best of ``--repeat``) and peak traced memory (tracemalloc, which sees numpy's buffers)
are printed with their ratios, and the two Gram matrices are compared.  Nothing is asserted.

The brute-force path materialises one (N, fan_out * fan_in) Jacobian block at a time: for the
default case the largest block is 256 * 2048^2 * 8 B = 8.6 GB, so it needs ~9 GB of RAM.
``--jacobian-width`` runs the brute force at a smaller width instead (and says so); the
structured path's cost is O(N^2 n + N n^2) and the brute force's O(N^2 n^2), so the ratio grows
about linearly in the width.

Run:  python benchmarks/bench_empirical_ntk.py [--width 2048] [--n 256] [--d 100]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import tracemalloc

import numpy as np
from sympy import Lambda, Max, Symbol

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from symntk.builders import mlp  # noqa: E402
from symntk.finite import sample  # noqa: E402


def measure(fn, repeat: int):
    """(result, best wall time in s, peak traced memory in bytes over the runs)."""
    best, peak, result = np.inf, 0, None
    for _ in range(repeat):
        result = None  # drop the previous result so it is not counted twice
        tracemalloc.start()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return result, best, peak


def gib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 28 else f"{nbytes / 2 ** 20:.1f} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--n", type=int, default=256, help="number of inputs N")
    parser.add_argument("--d", type=int, default=100, help="input dimension")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="repeats of the structured path")
    parser.add_argument("--jacobian-width", type=int, default=None,
                        help="run the brute force at this width instead (if RAM is short)")
    args = parser.parse_args(argv)

    x = Symbol("x", real=True)
    program = mlp(args.depth, Lambda(x, Max(0, x)), weight_std=1.4, bias_std=0.1)
    X = np.random.default_rng(0).standard_normal((args.n, args.d))
    print(f"depth-{args.depth} ReLU MLP, width {args.width}, N = {args.n}, d = {args.d}, float64")

    start = time.perf_counter()
    net = sample(program, args.width, seed=0, input_dim=args.d)
    n_params = sum(p.size for p in net.parameters.values())
    print(f"sampling: {time.perf_counter() - start:.2f} s, {n_params:,} parameters")

    fast, t_fast, m_fast = measure(lambda: net.ntk(X), args.repeat)
    print(f"structured : {t_fast:8.3f} s   peak {gib(m_fast)}")

    jw = args.jacobian_width or args.width
    jnet = net if jw == args.width else sample(program, jw, seed=0, input_dim=args.d)
    jfast = fast if jw == args.width else measure(lambda: jnet.ntk(X), args.repeat)
    if jw != args.width:
        jfast, t_jfast, m_jfast = jfast
        print(f"(brute force at width {jw} instead of {args.width}; structured there: "
              f"{t_jfast:.3f} s, peak {gib(m_jfast)})")
    else:
        t_jfast, m_jfast = t_fast, m_fast
    slow, t_slow, m_slow = measure(lambda: jnet.ntk(X, method="jacobian"), 1)
    print(f"jacobian   : {t_slow:8.3f} s   peak {gib(m_slow)}" + (f"  (width {jw})" if jw != args.width else ""))
    gap = np.max(np.abs(slow.ntk - jfast.ntk)) / np.max(np.abs(jfast.ntk))
    print(f"max relative difference of the two Gram matrices: {gap:.2e}")
    print(f"time ratio   jacobian / structured: {t_slow / t_jfast:8.1f}x")
    print(f"memory ratio jacobian / structured: {m_slow / m_jfast:8.1f}x")
    if jw != args.width:
        # brute force ~ N^2 * (#params) flops and N * (largest block) memory; both ~ width^2
        scale = (args.width / jw) ** 2
        print(f"extrapolated to width {args.width} (x{scale:.0f} in time and memory, the structured "
              f"path measured directly): time ratio ~{t_slow * scale / t_fast:.0f}x, "
              f"jacobian peak ~{gib(m_slow * scale)}")


if __name__ == "__main__":
    main()
