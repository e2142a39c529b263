"""Compiled kernels against hand-written Numba and vectorised NumPy.

    python benchmarks/bench_kernels.py            # the full table (a few minutes on 2 cores)
    python benchmarks/bench_kernels.py --quick    # N = 500 only, a smoke run

Every number of a row is measured in this one process, interleaved, median of the repeats:

* ``generated``: ``symntk.compile(derive(mlp(...)))(X)`` -- the whole call: per-input pass,
  BLAS input kernel, pairs (j > i), mirror, exact diagonal;
* ``hand numba``: the same MLP recursion written by hand (TP2 Eqs. 6-9; Jacot / Neural Tangents
  conventions) with the generated code's loop structure: per-input diagonal, single-threaded
  BLAS staging, prange over rows of j > i, columns in chunks of 128 with every layer an innermost
  loop over the chunk, the same polynomial ``acos``/``asin`` (so LLVM vectorises it), the same
  mirror;
* ``hand scalar``: the textbook hand-written Numba kernel, one pair at a time with libm's
  ``math.acos``/``math.asin`` (what one writes first; not vectorised);
* ``numpy ref``: ``symntk.evaluate.gram`` (the lambdified reference evaluator);
* ``numpy hand``: the recursion vectorised over all (N, N) pairs by hand.

Peak memory is ``tracemalloc``'s peak during the call (NumPy allocations; the jitted code's
per-row scratch is a few hundred bytes per thread), as a multiple of the two output matrices.
Cold start = derive + generate + compile in a new process with an empty cache; warm start =
the same in a new process with the cache filled (Numba cache hits), reported both inside the
process (from ``import symntk``) and as the whole subprocess wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import sympy as sp
from numba import njit, prange

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import symntk  # noqa: E402
from symntk import codegen  # noqa: E402
from symntk.kernels import _mirror, _quiet_blas  # noqa: E402  (the generated path's, for fairness)

SW2, SB2 = 2.0, 0.01          # weight_std = sqrt(2), bias_std = 0.1
D = 100


# ================================================================= hand-written Numba (ReLU, erf)
_P = codegen.ASIN_COEFFS


@njit(cache=True)
def _asin_small(s, z):
    p = _P[12]
    for k in range(11, -1, -1):
        p = p * z + _P[k]
    return s + s * z * p


@njit(cache=True)
def _vacos(x):
    """acos by the same polynomial as the generated code (vectorisable)."""
    x = min(1.0, max(-1.0, x))
    a = abs(x)
    big = a > 0.5
    z = 0.5 * (1.0 - a) if big else a * a
    r = _asin_small(math.sqrt(z) if big else a, z)
    return (2.0 * r if x > 0.0 else math.pi - 2.0 * r) if big else \
        0.5 * math.pi - (r if x >= 0.0 else -r)


@njit(cache=True)
def _vasin(x):
    x = min(1.0, max(-1.0, x))
    a = abs(x)
    big = a > 0.5
    z = 0.5 * (1.0 - a) if big else a * a
    r = _asin_small(math.sqrt(z) if big else a, z)
    v = 0.5 * math.pi - 2.0 * r if big else r
    return v if x >= 0.0 else -v


@njit(cache=True, parallel=True)
def _relu_pairs_chunked(S, RS, ST, RST, sw2, sb2, depth, nngp, ntk, gscale):
    """The arc-cosine recursion, a chunk of columns at a time (ST, RST: transposed tables)."""
    n = ntk.shape[0]
    B = 128
    for ii in prange(n):
        i = ii // 2 if ii % 2 == 0 else n - 1 - ii // 2
        s = np.empty(B)
        th = np.empty(B)
        for jb in range(i + 1, n, B):
            nb = min(B, n - jb)
            for jj in range(nb):
                s[jj] = sw2 * ntk[i, jb + jj] * gscale + sb2
                th[jj] = s[jj]
            for l in range(depth):
                rsi, sqi = RS[i, l], math.sqrt(S[i, l])
                for jj in range(nb):
                    c = min(1.0, max(-1.0, s[jj] * rsi * RST[l, jb + jj]))
                    t = math.pi - _vacos(c)
                    v = sqi * math.sqrt(ST[l, jb + jj]) * (math.sqrt(max(0.0, 1.0 - c * c))
                                                           + t * c) / (2.0 * math.pi)
                    s2 = sw2 * v + sb2
                    th[jj] = s2 + sw2 * th[jj] * t / (2.0 * math.pi)
                    s[jj] = s2
            for jj in range(nb):
                nngp[i, jb + jj] = s[jj]
                ntk[i, jb + jj] = th[jj]


@njit(cache=True, parallel=True)
def _erf_pairs_chunked(S, RS, ST, RST, sw2, sb2, depth, nngp, ntk, gscale):
    n = ntk.shape[0]
    B = 128
    for ii in prange(n):
        i = ii // 2 if ii % 2 == 0 else n - 1 - ii // 2
        s = np.empty(B)
        th = np.empty(B)
        for jb in range(i + 1, n, B):
            nb = min(B, n - jb)
            for jj in range(nb):
                s[jj] = sw2 * ntk[i, jb + jj] * gscale + sb2
                th[jj] = s[jj]
            for l in range(depth):
                rsi, si = RS[i, l], S[i, l]
                for jj in range(nb):
                    a = 2.0 * s[jj] * rsi * RST[l, jb + jj]
                    v = 2.0 / math.pi * _vasin(a)
                    vd = 4.0 / math.pi / math.sqrt(max(0.0, si * ST[l, jb + jj]
                                                         - 4.0 * s[jj] * s[jj]))
                    s2 = sw2 * v + sb2
                    th[jj] = s2 + sw2 * th[jj] * vd
                    s[jj] = s2
            for jj in range(nb):
                nngp[i, jb + jj] = s[jj]
                ntk[i, jb + jj] = th[jj]

@njit(cache=True)
def _relu_diag(q, sw2, sb2, depth, S, RS, dnngp, dntk):
    """Per input: Sigma^l(x, x) and 1/sqrt of it; the exact diagonal (V(q,q,q) = q/2)."""
    for i in range(q.shape[0]):
        s = sw2 * q[i] + sb2
        th = s
        for l in range(depth):
            S[i, l] = s
            RS[i, l] = 1.0 / math.sqrt(s) if s > 0.0 else 0.0
            s2 = sw2 * 0.5 * s + sb2
            th = s2 + sw2 * th * 0.5
            s = s2
        dnngp[i] = s
        dntk[i] = th


@njit(cache=True, parallel=True)
def _relu_pairs(S, RS, sw2, sb2, depth, nngp, ntk, gscale):
    """Theta^{l+1} = Sigma^{l+1} + sw2 Theta^l dSigma^l, arc-cosine closed forms."""
    n = ntk.shape[0]
    for ii in prange(n):
        i = ii // 2 if ii % 2 == 0 else n - 1 - ii // 2
        for j in range(i + 1, n):
            s = sw2 * ntk[i, j] * gscale + sb2
            th = s
            for l in range(depth):
                c = min(1.0, max(-1.0, s * RS[i, l] * RS[j, l]))
                t = math.pi - math.acos(c)
                v = math.sqrt(S[i, l] * S[j, l]) * (math.sqrt(max(0.0, 1.0 - c * c)) + t * c) \
                    / (2.0 * math.pi)
                s2 = sw2 * v + sb2
                th = s2 + sw2 * th * t / (2.0 * math.pi)
                s = s2
            nngp[i, j] = s
            ntk[i, j] = th


@njit(cache=True)
def _erf_diag(q, sw2, sb2, depth, S, RS, dnngp, dntk):
    for i in range(q.shape[0]):
        s = sw2 * q[i] + sb2
        th = s
        for l in range(depth):
            S[i, l] = 1.0 + 2.0 * s
            RS[i, l] = 1.0 / math.sqrt(1.0 + 2.0 * s)
            s2 = sw2 * 2.0 / math.pi * math.asin(2.0 * s / (1.0 + 2.0 * s)) + sb2
            th = s2 + sw2 * th * 4.0 / math.pi / math.sqrt(1.0 + 4.0 * s)
            s = s2
        dnngp[i] = s
        dntk[i] = th


@njit(cache=True, parallel=True)
def _erf_pairs(S, RS, sw2, sb2, depth, nngp, ntk, gscale):
    """Williams' arcsine closed forms (TP2 Fact E.3; Williams 1997)."""
    n = ntk.shape[0]
    for ii in prange(n):
        i = ii // 2 if ii % 2 == 0 else n - 1 - ii // 2
        for j in range(i + 1, n):
            s = sw2 * ntk[i, j] * gscale + sb2
            th = s
            for l in range(depth):
                a = 2.0 * s * RS[i, l] * RS[j, l]
                v = 2.0 / math.pi * math.asin(min(1.0, max(-1.0, a)))
                vd = 4.0 / math.pi / math.sqrt(max(0.0, S[i, l] * S[j, l] - 4.0 * s * s))
                s2 = sw2 * v + sb2
                th = s2 + sw2 * th * vd
                s = s2
            nngp[i, j] = s
            ntk[i, j] = th


