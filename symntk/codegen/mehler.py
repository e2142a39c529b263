r"""Two-dimensional Gaussian expectations of smooth, separable integrands by Mehler's formula.

For ``(u1, u2) = (s1 z1, s2 z2)`` with standard normal ``z1, z2`` of correlation ``c``,

    E f(u1) g(u2) = sum_k c^k A_k(s1) B_k(s2),
    A_k(s) = E f(s z) h_k(z),  B_k(s) = E g(s z) h_k(z),

``h_k`` the orthonormal (probabilists') Hermite polynomials (Mehler's formula; the Hermite
expansion of dual activations, Daniely et al. 2016, Sec. 4; O'Donnell, *Analysis of Boolean
Functions*, Ch. 11).  The coefficients depend on one input only, so a kernel computes them once
per input and layer (``O(N)`` one-dimensional integrals) and each pair costs a dot product of
length :data:`ORDER` instead of a two-dimensional quadrature.  An integrand ``F(u1, u2)`` is
used this way when it is a short sum of products ``sum_t f_t(u1) g_t(u2)`` of functions without
kinks.

Error control, per input and per pair (no silent wrong number):

* the coefficients are trapezoidal sums on a uniform grid (:data:`STEP`, ``|z| <= HALF_WIDTH``),
  which converge geometrically for integrands analytic in a strip; the same sums with every
  other node (twice the step) estimate the error; where that estimate exceeds
  :data:`COEFF_CHECK` of the norm (a singularity close to the real axis, e.g. a large variance)
  the input's coefficients are marked unusable;
* truncation: ``|sum_{k >= K} c^k A_k B_k| <= a b |c|^K / (1 - |c|)`` with ``a``, ``b`` twice the
  largest of the last 16 coefficients; a pair whose bound exceeds :data:`TOLERANCE` times
  ``||f(s1 z)|| ||g(s2 z)||`` (correlations near +-1, slowly decaying coefficients) is computed by
  the two-dimensional rule instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .printer import NumbaPrinter

__all__ = ["ORDER", "STEP", "HALF_WIDTH", "TOLERANCE", "COEFF_CHECK", "separate", "MehlerSites",
           "helpers_source"]

#: Hermite coefficients per input (truncation order K of the series).
ORDER = 128
#: Trapezoidal grid of the coefficients: step and half-width in z (h_k(z) phi(z) < e^{-z^2/4}).
STEP = 0.1
HALF_WIDTH = 13.0
#: A pair uses the series when its truncation bound is below this times the norms.
TOLERANCE = 1e-14
#: Largest relative difference between the coefficients at step h and 2h that is accepted.
COEFF_CHECK = 1e-6

#: Heads with kinks or jumps: their coefficients decay algebraically; never expanded.
_KINKED = (sp.Heaviside, sp.Max, sp.Min, sp.Abs, sp.sign, sp.Piecewise, sp.DiracDelta,
           sp.floor, sp.ceiling)


def separate(F: sp.Expr, u1: sp.Symbol, u2: sp.Symbol, max_terms: int = 4):
    """``[(f_t(u1), g_t(u2))]`` with ``F = sum_t f_t(u1) g_t(u2)``, or None if ``F`` is not such
    a short sum (or has a kink).  Constants go into ``f_t``."""
    if any(F.has(h) for h in _KINKED) or F.atoms(sp.core.function.AppliedUndef):
        return None

    def split(term):
        f, g = [], []
        for a in sp.Mul.make_args(sp.expand_power_exp(term)):
            fs = a.free_symbols
            if u1 in fs and u2 in fs:
                return None
            (g if u2 in fs else f).append(a)
        return sp.Mul(*f), sp.Mul(*g)

    one = split(F)
    if one is not None:
        return [one]
    terms = sp.Add.make_args(sp.expand(F))
    if len(terms) > max_terms:
        return None
    out = []
    for t in terms:
        s = split(t)
        if s is None:
            return None
        out.append(s)
    return out


@dataclass
class _Site:
    """One expectation in the pair code: its coefficient slots and where the scales live."""
    count: int
    index: str | None          # loop index name in the pair code (None: straight code)
    lo: int
    row_scale: str             # code of s1 for row i (reads T1[i, ...], may read the index)
    col_scale: str             # code of s2 for column j (reads T2[..., j])
    coef: list                 # [((row function, column function), (row slot, col slot))]


@dataclass
class MehlerSites:
    """The expectations of one ``pairs`` function evaluated by Mehler's formula: coefficient
    functions (module source), slots in the per-input coefficient tables (``M1`` of the rows,
    ``M2`` of the columns, arguments of ``pairs``) and ``mehler_samples``, which samples the
    integrands from which the driver computes them.
    """
    param_code: dict
    sites: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    _funcs: dict = field(default_factory=dict)
    slots: int = 0

    def factor_function(self, expr: sp.Expr, var: sp.Symbol) -> tuple[str, list]:
        """A module-level ``_mcoef_k(s, out, <params>)``: the Hermite coefficients of
        ``expr(s z)`` into ``out``; returns (name, parameter symbols)."""
        key = expr.xreplace({var: _U})
        if key in self._funcs:
            return self._funcs[key]
        params = sorted(key.free_symbols - {_U}, key=str)
        name = f"_mcoef{len(self._funcs)}"
        pnames = [self.param_code[p] for p in params]
        names = {_U: "_u", **{p: self.param_code[p] for p in params}}
        code = NumbaPrinter(names).doprint(key)
        self.sources.append(f'''

@njit(cache=CACHE)
def {name}(s, fv{''.join(', ' + p for p in pnames)}):
    """{str(key).replace(chr(10), ' ')[:60]} at u = s z on the grid of mehler_runtime.hermite_tables."""
    for n in range(_MN):
        _u = s * (n * {STEP!r} - {HALF_WIDTH!r})
        fv[n] = {code}''')
        self._funcs[key] = (name, params)
        return self._funcs[key]

    def add(self, terms, u1, u2, row_scale: str, col_scale: str, loop) -> list:
        """Register one expectation ``sum_t f_t(u1) g_t(u2)``; returns ``(row slot code, column
        slot code)`` per term (``loop``: the pair-code Block the call sits in, or None).  A term
        whose two factors are the same function uses one slot for both roles."""
        coef = []
        for f, g in terms:
            coef.append((self.factor_function(f, u1), self.factor_function(g, u2)))
        if loop is None:
            index, lo, count = None, 0, 1
        else:
            index = loop.index.name
            lo, count = int(min(loop.start, loop.stop)), abs(int(loop.stop) - int(loop.start)) + 1
        slots = []
        for fr, fc in coef:
            r = self.slots
            self.slots += count
            c = r
            if fc != fr:
                c = self.slots
                self.slots += count
            slots.append((r, c))
        self.sites.append(_Site(count, index, lo, row_scale, col_scale, list(zip(coef, slots))))

        def code(first):
            return str(first) if index is None else f"{first} + {index} - {lo}"
        return [(code(r), code(c)) for r, c in slots]

    def samples_source(self, params: list) -> str:
        """``mehler_samples(T1, theta, fv, i0)``: ``fv[it, slot, n] = f_slot(s z_n)`` for the
        inputs ``i0 + it`` of the per-input table ``T1`` (row role and column role), sampled by
        the small per-factor functions; the driver then runs the Hermite transform
        (:func:`symntk.codegen.mehler_runtime.hermite_tables`, compiled once per install: a
        parallel loop in the generated module cost ~5 s of compile time)."""
        used = set()
        for site in self.sites:
            for pair, _ in site.coef:
                for _, ps in pair:
                    used |= set(ps)
        lines = ["", "", "@njit(cache=CACHE)",
                 "def mehler_samples(T1, theta, fv, i0):",
                 '    """Integrands of the Mehler coefficients per input and slot."""']
        lines += [f"    {self.param_code[p]} = theta[{k}]" for k, p in enumerate(params)
                  if p in used]
        lines += ["    for it in range(fv.shape[0]):",
                  "        i = i0 + it",
                  "        row = fv[it]"]
        for site in self.sites:
            ind = "        "
            if site.index is not None:
                lines.append(f"{ind}for {site.index} in range({site.lo}, {site.lo + site.count}):")
                ind += "    "
            lines.append(f"{ind}s = {site.row_scale}")
            for ((fr, pr), (fc, pc)), (r, c) in site.coef:
                for fn, ps, first in ((fr, pr, r), (fc, pc, c)) if r != c else ((fr, pr, r),):
                    slot = str(first) if site.index is None else \
                        f"{first} + {site.index} - {site.lo}"
                    args = "".join(", " + self.param_code[p] for p in ps)
                    lines.append(f"{ind}{fn}(s, row[{slot}]{args})")
        return "\n".join(lines)


_U = sp.Symbol("_mehler_u", real=True)


def helpers_source() -> str:
    """``_mehler`` (the series and its bound, per pair) and the grid size ``_MN``; the
    coefficients come from :func:`symntk.codegen.mehler_runtime.hermite_tables`."""
    n = int(round(2 * HALF_WIDTH / STEP)) + 1
    return f'''

_MN = {n}


@njit(cache=CACHE)
def _mehler(a, b, c):
    """(sum_k c^k a_k b_k, whether the truncation bound is below {TOLERANCE!r} ||f|| ||g||)."""
    K = a.shape[0] - 2
    c2 = c * c
    ev = 0.0
    od = 0.0
    for k in range(K - 2, -1, -2):
        ev = ev * c2 + a[k] * b[k]
        od = od * c2 + a[k + 1] * b[k + 1]
    ac = abs(c)
    if ac >= 1.0:
        return ev + c * od, a[K] * b[K] == 0.0
    bound = a[K] * b[K] * ac ** K / (1.0 - ac)
    return ev + c * od, bound <= {TOLERANCE!r} * a[K + 1] * b[K + 1]
'''
