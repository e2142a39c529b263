"""First-call time of a new architecture: fresh processes, empty caches, phase by phase.

    python benchmarks/bench_compile.py                 # relu depth 3 and 10, cold/new/warm
    python benchmarks/bench_compile.py --depths 3 --activation erf

Each row is one new Python process (``subprocess``), so imports and Numba's JIT start from
nothing.  Three starts per architecture:

* ``cold``: empty ``SYMNTK_CACHE_DIR`` *and* empty ``NUMBA_CACHE_DIR`` (nothing compiled, not
  even the package's own precompiled helpers: the very first use after an install);
* ``new``: empty ``SYMNTK_CACHE_DIR``, ``NUMBA_CACHE_DIR`` holding only what *another*
  architecture left there (the package's per-install helpers; the case of a user trying a new
  network);
* ``warm``: both caches filled by the run before (the same architecture again).

Phases, inside the child process (``time.perf_counter``): ``import`` (``import symntk``,
SymPy and Numba included), ``derive``, ``generate`` (SymPy -> module text, or the manifest read on
a warm start), ``load`` (importing the module: Numba decorators only), ``compile`` (the first
call of the jitted functions with the call signatures: LLVM, or Numba's cache read), ``call``
(the first ``k(X)`` after that, N = 100), ``total`` (from the start of the child's ``main``),
``cpu`` (the child's CPU time, all threads: on a loaded machine the figure that carries over),
and the whole subprocess wall time (interpreter start-up included).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(depth: int, activation: str) -> dict:
    """One first call, timed by phase (runs in the fresh process)."""
    t0 = time.perf_counter()
    sys.path.insert(0, ROOT)
    import numpy as np

    import symntk
    from symntk import codegen, kernels
    t1 = time.perf_counter()
    d = symntk.derive(symntk.mlp(depth, activation, 2 ** 0.5, 0.1))
    t2 = time.perf_counter()
    spent = {"generate": 0.0, "load": 0.0}
    made = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                out = fn(*a, **kw)
                if name == "generate":
                    made["gen"] = out
                return out
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper
    codegen.generate = timed("generate", codegen.generate)
    codegen.load_module = timed("load", codegen.load_module)
    k = kernels.compile(d)          # generate, load, warm_up (the jitted functions compile)
    t5 = time.perf_counter()
    gen = made["gen"]
    dim = d.program.inputs[0].dim
    X = np.random.default_rng(0).standard_normal((100, int(dim) if dim.is_Integer else 16))
    k(X)
    t6 = time.perf_counter()
    return {"import": t1 - t0, "derive": t2 - t1, "generate": spent["generate"],
            "load": spent["load"], "compile": t5 - t2 - spent["generate"] - spent["load"],
            "call": t6 - t5, "total": t6 - t0,
            "cpu": time.process_time(), "from_manifest": gen.from_manifest}


def run(depth: int, activation: str, kernel_cache: str, numba_cache: str) -> dict:
    env = dict(os.environ, SYMNTK_CACHE_DIR=kernel_cache, NUMBA_CACHE_DIR=numba_cache,
               PYTHONPATH=ROOT)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(depth),
                          activation], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall"] = wall
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return
    print(f"load average {os.getloadavg()[0]:.1f}; {args.activation}")
    cols = ["import", "derive", "generate", "load", "compile", "call", "total", "cpu", "wall"]
    print(f"{'case':<16}" + "".join(f"{c:>9}" for c in cols))
    base = tempfile.mkdtemp(prefix="bench_compile_")
    try:
        numba_shared = os.path.join(base, "numba_shared")
        for depth in args.depths:
            kc = os.path.join(base, f"kernels_{depth}")
            nc = os.path.join(base, f"numba_{depth}")
            rows = [("cold", run(depth, args.activation, kc, nc))]
            shutil.rmtree(kc)                    # a new architecture: only helpers compiled
            # "new": the per-install helpers compiled by some other architecture before
            other = 5 if depth != 5 else 4
            kc_other = os.path.join(base, f"kernels_other_{depth}")
            if not os.path.isdir(numba_shared):
                run(other, args.activation, kc_other, numba_shared)
            shutil.rmtree(kc_other, ignore_errors=True)
            shared_copy = os.path.join(base, f"numba_shared_{depth}")
            shutil.copytree(numba_shared, shared_copy)
            kc_new = os.path.join(base, f"kernels_new_{depth}")
            rows.append(("new", run(depth, args.activation, kc_new, shared_copy)))
            rows.append(("warm", run(depth, args.activation, kc_new, shared_copy)))
            for nm, r in rows:
                print(f"{f'depth {depth} {nm}':<16}" + "".join(f"{r[c]:>9.2f}" for c in cols))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