def hand_numba(act, X, depth, sw2=SW2, sb2=SB2, chunked=True):
    n, d = X.shape
    q = np.einsum("ij,ij->i", X, X) / d
    S, RS = np.empty((n, depth)), np.empty((n, depth))
    dn, dk = np.empty(n), np.empty(n)
    diag = {"relu": _relu_diag, "erf": _erf_diag}[act]
    diag(q, sw2, sb2, depth, S, RS, dn, dk)
    ntk, nngp = np.empty((n, n)), np.empty((n, n))
    with _quiet_blas():
        np.matmul(X, X.T, out=ntk)
    if chunked:
        pairs = {"relu": _relu_pairs_chunked, "erf": _erf_pairs_chunked}[act]
        pairs(S, RS, np.ascontiguousarray(S.T), np.ascontiguousarray(RS.T), sw2, sb2, depth,
              nngp, ntk, 1.0 / d)
    else:
        pairs = {"relu": _relu_pairs, "erf": _erf_pairs}[act]
        pairs(S, RS, sw2, sb2, depth, nngp, ntk, 1.0 / d)
    for M, dv in ((ntk, dk), (nngp, dn)):
        _mirror(M)
        np.fill_diagonal(M, dv)
    return nngp, ntk


# ======================================================================= hand-written NumPy
def hand_numpy(act, X, depth, sw2=SW2, sb2=SB2):
    """The same recursion on whole (N, N) arrays (the usual vectorised implementation)."""
    n, d = X.shape
    G = X @ X.T / d
    S = sw2 * G + sb2
    th = S.copy()
    for _ in range(depth):
        dg = np.diag(S).copy()
        if act == "relu":
            nrm = np.sqrt(np.outer(dg, dg))
            c = np.clip(S / nrm, -1.0, 1.0)
            t = np.pi - np.arccos(c)
            V = nrm * (np.sqrt(1.0 - c * c) + t * c) / (2 * np.pi)
            Vd = t / (2 * np.pi)
        else:
            a = np.outer(1 + 2 * dg, 1 + 2 * dg)
            V = 2 / np.pi * np.arcsin(np.clip(2 * S / np.sqrt(a), -1, 1))
            Vd = 4 / np.pi / np.sqrt(np.maximum(a - 4 * S * S, 0.0))
        S = sw2 * V + sb2
        th = S + sw2 * th * Vd
    return S, th


