"""Expectations without a closed form: Mehler's formula against the 2-D polar rule.

    python benchmarks/bench_quadrature.py            # tanh depth 3, N = 1000 (~1 min: the polar rule)
    python benchmarks/bench_quadrature.py --quick    # N = 300

Network ``symntk.mlp(3, act, weight_std=sqrt(2), bias_std=0.1)``, X ~ N(0, 1) of dimension
d = 100, ``k(X)`` (Gram matrix, symmetric).  In one process, interleaved, median of the repeats:

* ``mehler``: the default compiled kernel: separable smooth 2-D expectations by Mehler's formula
  from per-input Hermite coefficients (``symntk.codegen.mehler``), the 2-D rule where the
  series' error bound fails;
* ``polar``: the same kernel compiled with ``mehler=False``: every 2-D expectation by the default
  polar rule (32 radial x 24 angular nodes per arc), the default before Mehler's formula.

Also printed: compile times (cold only if the kernel cache is empty) and the largest difference
between the two results relative to the largest entry.  How many pairs fall back to the 2-D rule
(correlations near +-1) depends on the data; it is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import sympy as sp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import symntk  # noqa: E402


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 300")
    ap.add_argument("--act", default="tanh")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    n = 300 if args.quick else 1000
    X = np.random.default_rng(0).normal(size=(n, 100))
    d = symntk.derive(symntk.mlp(args.depth, args.act, weight_std=sp.sqrt(2), bias_std=0.1))
    t_cm, km = timed(d.compile)
    t_cp, kp = timed(lambda: d.compile(mehler=False))
    km(X[:20])
    kp(X[:20])
    tm, tp = [], []
    for _ in range(args.reps):
        t, rm = timed(km, X)
        tm.append(t)
        t, rp = timed(kp, X)
        tp.append(t)
    row = {"act": args.act, "depth": args.depth, "N": n, "mehler": statistics.median(tm),
           "polar": statistics.median(tp), "compile_mehler": t_cm, "compile_polar": t_cp,
           "max_rel_diff_ntk": float(np.abs(rm.ntk - rp.ntk).max() / np.abs(rp.ntk).max()),
           "max_rel_diff_nngp": float(np.abs(rm.nngp - rp.nngp).max() / np.abs(rp.nngp).max())}
    row["polar / mehler"] = row["polar"] / row["mehler"]
    print(json.dumps(row))
    print(f"{args.act} depth {args.depth}, N = {n}: mehler {row['mehler']:.3f} s, polar "
          f"{row['polar']:.3f} s ({row['polar / mehler']:.1f}x); max |diff| / max: ntk "
          f"{row['max_rel_diff_ntk']:.1e}, nngp {row['max_rel_diff_nngp']:.1e}")


if __name__ == "__main__":
    main()
