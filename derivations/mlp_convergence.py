"""NTK4A-style deviation-vs-width study for depth-3 ReLU and erf MLPs (TP2 Fig. 1).

For each width n in 64..4096 and each seed, sample the MLP, form its empirical NTK on N random
inputs (symntk.finite) and measure ||Theta_n - Theta_inf||_F / ||Theta_inf||_F against the
infinite-width NTK derived from the same program (symntk.derive).  Prints the table and the fitted
log-log slopes (CLT rate: -1/2) and writes ``derivations/out/mlp_convergence.png``.
(tests/test_finite.py checks the same against an independent hand-written NT recursion.)

Run:  python derivations/mlp_convergence.py [--seeds 40] [--out PATH]   (about 50 s on 2 cores)
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

import symntk

ROOT = pathlib.Path(__file__).resolve().parents[1]

CASES = {"ReLU": ("relu", 1.4, 0.3), "erf": ("erf", 1.6, 0.2)}   # activation, W_std, b_std


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40, help="seeds per width (default 40)")
    parser.add_argument("--inputs", type=int, default=32, help="number of inputs N (default 32)")
    parser.add_argument("--max-log2-width", type=int, default=12, help="largest width 2^k (default 12)")
    parser.add_argument("--out", type=pathlib.Path,
                        default=ROOT / "derivations" / "out" / "mlp_convergence.png")
    args = parser.parse_args(argv)

    X = np.random.default_rng(2020).standard_normal((args.inputs, 10))
    widths = 2 ** np.arange(6, args.max_log2_width + 1)
    records = []
    for label, (act, sw, sb) in CASES.items():
        program = symntk.mlp(3, act, weight_std=sw, bias_std=sb)
        start = time.perf_counter()
        record = symntk.convergence(program, X, widths, args.seeds, label=f"{label} MLP, depth 3")
        print(record.table())
        print(f"[{time.perf_counter() - start:.1f} s]\n")
        records.append(record)

    print("fitted slopes (CLT rate -0.5):")
    ok = True
    for r in records:
        ok &= -0.6 <= r.slope <= -0.4
        print(f"  {r.label:<20} {r.slope:+.3f} +- {r.slope_stderr:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        symntk.plot_convergence(records, args.out, title=f"Depth-3 MLPs, N={args.inputs} inputs, "
                                                          f"{args.seeds} seeds per width")
        print(f"figure written to {args.out}")
    except ImportError as exc:
        print(f"no figure: {exc}")
    print("all checks passed" if ok else "SLOPE OUTSIDE [-0.6, -0.4]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
