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
    base: int
    count: int
    index: str | None          # loop index name in the pair code (None: straight code)
    lo: int
    row_scale: str             # code of s1 for row i (reads T1[i, ...], may read the index)
    col_scale: str             # code of s2 for column j (reads T2[..., j])
    coef: list                 # [(row function, column function)] per term


@dataclass
class MehlerSites:
    """The expectations of one ``pairs`` function evaluated by Mehler's formula: coefficient
    functions (module source), slots in the coefficient tables, and the prologue that fills them.
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
def {name}(s, out{''.join(', ' + p for p in pnames)}):
    """Hermite coefficients of {str(key).replace(chr(10), ' ')[:60]} at u = s z (Mehler)."""
    fv = np.empty(_MN)
    for n in range(_MN):
        _u = s * (n * {STEP!r} - {HALF_WIDTH!r})
        fv[n] = {code}
    _hermite_coefficients(fv, out)''')
        self._funcs[key] = (name, params)
        return self._funcs[key]

    def add(self, terms, u1, u2, row_scale: str, col_scale: str, loop) -> list:
        """Register one expectation ``sum_t f_t(u1) g_t(u2)``; returns the slot code per term
        (``loop``: the pair-code Block the call sits in, or None)."""
        coef = []
        for f, g in terms:
            coef.append((self.factor_function(f, u1), self.factor_function(g, u2)))
        if loop is None:
            index, lo, count = None, 0, 1
        else:
            index = loop.index.name
            lo, count = int(min(loop.start, loop.stop)), abs(int(loop.stop) - int(loop.start)) + 1
        base = self.slots
        self.slots += count * len(terms)
        self.sites.append(_Site(base, count, index, lo, row_scale, col_scale, coef))
        out = []
        for t in range(len(terms)):
            first = base + t * count
            out.append(str(first) if index is None else f"{first} + {index} - {lo}")
        return out

    def prologue(self) -> list:
        """Lines before the parallel row loop of ``pairs``: the coefficient tables of the rows
        (``M1``) and the columns (``M2``), in parallel over inputs."""
        if not self.sites:
            return []
        lines = ["# Hermite coefficients per input (Mehler's formula; symntk.codegen.mehler);",
                 "# sym: the rows' are the columns' (one table)",
                 f"M1 = np.empty((max(r1 - r0, 0), {self.slots}, {ORDER + 2}))",
                 f"M2 = np.empty((n2, {self.slots}, {ORDER + 2}))"]
        for table, var, rng, side in (("M2", "j", "n2", 1), ("M1", "i", "r0, r1", 0)):
            lines.append(f"for {var} in prange({rng}):")
            row = "i - r0" if side == 0 else "j"
            base_ind = "    "
            if side == 0:
                lines += ["    if sym:", "        M1[i - r0] = M2[i]", "    else:"]
                base_ind = "        "
            for site in self.sites:
                ind = base_ind
                if site.index is not None:
                    lines.append(f"{ind}for {site.index} in range({site.lo}, "
                                 f"{site.lo + site.count}):")
                    ind += "    "
                scale = site.row_scale if side == 0 else site.col_scale
                for t, pair in enumerate(site.coef):
                    name, params = pair[side]
                    slot = site.base + t * site.count
                    slot = str(slot) if site.index is None else f"{slot} + {site.index} - {site.lo}"
                    args = "".join(", " + self.param_code[p] for p in params)
                    lines.append(f"{ind}{name}({scale}, {table}[{row}, {slot}]{args})")
        return lines


_U = sp.Symbol("_mehler_u", real=True)


def helpers_source() -> str:
    """``_hermite_coefficients`` and ``_mehler``: the module-level routines every kernel with
    Mehler expectations shares (see the module docstring)."""
    n = int(round(2 * HALF_WIDTH / STEP)) + 1
    return f'''

_MN = {n}


@njit(cache=CACHE, fastmath={{"reassoc", "contract"}})
def _hermite_coefficients(fv, out):
    """out[:K] = sum_n w_n f(z_n) h_k(z_n) (trapezoid, step h), out[K] the tail envelope (inf
    if the step-2h sums differ by more than {COEFF_CHECK!r} of the norm or f is not finite),
    out[K+1] = ||f|| = sqrt(E f^2).  (Sums reassociated: their order is immaterial here.)"""
    K = out.shape[0] - 2
    m = fv.shape[0]
    w = np.empty(m)
    z = np.empty(m)
    hp = np.zeros(m)
    hc = np.ones(m)
    norm2 = 0.0
    finite = True
    for n in range(m):
        z[n] = n * {STEP!r} - {HALF_WIDTH!r}
        w[n] = {STEP / (2 * 3.141592653589793) ** 0.5!r} * math.exp(-0.5 * z[n] * z[n])
        fv[n] = fv[n] * w[n]
        if not math.isfinite(fv[n]):
            finite = False
    for n in range(m):
        norm2 += fv[n] * fv[n] / w[n] if w[n] > 0.0 else 0.0
    err = 0.0
    env = 0.0
    for k in range(K):
        ev = 0.0
        od = 0.0
        for n in range(0, m, 2):
            ev += fv[n] * hc[n]
        for n in range(1, m, 2):
            od += fv[n] * hc[n]
        a = ev + od
        out[k] = a
        err = max(err, abs(ev - od))              # step 2h (even nodes) minus step h
        if k >= K - 16:
            env = max(env, abs(a))
        sk, sk1 = math.sqrt(k), math.sqrt(k + 1.0)
        for n in range(m):
            h = (z[n] * hc[n] - sk * hp[n]) / sk1
            hp[n] = hc[n]
            hc[n] = h
    norm = math.sqrt(norm2)
    ok = finite and err <= {COEFF_CHECK!r} * norm
    out[K] = 2.0 * env if ok else math.inf
    out[K + 1] = norm


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
