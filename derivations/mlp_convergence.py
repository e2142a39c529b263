"""NTK4A-style deviation-vs-width study for depth-3 ReLU and erf MLPs (theory §6.4, TP2 Fig. 1).

For each width n in 64..4096 and each seed, sample the MLP, form its empirical NTK on N random
inputs (symntk.finite) and measure ||Theta_n - Theta_inf||_F / ||Theta_inf||_F against the
infinite-width NTK.  Prints the table and the fitted log-log slopes (CLT rate: -1/2) and writes
``derivations/out/mlp_convergence.png``.

The reference Theta_inf is ``symntk.derive(program).gram(X).ntk`` when the derivation engine is
available *and* agrees with the Neural Tangents recursion below (theory §2.5, closed forms §5);
otherwise the recursion is used and the script says so.

Run:  python derivations/mlp_convergence.py [--seeds 40] [--out PATH]   (about 50 s on 2 cores)
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from sympy import Lambda, Max, Symbol, erf

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from symntk.builders import mlp  # noqa: E402
from symntk.convergence import convergence, plot_convergence  # noqa: E402

x = Symbol("x", real=True)


def relu_expectations(s11, s22, s12):
    """E relu relu and E step step (arc-cosine kernels of order 1 and 0, halved; TP2 Fact E.2)."""
    norm = np.sqrt(s11 * s22)
    c = np.clip(s12 / norm, -1.0, 1.0)
    theta = np.arccos(c)
    return (norm * (np.sqrt(1 - c * c) + (np.pi - theta) * c) / (2 * np.pi),
            (np.pi - theta) / (2 * np.pi))


def erf_expectations(s11, s22, s12):
    """E erf erf and E erf' erf' (Williams 1997; TP2 Fact E.3)."""
    a, b = 1 + 2 * s11, 1 + 2 * s22
    return 2 / np.pi * np.arcsin(2 * s12 / np.sqrt(a * b)), 4 / np.pi / np.sqrt(a * b - 4 * s12 ** 2)


def nt_ntk(X, depth, expectations, sw, sb):
    """Theta^{L+1} of the NT recursion (theory §2.5) for mlp(depth, ...) with a readout bias."""
    sigma = sw ** 2 * X @ X.T / X.shape[1] + sb ** 2
    theta = sigma.copy()
    for _ in range(depth):
        q = np.diag(sigma)
        e_phi, e_dphi = expectations(q[:, None], q[None, :], sigma)
        sigma = sw ** 2 * e_phi + sb ** 2
        theta = sigma + sw ** 2 * theta * e_dphi
    return theta


CASES = {  # name: (activation Lambda, registry name, expectations, weight_std, bias_std)
    "ReLU": (Lambda(x, Max(0, x)), "relu", relu_expectations, 1.4, 0.3),
    "erf": (Lambda(x, erf(x)), "erf", erf_expectations, 1.6, 0.2),
}


def reference(program_by_name, X, fallback):
    """symntk.derive if it runs and agrees with the recursion to 1e-6, else the recursion."""
    try:
        import symntk
        derived = np.asarray(symntk.derive(program_by_name).gram(X).ntk, dtype=float)
    except Exception as exc:  # the engine is optional here: report why it was not used
        return fallback, f"NT recursion (symntk.derive unavailable: {type(exc).__name__}: {exc})"
    gap = np.max(np.abs(derived - fallback)) / np.max(np.abs(fallback))
    if gap > 1e-6:
        return fallback, f"NT recursion (symntk.derive disagrees with it: max rel. gap {gap:.2e})"
    return derived, f"symntk.derive (agrees with the NT recursion to {gap:.1e})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40, help="seeds per width (default 40)")
    parser.add_argument("--inputs", type=int, default=32, help="number of inputs N (default 32)")
    parser.add_argument("--max-log2-width", type=int, default=12, help="largest width 2^k (default 12)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "derivations" / "out" / "mlp_convergence.png")
    args = parser.parse_args(argv)

    X = np.random.default_rng(2020).standard_normal((args.inputs, 10))
    widths = 2 ** np.arange(6, args.max_log2_width + 1)
    records = []
    for label, (act, registry_name, expectations, sw, sb) in CASES.items():
        fallback = nt_ntk(X, 3, expectations, sw, sb)
        try:
            by_name = mlp(3, registry_name, sw, sb)
        except Exception:  # activation registry not available: derive the Lambda program
            by_name = mlp(3, act, sw, sb)
        ref, source = reference(by_name, X, fallback)
        start = time.perf_counter()
        record = convergence(mlp(3, act, sw, sb), X, widths, args.seeds, ref,
                             label=f"{label} MLP, depth 3")
        print(f"\nreference: {source}")
        print(record.table())
        print(f"[{time.perf_counter() - start:.1f} s]")
        records.append(record)

    print("\nfitted slopes (CLT rate -0.5):")
    for r in records:
        print(f"  {r.label:<20} {r.slope:+.3f} +- {r.slope_stderr:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        plot_convergence(records, args.out,
                         title=f"Depth-3 MLPs, N={args.inputs} inputs, {args.seeds} seeds per width")
        print(f"figure written to {args.out}")
    except ImportError as exc:
        print(f"no figure: {exc}")


if __name__ == "__main__":
    main()
