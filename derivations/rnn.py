"""The NTK4A simple RNN (TP2 §6.2.1, App. E.2), derived, printed, evaluated and held against
finite-width networks of the same program.

    s^t = erf(W s^{t-1} + U xi^t + b),  t = 1..T,  s^0 = 0,
    f = v . s^T / sqrt(n)   (last state)   or   f = v . (1/T) sum_t s^t / sqrt(n)   (mean pool),

sigma_W^2 = 1, sigma_U^2 = 2, sigma_b^2 = 0.2, sigma_v^2 = 1, every parameter trained directly
(the TP convention, as in NTK4A's notebook; no readout bias).  The script

1. derives both readouts and prints the recursion in (t, r) in LaTeX (one equation per kernel,
   whatever the lengths);
2. evaluates the NTK on sequences of unequal lengths with the compiled kernel and with the NumPy
   reference evaluator (they must agree to 1e-12);
3. measures the deviation of the exact empirical NTK of width-n networks from it for
   n = 64..4096 (the NTK4A figure: slope -1/2 on log-log axes) and writes
   ``derivations/out/rnn_convergence.png``.

Run:  python derivations/rnn.py [--seeds 6] [--out DIR]   (about a minute on 2 cores)
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

import symntk

ROOT = pathlib.Path(__file__).resolve().parents[1]
NTK4A = dict(weight_std=1.0, input_std=np.sqrt(2.0), bias_std=np.sqrt(0.2), readout_std=1.0,
             parametrization="tp", readout_bias=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds per width (default 6)")
    parser.add_argument("--max-log2-width", type=int, default=12, help="largest width 2^k")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "derivations" / "out")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(2020)
    d = 3                                        # NTK4A: RGB pixels as tokens
    X1, X2 = rng.standard_normal((3, 5, d)), rng.standard_normal((2, 4, d))   # T = 5, Tbar = 4
    X = rng.standard_normal((4, 5, d))
    ok = True
    records = []
    for readout in ("mean", "last"):
        program = symntk.rnn("erf", readout=readout, input_dim=d, **NTK4A)
        start = time.perf_counter()
        derivation = symntk.derive(program)
        print(f"== readout {readout!r}: {len(derivation.equations)} equations, derived in "
              f"{time.perf_counter() - start:.1f} s; {symntk.gia_check(program)}")
        print(derivation.latex())
        compiled = derivation.compile()(X1, X2)
        reference = derivation.gram(X1, X2)
        err = np.abs(compiled.ntk - reference.ntk).max() / np.abs(reference.ntk).max()
        print(f"NTK(X1, X2), T = 5 vs Tbar = 4:\n{np.array2string(compiled.ntk, precision=6)}")
        print(f"compiled kernel vs NumPy reference evaluator: max relative difference {err:.1e}")
        ok &= err < 1e-12
        widths = 2 ** np.arange(6, args.max_log2_width + 1)
        start = time.perf_counter()
        record = symntk.convergence(program, X, widths, args.seeds, label=f"RNN, {readout} readout")
        print(record.table())
        print(f"[{time.perf_counter() - start:.1f} s] slope {record.slope:+.3f} "
              f"+- {record.slope_stderr:.3f} (CLT rate -1/2)\n")
        ok &= -0.75 <= record.slope <= -0.3
        records.append(record)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rnn_convergence.png"
    try:
        symntk.plot_convergence(records, path, title=f"NTK4A simple RNN (erf), {len(X)} sequences "
                                                     f"of 5 tokens, {args.seeds} seeds per width")
        print(f"figure written to {path}")
    except ImportError as exc:
        print(f"no figure: {exc}")
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
