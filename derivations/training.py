"""Trained finite networks vs the infinite-width prediction, on scikit-learn's digits (TP2b Thm. 5.3).

Part 1 (dynamics).  A one-hidden-layer erf network in NTK parametrization, sampled from the same
program the kernel is derived from, is trained by full-batch gradient descent on 64 digits
(target +1 for digits >= 5, -1 otherwise; sum loss, learning rate 1 / lambda_max(Theta)).  For
each width and seed, its test outputs after s steps are compared with the infinite-width
prediction *for that network's initial outputs*, f_0(x) + A_s(x)(Y - f_0(X)) (symntk.predict,
``discrete=True``), which isolates the finite-width error from the randomness of f_0.  The gap
falls like width^{-1/2}; the fitted slope is printed and checked to lie in [-0.7, -0.3].  The
predicted training-loss curve is drawn against the measured one.

Part 2 (accuracy).  Kernel regression (t = inf) with the NTK and the NNGP posterior of a depth-3
ReLU network on 1000 digits (10 one-hot outputs, argmax), against an RBF kernel ridge baseline
whose (gamma, alpha) are chosen by 3-fold cross-validation, and SVC with the NTK as a
precomputed kernel.

Data ship inside scikit-learn (no download).  Run:  python derivations/training.py [--out DIR]
(about a minute on 2 cores; exit code 0 iff every check passes).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matmuls: BLAS threads only contend

import argparse                                        # noqa: E402
import pathlib                                         # noqa: E402
import sys                                             # noqa: E402
import time                                            # noqa: E402

import numpy as np                                     # noqa: E402

import symntk                                          # noqa: E402
from symntk.predict import Predictor                   # noqa: E402
from symntk.training import train                      # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
WIDTHS = (64, 256, 1024, 4096)
STEPS = 200
CURVE = tuple(range(0, STEPS + 1, 5))
CHECK_STEPS = (20, 50, 200)


def digits():
    """Digits as standardized features scaled to ||x||^2 / d = 1, labels, in a fixed order."""
    from sklearn.datasets import load_digits
    data = load_digits()
    X, y = data.data.astype(float), data.target
    X = X[:, X.std(axis=0) > 0]
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    X /= np.sqrt((X ** 2).mean(axis=1, keepdims=True))
    order = np.random.default_rng(0).permutation(len(X))
    return X[order], y[order]


def dynamics(X, y, seeds: int):
    Xtr, Xte = X[:64], X[64:96]
    Y = np.where(y[:64] >= 5, 1.0, -1.0)
    program = symntk.mlp(1, "erf", weight_std=1.5, bias_std=0.3)
    kernel = symntk.derive(program).compile()
    lam = np.linalg.eigvalsh(kernel(Xtr).ntk).max()
    eta = 1.0 / lam
    p = Predictor(kernel, Xtr, Y, learning_rate=eta)
    gaps = np.zeros((len(WIDTHS), seeds, len(CHECK_STEPS)))
    curves = {}
    for i, width in enumerate(WIDTHS):
        start = time.perf_counter()
        for s in range(seeds):
            net = symntk.sample(program, width, seed=s, input_dim=Xtr.shape[1])
            run = train(net, Xtr, Y, learning_rate=eta, steps=STEPS, record=CURVE, X_test=Xte)
            f0, f0t = run.train_outputs[0], run.test_outputs[0]
            for j, t in enumerate(CHECK_STEPS):
                pred = p.gradient_descent(t, Xte, discrete=True, covariance=None,
                                          initial=(f0, f0t)).mean
                got = run.test_outputs[CURVE.index(t)]
                gaps[i, s, j] = np.linalg.norm(got - pred) / np.linalg.norm(pred - f0t)
            if s == 0:
                predicted = [0.5 * np.sum((p.gradient_descent(t, discrete=True, covariance=None,
                                                              initial=(f0, f0)).mean - Y) ** 2)
                             for t in CURVE]
                curves[width] = (np.array(run.losses), np.array(predicted))
        print(f"  width {width:5d}: relative gap at steps {CHECK_STEPS} = "
              f"{np.array2string(gaps[i].mean(0), precision=4)}  [{time.perf_counter() - start:.1f} s]")
    # the infinite-width flow, for reference: discrete steps at eta = 1/lambda_max vs the flow
    flow = p.gradient_descent(STEPS, Xte, covariance=None).mean
    disc = p.gradient_descent(STEPS, Xte, discrete=True, covariance=None).mean
    print(f"  eta = 1/lambda_max = {eta:.4g}; infinite-width mean after {STEPS} steps vs gradient "
          f"flow at t = {STEPS}: max |diff| = {np.abs(flow - disc).max():.3g}")
    mean_gap = gaps.mean(axis=1)
    logw = np.log(WIDTHS)
    slopes = [np.polyfit(logw, np.log(mean_gap[:, j]), 1)[0] for j in range(len(CHECK_STEPS))]
    return mean_gap, slopes, curves


def accuracy(X, y):
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    n = 1000
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    Y = np.eye(10)[ytr] - 0.1                      # centred one-hot targets
    program = symntk.mlp(3, "relu", weight_std=1.4, bias_std=0.1)
    kernel = symntk.derive(program).compile()
    scores = {}
    p = Predictor(kernel, Xtr, Y, ridge=1e-3)
    scores["NTK regression (t = inf)"] = np.mean(
        p.gradient_descent(np.inf, Xte, covariance=None).mean.argmax(1) == yte)
    scores["NNGP posterior"] = np.mean(
        p.gp_posterior(Xte, noise=1e-3, covariance=None).mean.argmax(1) == yte)
    K_tr, K_te = kernel(Xtr).ntk, kernel(Xte, Xtr).ntk
    scores["SVC, NTK precomputed"] = SVC(kernel="precomputed", C=10.0).fit(K_tr, ytr) \
        .score(K_te, yte)
    grid = GridSearchCV(KernelRidge(kernel="rbf"), {"gamma": [0.003, 0.01, 0.03],
                                                    "alpha": [1e-3, 1e-2, 1e-1]}, cv=3)
    grid.fit(Xtr, Y)
    scores[f"RBF kernel ridge {grid.best_params_}"] = np.mean(grid.predict(Xte).argmax(1) == yte)
    return scores


def plot(path, mean_gap, curves):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for j, t in enumerate(CHECK_STEPS):
        a.loglog(WIDTHS, mean_gap[:, j], "o-", label=f"after {t} steps")
    ref = mean_gap[0, -1] * (np.array(WIDTHS) / WIDTHS[0]) ** -0.5
    a.loglog(WIDTHS, ref, "k--", lw=1, label="width$^{-1/2}$")
    a.set(xlabel="width", ylabel="relative gap to infinite-width prediction",
          title="Trained network vs prediction (test inputs)")
    a.legend()
    for width in (WIDTHS[0], WIDTHS[-1]):
        actual, predicted = curves[width]
        line, = b.semilogy(CURVE, actual, "-", label=f"width {width}, trained")
        b.semilogy(CURVE, predicted, "--", color=line.get_color(), label=f"width {width}, predicted")
    b.set(xlabel="gradient-descent step", ylabel="training loss (sum)", title="Training curves")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per width (default 3)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "derivations" / "out")
    args = parser.parse_args(argv)
    X, y = digits()
    ok = True

    print("Part 1: finite networks trained by gradient descent vs the infinite-width prediction")
    mean_gap, slopes, curves = dynamics(X, y, args.seeds)
    for t, slope in zip(CHECK_STEPS, slopes):
        good = -0.7 <= slope <= -0.3
        ok &= good
        print(f"  slope of log gap vs log width after {t:3d} steps: {slope:+.3f} "
              f"({'in' if good else 'OUTSIDE'} [-0.7, -0.3]; CLT rate -0.5)")
    wide_gap = mean_gap[-1, -1]
    ok &= wide_gap < 0.1
    print(f"  width {WIDTHS[-1]}: the trained network is within {100 * wide_gap:.1f}% of the "
          "prediction after training")

    print("\nPart 2: test accuracy on digits (1000 train, 797 test)")
    scores = accuracy(X, y)
    for name, s in scores.items():
        print(f"  {name:<55s} {s:.4f}")
    rbf = [v for k, v in scores.items() if k.startswith("RBF")][0]
    for name in ("NTK regression (t = inf)", "NNGP posterior"):
        good = scores[name] >= 0.9 and scores[name] >= rbf - 0.05
        ok &= good
        if not good:
            print(f"  {name}: accuracy below 0.9 or more than 5 points under the RBF baseline")

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        plot(args.out / "training.png", mean_gap, curves)
        print(f"\nfigure written to {args.out / 'training.png'}")
    except ImportError as exc:
        print(f"\nno figure: {exc}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
