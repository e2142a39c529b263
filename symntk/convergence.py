"""Deviation of the finite-width NTK from its infinite-width limit (the NTK4A study, TP2 Fig. 1).

For each width n and seed s a network is sampled and its empirical NTK Theta_n on the inputs X is
compared with the infinite-width Gram matrix Theta_inf by the relative Frobenius deviation

    dev(n, s) = ||Theta_n - Theta_inf||_F / ||Theta_inf||_F .

The Master Theorem gives Theta_n -> Theta_inf a.s.; the fluctuations are CLT-sized, so
E dev(n) ~ c n^{-1/2} and the log-log slope of the per-width mean is about -1/2 (TP2 Fig. 1).
The reference Theta_inf is an input (any derivation engine, closed form or oracle): this module
does not depend on the derivation stage, so the finite-width side stays an independent check.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .finite import _infer_input_dim, sample

__all__ = ["ConvergenceRecord", "convergence", "plot_convergence"]


@dataclass(frozen=True)
class ConvergenceRecord:
    """Per-(width, seed) deviations and their summary.

    ``deviations[i, j]`` is dev(widths[i], seeds[j]).  ``mean``/``ci_low``/``ci_high`` are the mean
    over seeds and its 95% Student-t interval.  ``slope``/``intercept`` fit
    log(mean) = intercept + slope * log(width) by least squares; ``slope_stderr`` is the standard
    deviation of the slope over a bootstrap of seeds (resampled independently per width), and
    ``slope_ci`` the bootstrap 95% percentile interval.
    """
    label: str
    widths: np.ndarray
    seeds: tuple
    deviations: np.ndarray
    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    slope: float
    intercept: float
    slope_stderr: float
    slope_ci: tuple[float, float]
    reference_norm: float

    def table(self) -> str:
        """A plain-text table: width, mean deviation, 95% interval, number of seeds."""
        lines = [f"{self.label}: ||Theta_n - Theta_inf||_F / ||Theta_inf||_F  "
                 f"({len(self.seeds)} seeds per width)",
                 f"{'width':>8} {'mean':>10} {'95% CI':>23}"]
        for w, m, lo, hi in zip(self.widths, self.mean, self.ci_low, self.ci_high):
            lines.append(f"{int(w):>8} {m:>10.5f} [{lo:>9.5f}, {hi:>9.5f}]")
        lines.append(f"fitted log-log slope {self.slope:+.3f} (bootstrap s.e. {self.slope_stderr:.3f}, "
                     f"95% [{self.slope_ci[0]:+.3f}, {self.slope_ci[1]:+.3f}]); CLT rate -0.5")
        return "\n".join(lines)


def _t975(dof: int) -> float:
    from scipy.stats import t  # lazily: only the summary needs it
    return float(t.ppf(0.975, dof))


def _loglog_slope(widths: np.ndarray, means: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.log(widths), np.log(means), 1)
    return float(slope), float(intercept)


def convergence(program, X, widths, seeds, reference=None, parametrization=None, values=None,
                label: str | None = None, n_bootstrap: int = 2000) -> ConvergenceRecord:
    """Relative Frobenius deviation of the empirical NTK from ``reference`` per width and seed.

    ``reference``: the infinite-width NTK Gram matrix on ``X``, shape (N, N) (None: derive it).
    ``seeds``: a sequence
    of ints, or an int S meaning ``range(S)``.  The network for (width w, seed s) is drawn with
    ``numpy.random.default_rng(SeedSequence([s, w]))``, so different widths use independent
    randomness (the per-width means are independent, as the interval and the fit assume).
    """
    if reference is None:
        # The infinite-width kernel of the same program: GIA where the Simple GIA Check holds
        # (identical to exact there, and cheaper), the exact calculus where it does not.
        from .derivation import derive
        from .gia import gia_check
        mode = "gia" if gia_check(program).holds else "exact"
        reference = derive(program, mode=mode).gram(X, params=values).ntk
    widths = np.asarray(sorted(int(w) for w in widths))
    if widths.size < 2 or widths[0] < 1:
        raise ValueError("convergence needs at least two positive widths")
    seeds = tuple(range(seeds)) if isinstance(seeds, (int, np.integer)) else tuple(int(s) for s in seeds)
    if len(seeds) < 2:
        raise ValueError("convergence needs at least two seeds (for an interval)")
    reference = np.asarray(reference, dtype=np.float64)
    n = np.shape(X[next(iter(X))] if isinstance(X, dict) else X)[0]
    if reference.shape != (n, n):
        raise ValueError(f"reference must be the (N, N) = ({n}, {n}) NTK Gram matrix on X, "
                         f"got shape {reference.shape}")
    if not np.all(np.isfinite(reference)):
        raise ValueError("reference contains NaN or infinite entries")
    ref_norm = float(np.linalg.norm(reference))
    if ref_norm == 0:
        raise ValueError("reference is the zero matrix: a relative deviation is undefined")

    from .batchnorm import check_monte_carlo
    check_monte_carlo(program, X)   # a BatchNorm batch whose empirical NTK does not concentrate
    input_dim = _infer_input_dim(program, X)
    dev = np.empty((widths.size, len(seeds)))
    for i, w in enumerate(widths):
        for j, s in enumerate(seeds):
            net = sample(program, int(w), np.random.SeedSequence([s, int(w)]), parametrization,
                         input_dim, values)
            dev[i, j] = np.linalg.norm(net.ntk(X).ntk - reference) / ref_norm

    mean = dev.mean(axis=1)
    half = _t975(len(seeds) - 1) * dev.std(axis=1, ddof=1) / np.sqrt(len(seeds))
    slope, intercept = _loglog_slope(widths, mean)
    # Bootstrap over seeds: resample each width's seeds with replacement, refit the slope.
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(seeds), size=(n_bootstrap, widths.size, len(seeds)))
    boot_means = np.take_along_axis(np.broadcast_to(dev, idx.shape), idx, axis=2).mean(axis=2)
    x = np.log(widths) - np.log(widths).mean()
    boot = (np.log(boot_means) @ x) / (x @ x)  # least-squares slope of every bootstrap replicate
    return ConvergenceRecord(
        label=label or getattr(program, "name", "program"), widths=widths, seeds=seeds,
        deviations=dev, mean=mean, ci_low=mean - half, ci_high=mean + half, slope=slope,
        intercept=intercept, slope_stderr=float(boot.std(ddof=1)),
        slope_ci=(float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))),
        reference_norm=ref_norm)


def plot_convergence(record, path, title: str | None = None):
    """Draw the NTK4A-style log-log figure (TP2 Fig. 1) and save it to ``path``.

    ``record``: one :class:`ConvergenceRecord` or a list of them (one line each, mean with a shaded
    95% interval), plus a dashed width^{-1/2} reference line through the first record's first mean.
    Returns the matplotlib Figure.
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)  # headless: never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plot_convergence needs matplotlib: pip install 'symntk[plot]' "
                          "(or pip install matplotlib)") from exc
    records = [record] if isinstance(record, ConvergenceRecord) else list(record)
    if not records:
        raise ValueError("plot_convergence needs at least one ConvergenceRecord")
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for r in records:
        line, = ax.plot(r.widths, r.mean, marker="o", label=f"{r.label} (slope {r.slope:+.2f})")
        ax.fill_between(r.widths, np.maximum(r.ci_low, 1e-300), r.ci_high, color=line.get_color(),
                        alpha=0.25, linewidth=0)
    w = np.geomspace(min(r.widths[0] for r in records), max(r.widths[-1] for r in records), 50)
    anchor = records[0]
    ax.plot(w, anchor.mean[0] * (w / anchor.widths[0]) ** -0.5, "k--", linewidth=1,
            label=r"$\propto \mathrm{width}^{-1/2}$")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel(r"$\|\Theta_n - \mathring\Theta\|_F \,/\, \|\mathring\Theta\|_F$")
    ax.set_title(title or "Finite-width NTK deviation (95% CI over seeds)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return fig