# =============================================================================== helpers
def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def peak_of(fn, *args, **kw):
    tracemalloc.start()
    try:
        fn(*args, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def derivation(act, depth):
    return symntk.derive(symntk.mlp(depth, act, weight_std=sp.sqrt(2), bias_std=0.1))


def run_case(act, depth, n, reps, numpy_ref=True, numpy_hand=True, hand=True):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, D))
    d = derivation(act, depth)
    k = d.compile()
    k(X[:50])
    if hand:
        hand_numba(act, X[:50], depth)
        hand_numba(act, X[:50], depth, chunked=False)
    row = {"act": act, "depth": depth, "N": n}
    gen, hnd, hsc = [], [], []
    for _ in range(reps):
        t, r = timed(k, X)
        gen.append(t)
        if hand:
            t, (hn, hk) = timed(hand_numba, act, X, depth)
            hnd.append(t)
            hsc.append(timed(hand_numba, act, X, depth, chunked=False)[0])
    row["generated"] = statistics.median(gen)
    if hand:
        row["hand_numba"] = statistics.median(hnd)
        row["hand_scalar"] = statistics.median(hsc)
        row["agree_hand"] = float(np.max(np.abs(r.ntk - hk)) / np.max(np.abs(hk)))
    out_bytes = r.ntk.nbytes + r.nngp.nbytes
    del r
    row["peak_generated"] = peak_of(k, X) / out_bytes
    if numpy_hand:
        row["numpy_hand"] = min(timed(hand_numpy, act, X, depth)[0]
                                for _ in range(1 if n >= 2000 else 2))
        row["peak_numpy_hand"] = peak_of(hand_numpy, act, X, depth) / out_bytes
    if numpy_ref:
        row["numpy_ref"] = min(timed(d.gram, X)[0] for _ in range(1 if n >= 2000 else 2))
    return row


