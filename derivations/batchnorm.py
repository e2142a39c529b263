"""The NTK4A BatchNorm-ReLU network (TP2 App. E.4, Fig. 1): derived, evaluated, and held against
finite-width networks (relative Frobenius deviation vs width, expected slope -1/2).

Network (NTK4A ``Batchnorm-NTK``): h^1 = W^1 xi, x^l = relu(BN(h^l)) over the batch (epsilon = 0,
biased batch variance), h^{l+1} = W^{l+1} x^l, f = v^T x^L / sqrt(n), no biases, TP
parametrization (``symntk.batchnorm_mlp(depth, parametrization="tp")``).  Two batches of 8 and 6
Gaussian inputs in dimension 13 (NTK4A: 7 and 5 projected CIFAR images; batches of <= 5 have an
empirical NTK of infinite variance, so larger ones are used here).  The deviation is NTK4A's
combined one, sqrt(|D11|^2 + |D22|^2 + 2|D12|^2) / sqrt(|T11|^2 + |T22|^2 + 2|T12|^2).

Run:  python derivations/batchnorm.py [--quick] [--seeds S] [--out DIR]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

import symntk


def combined(A11, A22, A12):
    return np.sqrt(np.sum(A11 ** 2) + np.sum(A22 ** 2) + 2 * np.sum(A12 ** 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 2^6..2^10, 4 seeds")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="directory for the plot")
    args = parser.parse_args(argv)
    seeds = args.seeds or (4 if args.quick else 10)
    widths = 2 ** np.arange(6, 11 if args.quick else 12)

    rng = np.random.default_rng(2020)
    X1, X2 = rng.standard_normal((8, 13)), rng.standard_normal((6, 13))
    ok = True
    rows = {}
    for depth in (1, 2):
        program = symntk.batchnorm_mlp(depth, input_dim=13, parametrization="tp")
        d = symntk.derive(program)
        print(f"== depth {depth}: {d!r}")
        print(d.latex())
        t0 = time.perf_counter()
        k11, k22, k12 = (symntk.kernel(program, X1), symntk.kernel(program, X2),
                         symntk.kernel(program, X1, X2))
        print(f"theory: {time.perf_counter() - t0:.2f} s; |Theta11| = {np.linalg.norm(k11.ntk):.6f}, "
              f"|Theta22| = {np.linalg.norm(k22.ntk):.6f}, |Theta12| = {np.linalg.norm(k12.ntk):.6f}")
        norm = combined(k11.ntk, k22.ntk, k12.ntk)
        devs = []
        for width in widths:
            rel = []
            for seed in range(seeds):
                net = symntk.sample(program, int(width), seed=seed)
                e11, e22, e12 = net.ntk(X1), net.ntk(X2), net.ntk(X1, X2)
                rel.append(combined(e11.ntk - k11.ntk, e22.ntk - k22.ntk, e12.ntk - k12.ntk) / norm)
            devs.append((np.mean(rel), np.std(rel, ddof=1) / np.sqrt(seeds)))
            print(f"  width {int(width):5d}: relative deviation {devs[-1][0]:.4f} +- {devs[-1][1]:.4f}")
        slope = np.polyfit(np.log(widths), np.log([m for m, _ in devs]), 1)[0]
        print(f"  log-log slope {slope:.3f} (CLT rate -1/2)")
        if not -0.75 < slope < -0.3:
            print("  slope outside (-0.75, -0.3): DISAGREES")
            ok = False
        rows[depth] = devs
    if args.out is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            fig, ax = plt.subplots(figsize=(5, 4))
            for depth, devs in rows.items():
                m = np.array([v for v, _ in devs])
                e = np.array([s for _, s in devs])
                ax.errorbar(widths, m, yerr=1.96 * e, marker="o", label=f"BN-ReLU depth {depth}")
            ax.plot(widths, rows[1][0][0] * (widths / widths[0]) ** -0.5, "k--", label="width^-1/2")
            ax.set(xscale="log", yscale="log", xlabel="width", ylabel="relative Frobenius deviation")
            ax.legend()
            fig.savefig(args.out / "batchnorm_deviation.png", dpi=120, bbox_inches="tight")
            print(f"plot: {args.out / 'batchnorm_deviation.png'}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
