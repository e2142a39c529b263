"""Shared driver for the GIA-vs-exact worked derivations (TP3 Box 1; TP2 §5, Condition 1)."""
from __future__ import annotations

import argparse

import numpy as np

import symntk


def arguments(doc: str, width: int = 2048, seeds: int = 8):
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--width", type=int, default=width, help="width of the simulated networks")
    p.add_argument("--seeds", type=int, default=seeds, help="number of simulated networks")
    p.add_argument("--out", help="write a standalone .tex comparison here")
    return p.parse_args()


def ntk_case(program, X, width: int, seeds: int, out: str | None = None) -> bool:
    """Print both derivations (LaTeX), the verdicts and the finite-width truth; True if the
    simulation agrees with exact mode (every entry within 3 standard errors)."""
    result = symntk.compare(program, X, width=width, seeds=seeds)
    print(r"% GIA derivation")
    print(result.gia.latex())
    print(r"% exact derivation (Zdot equations in red)")
    print(result.exact.latex(highlight_zdot=True))
    print()
    print(result.report())
    if out:
        with open(out, "w") as fh:
            fh.write(result.latex(standalone=True))
        print(f"wrote {out}")
    mc = result.finite
    z = {m: np.abs(result.values[m].ntk - mc.ntk_mean) / mc.ntk_sem for m in ("gia", "exact")}
    ok = z["exact"].max() < 3
    print(f"\nverdict: finite width {'AGREES' if ok else 'DISAGREES'} with exact mode "
          f"(max {z['exact'].max():.1f} s.e.); GIA is off by up to {z['gia'].max():.1f} s.e.")
    return ok


def moment_case(title: str, rows) -> bool:
    """rows: (name, exact, gia, simulated mean, simulated s.e.); True if exact is within 3 s.e."""
    print(f"\n{title}")
    print(f"  {'quantity':<28}{'exact':>10}{'GIA':>10}{'simulated':>14}{'s.e.':>10}")
    ok = True
    for name, exact, gia, mean, sem in rows:
        ok &= abs(float(exact) - mean) <= 3 * sem + 1e-12
        print(f"  {name:<28}{str(exact):>10}{str(gia):>10}{mean:>14.4f}{sem:>10.4f}")
    print(f"verdict: simulation {'AGREES' if ok else 'DISAGREES'} with exact mode")
    return ok


def mean_sem(samples) -> tuple[float, float]:
    s = np.asarray(samples, dtype=float)
    return float(s.mean()), float(s.std(ddof=1) / np.sqrt(len(s)))