def run_tanh(n, reps, numpy_n=100):
    """tanh has no closed form: the generated polar quadrature; the NumPy reference is run on
    fewer rows and scaled by the number of pairs (its (N, N, 4096) quadrature arrays need
    ~32 GB at N = 1000)."""
    X = np.random.default_rng(0).normal(size=(n, D))
    d = derivation("tanh", 3)
    rows = []
    for label, opts in [("default (32, 24)", {}),
                        ("low order (16, 12)", dict(radial_order=16, angular_order=12))]:
        k = d.compile(**opts)
        k(X[:20])
        ts = [timed(k, X)[0] for _ in range(reps)]
        rows.append({"act": f"tanh {label}", "depth": 3, "N": n,
                     "generated": statistics.median(ts)})
    t_ref, _ = timed(d.gram, X[:numpy_n])
    rows[0]["numpy_ref"] = t_ref * (n * n) / (numpy_n * numpy_n)
    rows[0]["numpy_ref_note"] = f"measured at N={numpy_n}, scaled by pairs"
    ref = d.compile()(X[:200]).ntk
    low = d.compile(radial_order=16, angular_order=12)(X[:200]).ntk
    rows[1]["accuracy_vs_default"] = float(np.max(np.abs(low - ref) / np.abs(ref)))
    return rows


_START = """
import json, time
t0 = time.perf_counter()
import numpy as np, sympy as sp, symntk
t1 = time.perf_counter()
d = symntk.derive(symntk.mlp(3, "relu", weight_std=sp.sqrt(2), bias_std=0.1))
t2 = time.perf_counter()
k = d.compile()
t3 = time.perf_counter()
k(np.random.default_rng(0).normal(size=(100, 100)))
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "derive": t2 - t1, "compile": t3 - t2, "first_call": t4 - t3,
                  "hits": k.cache_stats()}))
"""


def startup():
    """Cold (empty cache) and warm (cache filled) start-up, each in a new process."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, SYMNTK_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
        for label in ("cold", "warm", "warm2"):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True,
                               text=True, check=True)
            wall = time.perf_counter() - t
            rec = json.loads(p.stdout.strip().splitlines()[-1])
            rec["process_wall"] = wall
            out[label] = rec
    return out


def fmt(x, unit="s"):
    if x is None:
        return "-"
    return f"{x:.3f} {unit}" if unit == "s" else f"{x:.2f}{unit}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 500 only")
    ap.add_argument("--json", help="also write the raw rows to this file")
    args = ap.parse_args(argv)
    Ns = [500] if args.quick else [1000, 2000, 4000]
    reps = 3 if args.quick else 5
    import numba
    rows = []
    for act, depth in [("relu", 3), ("relu", 10), ("erf", 3)]:
        for n in Ns:
            row = run_case(act, depth, n, reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    rows += run_tanh(200 if args.quick else 1000, 1 if args.quick else 2,
                     numpy_n=40 if args.quick else 100)
    for r in rows[-2:]:
        print(json.dumps(r), flush=True)
    st = startup()
    print(json.dumps(st), flush=True)

    print()
    print(f"symntk compiled kernels | numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS}"
          f" threads ({numba.threading_layer()}) | {os.cpu_count()} CPUs | d = {D} | "
          f"median of {reps} (NumPy: best of 1-2)")
    print("| case | N | generated | hand Numba | gen / hand | hand scalar | NumPy ref "
          "(symntk.evaluate) | NumPy hand | NumPy ref / gen | NumPy hand / gen | peak / outputs "
          "(gen, NumPy hand) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, h, hs = r.get("generated"), r.get("hand_numba"), r.get("hand_scalar")
        nr, nh = r.get("numpy_ref"), r.get("numpy_hand")
        star = " *" if "numpy_ref_note" in r else ""
        print(f"| {r['act']} depth {r['depth']} | {r['N']} | {fmt(g)} | {fmt(h)} | "
              f"{fmt(g / h, 'x') if h else '-'} | {fmt(hs)} | {fmt(nr)}{star} | {fmt(nh)} | "
              f"{fmt(nr / g, 'x') if nr else '-'} | {fmt(nh / g, 'x') if nh else '-'} | "
              f"{fmt(r.get('peak_generated'), 'x')}, {fmt(r.get('peak_numpy_hand'), 'x')} |")
    print()
    for label, rec in st.items():
        print(f"{label:5s} start: import {rec['import']:.2f} s + derive {rec['derive']:.2f} s + "
              f"compile {rec['compile']:.2f} s = "
              f"{rec['import'] + rec['derive'] + rec['compile']:.2f} s"
              f" in process, {rec['process_wall']:.2f} s process wall; first call (N=100) "
              f"{rec['first_call']:.3f} s; numba cache {rec['hits']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "startup": st}, fh, indent=1)


if __name__ == "__main__":
    main()
