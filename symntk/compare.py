"""GIA against the exact calculus, side by side (GIA: TP2 Heuristic 4.1; exact: TP3 Box 1, Thm 2.10;
the Simple GIA Check: TP2 §5, Condition 1).

``compare(program, X)`` derives the program both ways, decides the Simple GIA Check, gives the
symbolic difference of the two NTKs, their Gram matrices on the data, and optionally the
finite-width truth (Monte Carlo over seeds of the exact empirical NTK of the same program).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from .derivation import derive
from .equations import Derivation
from .gia import GIACheck, gia_check
from .program import Program

__all__ = ["Comparison", "compare", "ntk_in_input_kernels"]


@dataclass
class Comparison:
    program: Program
    gia: Derivation
    exact: Derivation
    check: GIACheck
    ntk_difference: sp.Expr | None          # exact - GIA, in the input kernels (None: too large)
    X: np.ndarray | None = None
    values: dict | None = None              # {"gia": KernelResult, "exact": KernelResult}
    finite: object | None = None            # Monte-Carlo estimate (mean, sem) at ``width``
    width: int | None = None

    @property
    def agree(self) -> bool | None:
        """True if GIA and exact give the same NTK (symbolically when known, else on the data)."""
        if self.ntk_difference is not None:
            return self.ntk_difference == 0
        if self.values is not None:
            return bool(np.allclose(self.values["gia"].ntk, self.values["exact"].ntk, rtol=1e-12))
        return None

    def latex(self, standalone: bool = False) -> str:
        """Both recursions; exact-mode equations carrying Zdot terms in red."""
        gia = self.gia.latex()
        exact = self.exact.latex(highlight_zdot=True)
        diff = "" if self.ntk_difference is None else \
            r"\Theta_{\mathrm{exact}} - \Theta_{\mathrm{GIA}} = " + _kernel_latex(self.ntk_difference)
        if not standalone:
            return (r"\text{GIA:}\quad " + gia + r"\qquad \text{exact:}\quad " + exact +
                    (r"\qquad " + diff if diff else ""))
        verdict = str(self.check).replace("\n", r"\\ ").replace("_", r"\_")
        parts = [r"\documentclass[10pt]{article}", r"\usepackage[margin=1.5cm,landscape]{geometry}",
                 r"\usepackage{amsmath,amssymb,color}", r"\allowdisplaybreaks", r"\begin{document}",
                 rf"\section*{{GIA vs exact: \texttt{{{_esc(self.program.name)}}}}}",
                 rf"\noindent {verdict}", r"\subsection*{GIA}", r"\[", gia, r"\]",
                 r"\subsection*{Exact (equations with $\dot Z$ terms in red)}", r"\[", exact, r"\]"]
        if diff:
            parts += [r"\subsection*{Difference}", r"\[", diff, r"\]"]
        parts += [r"\end{document}", ""]
        return "\n".join(parts)

    def report(self) -> str:
        lines = [f"== {self.program.name}: GIA vs exact ==", str(self.check)]
        if self.ntk_difference is not None:
            lines.append(f"Theta_exact - Theta_GIA = {self.ntk_difference}  (c = xi.xi'/d, "
                         "q = |xi|^2/d, q' = |xi'|^2/d)")
        if self.values is not None:
            with np.printoptions(precision=6, suppress=True):
                lines.append(f"NTK (GIA)   =\n{self.values['gia'].ntk}")
                lines.append(f"NTK (exact) =\n{self.values['exact'].ntk}")
                if self.finite is not None:
                    mean, sem = self.finite.ntk_mean, self.finite.ntk_sem
                    lines.append(f"NTK (finite width {self.width}, {len(self.finite.seeds)} seeds) "
                                 f"mean =\n{mean}\n  +- s.e.\n{sem}")
                    for mode in ("gia", "exact"):
                        z = np.abs(self.values[mode].ntk - mean) / np.maximum(sem, 1e-300)
                        lines.append(f"max |{mode} - finite| / s.e. = {z.max():.2f}")
        return "\n".join(lines)


def _esc(text: str) -> str:
    return text.replace("_", r"\_")


def _kernel_latex(expr: sp.Expr) -> str:
    q1, q2, c = sp.symbols("q q' c")
    names = {q1: r"\frac{\|\xi\|^2}{d}", q2: r"\frac{\|\xi'\|^2}{d}", c: r"\frac{\xi^\top\xi'}{d}"}
    return sp.latex(expr, symbol_names=names, inv_trig_style="full")


def ntk_in_input_kernels(d: Derivation, max_ops: int = 4000) -> sp.Expr | None:
    """The NTK with every equation substituted: an expression in q, q', c (None if too large)."""
    if d.loops:
        d = derive(d.program, mode=d.mode, fold=False)
    d = d.reduced()
    q1, q2, c = sp.symbols("q q' c")
    values = {s: {(0, 0): q1, (1, 1): q2, (0, 1): c}[info.copies] for s, info in d.inputs.items()}
    for eq in d.equations:
        values[eq.lhs] = eq.rhs.xreplace(values)
        if sp.count_ops(values[eq.lhs]) > max_ops:
            return None
    return d.ntk.xreplace(values)


def compare(program: Program, X=None, width: int | None = None, seeds: int = 0,
            params: dict | None = None) -> Comparison:
    """Derive ``program`` under GIA and exactly and put the two side by side.

    ``X`` (N, d): evaluate both NTKs on the data.  ``width`` and ``seeds``: also the finite-width
    truth, the mean and standard error of the exact empirical NTK over ``seeds`` networks.
    """
    gia, exact = derive(program, mode="gia"), derive(program, mode="exact")
    if not isinstance(gia, Derivation):
        raise NotImplementedError(
            f"compare() sets two Z-calculus derivations side by side; {program.name!r} is derived "
            f"by another engine ({type(gia).__name__}: pixel/token pairs or batches), where every "
            "weight is used once per layer, so GIA and exact mode coincide (TP2 Thm 7.2): use "
            "derive(program) and gia_check(program)")
    a, b = ntk_in_input_kernels(gia), ntk_in_input_kernels(exact)
    diff = None
    if a is not None and b is not None:
        diff = sp.simplify(b - a) if sp.count_ops(b - a) < 400 else sp.expand(b - a)
        if diff != 0 and sp.count_ops(diff) > 400:
            diff = None
    result = Comparison(program, gia, exact, gia_check(program), diff)
    if X is not None:
        X = np.atleast_2d(np.asarray(X, dtype=float))
        result.X = X
        result.values = {"gia": gia.gram(X, params=params), "exact": exact.gram(X, params=params)}
        if width is not None and seeds:
            from .finite import monte_carlo
            result.finite = monte_carlo(program, X, width=width, n_samples=seeds)
            result.width = width
    return result
