"""Gaussian expectations without a closed form in generated code (the V-transforms of TP2
Def. E.1 that no rule closes): each becomes a call of its whitening parameters, and calls that
share a covariance run in one module-level routine whose loops use the rule arrays of
:mod:`symntk.quadrature` (the order :data:`~symntk.quadrature.RULE_ARRAYS`)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

from ..quadrature import RULE_ARRAYS
from .emission import Emitter
from .plan import SafePow
from .printer import NumbaPrinter, identifier

__all__ = ["QuadSpec", "QuadCalls", "QuadratureBody", "QuadFunctions"]


@dataclass(frozen=True)
class QuadSpec:
    """One Gaussian expectation without a closed form, as a call of its whitening parameters."""
    name: str
    integrand: sp.Expr        # in the real symbols ``variables``
    variables: tuple
    dim: int


class QuadCalls:
    """Registry of integrands; identical integrands share one function symbol."""

    def __init__(self):
        self.by_integrand: dict = {}
        self.specs: dict = {}

    def call(self, node) -> sp.Expr:
        """``GaussianExpectation(f, u, S)`` -> ``Q_j(args)``; args = whitening parameters of S."""
        integrand, variables, cov = node.args[0], tuple(node.args[1]), node.args[2]
        k = len(variables)
        key = (integrand, variables)
        if key not in self.by_integrand:
            name = f"Q{len(self.by_integrand)}"
            fn = sp.Function(name)
            self.by_integrand[key] = fn
            self.specs[fn] = QuadSpec(name, integrand, variables, k)
        fn = self.by_integrand[key]
        if k == 1:
            return fn(sp.sqrt(cov[0, 0]))
        if k == 2:
            s11, s12, s22 = cov[0, 0], cov[0, 1], cov[1, 1]
            rho = s12 * SafePow(s11, -sp.S.Half) * SafePow(s22, -sp.S.Half)
            return fn(sp.sqrt(s11), sp.sqrt(s22), rho)
        return fn(*[cov[i, j] for i in range(k) for j in range(i, k)])

    def spec(self, call) -> QuadSpec | None:
        return self.specs.get(call.func)


class QuadratureBody:
    """The loops of one quadrature routine, written into ``em``; ``params`` maps the model
    symbols of the integrands to their code, ``rule`` is the 2-D rule ("polar" or "hermite")."""

    def __init__(self, em: Emitter, params: dict, rule: str):
        self.em, self.params, self.rule = em, params, rule

    def emit(self, outs, args, printer):
        """``outs`` = [(local, QuadSpec)], one fused group; ``args`` the whitening parameters."""
        spec0 = outs[0][1]
        if spec0.dim == 1:
            self._quad1(outs, args, printer)
        elif spec0.dim == 2:
            if self.rule == "polar":
                self._quad2_polar(outs, args, printer)
            else:
                self._quad2_tensor(outs, args, printer)
        else:
            self._quadk(outs, args, printer, spec0.dim)

    def _integrand_code(self, outs, usyms, sign_sym: bool, printer, split=None):
        """CSE over all integrands of a group; returns (temp lines, value codes).

        ``sign_sym``: integrate F(u) + F(-u) (symmetrised; exact for the centred Gaussian);
        a globally even F gives 2 F(u).  ``split``: variables the outer loop knows; temporaries
        depending only on them are returned separately (hoisted out of the inner loop).
        """
        exprs = []
        for _, spec in outs:
            f = spec.integrand.xreplace(dict(zip(spec.variables, usyms)))
            if sign_sym:
                g = f.xreplace({u: -u for u in usyms})
                f = 2 * f if _same(f, g) else f + g
            exprs.append(f)
        syms = (sp.Symbol(self.em.fresh("f")) for _ in itertools.count())
        repl, reduced = sp.cse(exprs, symbols=syms, order="none")
        names = dict(printer.names)
        names.update(self.params)
        for u in usyms:
            names[u] = identifier(u.name)
        pr = NumbaPrinter(names)
        outer, inner = [], []
        inner_dep = set(usyms) - set(split or usyms)
        for s, v in repl:
            pr.names[s] = identifier(s.name)
            line = f"{identifier(s.name)} = {pr.doprint(v)}"
            if split is not None and not (v.free_symbols & inner_dep):
                outer.append(line)
            else:
                inner.append(line)
                inner_dep.add(s)
        return outer, inner, [pr.doprint(e) for e in reduced]

    def _quad1(self, outs, args, printer):
        em = self.em
        u = sp.Symbol("_u1", real=True)
        s = em.fresh("s")
        em.line(f"# E[f(u)], u ~ N(0, {s}^2): half-range Gauss rule on each side of the kink at 0")
        em.line(f"{s} = {args[0]}")
        accs = [em.fresh("acc") for _ in outs]
        for a in accs:
            em.line(f"{a} = 0.0")
        b = em.fresh("b")
        em.line(f"for {b} in range(HR.shape[0]):")
        em.indent()
        em.line(f"_u1 = {s} * HR[{b}]")
        _, inner, vals = self._integrand_code(outs, [u], True, printer)
        for ln in inner:
            em.line(ln)
        _accumulate(em, accs, f"HW[{b}]", vals)
        em.dedent()
        for (name, _), a in zip(outs, accs):
            em.line(f"{name} = {a}")

    def _quad2_polar(self, outs, args, printer):
        """Polar coordinates in the whitened plane: the kinks u1 = 0 and u2 = 0 are rays.

        u = (s1 z1, s2 (c z1 + r z2)), z = rho (cos t, sin t).  For t in [t0, t0 + pi) with the
        two kink angles as arc ends, Gauss-Legendre in t on each arc and a Gauss rule for the
        weight rho exp(-rho^2/2) in rho; F(u) + F(-u) covers the other half-plane.
        """
        em = self.em
        s1, s2, c, r, ta = (em.fresh(n) for n in ("s1", "s2", "c", "r", "ta"))
        em.line("# E[F(u1, u2)] over the whitened plane in polar coordinates, arcs split at the")
        em.line("# kink rays u1 = 0 and u2 = 0 (see symntk.quadrature.polar_rule)")
        em.line(f"{s1} = {args[0]}")
        em.line(f"{s2} = {args[1]}")
        em.line(f"{c} = min(1.0, max(-1.0, {args[2]}))")
        em.line(f"{r} = math.sqrt(max(0.0, 1.0 - {c} * {c}))")
        em.line(f"{ta} = math.atan2(-{c}, {r})")
        accs = [em.fresh("acc") for _ in outs]
        for a in accs:
            em.line(f"{a} = 0.0")
        k, a_, b_ = em.fresh("k"), em.fresh("a"), em.fresh("b")
        lo, ln, th, wa, e1, e2, ct, st = (em.fresh(n) for n in
                                          ("lo", "len", "th", "wa", "e1", "e2", "ct", "st"))
        ins = [em.fresh("in") for _ in outs]
        em.line(f"for {k} in range(2):")
        em.indent()
        em.line(f"{lo} = {ta} if {k} == 0 else 1.5707963267948966")
        em.line(f"{ln} = (1.5707963267948966 - {ta}) if {k} == 0 else ({ta} + 1.5707963267948966)")
        em.line(f"for {a_} in range(AT.shape[0]):")
        em.indent()
        em.line(f"{th} = {lo} + {ln} * AT[{a_}]")
        em.line(f"{wa} = {ln} * AW[{a_}]")
        em.line(f"{ct} = math.cos({th})")
        em.line(f"{st} = math.sin({th})")
        em.line(f"{e1} = {s1} * {ct}")
        em.line(f"{e2} = {s2} * ({c} * {ct} + {r} * {st})")
        for i in ins:
            em.line(f"{i} = 0.0")
        em.line(f"for {b_} in range(RR.shape[0]):")
        em.indent()
        em.line(f"_u1 = RR[{b_}] * {e1}")
        em.line(f"_u2 = RR[{b_}] * {e2}")
        u1, u2 = sp.Symbol("_u1", real=True), sp.Symbol("_u2", real=True)
        _, inner, vals = self._integrand_code(outs, [u1, u2], True, printer)
        for line in inner:
            em.line(line)
        _accumulate(em, ins, f"RW[{b_}]", vals)
        em.dedent()
        _accumulate(em, accs, wa, ins)
        em.dedent()
        em.dedent()
        for (name, _), a in zip(outs, accs):
            em.line(f"{name} = {a} * 0.15915494309189535")

    def _quad2_tensor(self, outs, args, printer):
        """Tensor Gauss-Hermite on the whitened plane: u1 = s1 z1, u2 = s2 (c z1 + r z2)."""
        em = self.em
        s1, s2, c, r = (em.fresh(n) for n in ("s1", "s2", "c", "r"))
        em.line("# E[F(u1, u2)]: tensor Gauss-Hermite on the whitened Gaussian")
        em.line(f"{s1} = {args[0]}")
        em.line(f"{s2} = {args[1]}")
        em.line(f"{c} = min(1.0, max(-1.0, {args[2]}))")
        em.line(f"{r} = math.sqrt(max(0.0, 1.0 - {c} * {c}))")
        accs = [em.fresh("acc") for _ in outs]
        ins = [em.fresh("in") for _ in outs]
        for a in accs:
            em.line(f"{a} = 0.0")
        a_, b_, m = em.fresh("a"), em.fresh("b"), em.fresh("m")
        u1, u2 = sp.Symbol("_u1", real=True), sp.Symbol("_u2", real=True)
        outer, inner, vals = self._integrand_code(outs, [u1, u2], False, printer, split=[u1])
        em.line(f"for {a_} in range(GZ.shape[0]):")
        em.indent()
        em.line(f"_u1 = {s1} * GZ[{a_}]")
        em.line(f"{m} = {s2} * {c} * GZ[{a_}]")
        for ln in outer:
            em.line(ln)
        for i in ins:
            em.line(f"{i} = 0.0")
        em.line(f"for {b_} in range(GZ.shape[0]):")
        em.indent()
        em.line(f"_u2 = {m} + {s2} * {r} * GZ[{b_}]")
        for ln in inner:
            em.line(ln)
        _accumulate(em, ins, f"GW[{b_}]", vals)
        em.dedent()
        _accumulate(em, accs, f"GW[{a_}]", ins)
        em.dedent()
        for (name, _), a in zip(outs, accs):
            em.line(f"{name} = {a}")

    def _quadk(self, outs, args, printer, k):
        """k >= 3 Gaussians: semidefinite Cholesky, then tensor Gauss-Hermite (order KZ)."""
        em = self.em
        em.line(f"# E[F(u_1..u_{k})]: Cholesky factor, tensor Gauss-Hermite (not kink-aware)")
        S = {}
        it = iter(args)
        for i in range(k):
            for j in range(i, k):
                S[i, j] = S[j, i] = em.fresh("S")
                em.line(f"{S[i, j]} = {next(it)}")
        L = {}
        for j in range(k):
            diag = " - ".join([S[j, j]] + [f"{L[j, m]} * {L[j, m]}" for m in range(j)])
            L[j, j] = em.fresh("L")
            em.line(f"{L[j, j]} = math.sqrt(max(0.0, {diag}))")
            for i in range(j + 1, k):
                L[i, j] = em.fresh("L")
                num = " - ".join([S[i, j]] + [f"{L[i, m]} * {L[j, m]}" for m in range(j)])
                em.line(f"{L[i, j]} = ({num}) / {L[j, j]} if {L[j, j]} > 0.0 else 0.0")
        accs = [em.fresh("acc") for _ in outs]
        for a in accs:
            em.line(f"{a} = 0.0")
        idx = [em.fresh("i") for _ in range(k)]
        for d, ix in enumerate(idx):
            em.line(f"for {ix} in range(KZ.shape[0]):")
            em.indent()
        usyms = [sp.Symbol(f"_u{i + 1}", real=True) for i in range(k)]
        for i in range(k):
            terms = " + ".join(f"{L[i, j]} * KZ[{idx[j]}]" for j in range(i + 1))
            em.line(f"_u{i + 1} = {terms}")
        w = " * ".join(f"KW[{ix}]" for ix in idx)
        _, inner, vals = self._integrand_code(outs, usyms, False, printer)
        for ln in inner:
            em.line(ln)
        _accumulate(em, accs, w, vals)
        for _ in idx:
            em.dedent()
        for (name, _), a in zip(outs, accs):
            em.line(f"{name} = {a}")


class QuadFunctions:
    """Module-level quadrature routines, one per fused group of integrands:
    ``_quad_Q0_Q1(s1, s2, c, <rule arrays>, <parameters>) -> (E F0, E F1)``."""

    def __init__(self, rule: str, param_code: dict):
        self.rule, self.param_code = rule, param_code
        self.funcs: dict = {}
        self.sources: list = []

    def get(self, specs):
        key = tuple(sp_.name for sp_ in specs)
        if key not in self.funcs:
            variables = set().union(*[set(sp_.variables) for sp_ in specs])
            fparams = sorted(set().union(*[sp_.integrand.free_symbols for sp_ in specs])
                             - variables, key=str)
            name = "_quad_" + "_".join(key)
            k = specs[0].dim
            argn = ["s"] if k == 1 else (["s1", "s2", "c"] if k == 2 else
                                         [f"S{i}{j}" for i in range(k) for j in range(i, k)])
            em = Emitter()
            em.line("")
            em.line("")
            em.line("@njit(cache=CACHE)")
            pnames = [self.param_code[p] for p in fparams]
            em.line(f"def {name}({', '.join(argn + list(RULE_ARRAYS) + pnames)}):")
            em.indent()
            what = ", ".join(f"E[{sp_.integrand}]" for sp_ in specs)
            em.line(f'"""{what}"""' if len(what) < 80 else f'"""{what[:75]} ..."""')
            body = QuadratureBody(em, {p: self.param_code[p] for p in fparams}, self.rule)
            outs = [(f"_v{i}", sp_) for i, sp_ in enumerate(specs)]
            body.emit(outs, argn, NumbaPrinter({}))
            em.line(f"return {', '.join(o for o, _ in outs)}{',' if len(outs) == 1 else ''}")
            self.sources.append("\n".join(em.lines))
            self.funcs[key] = (name, fparams)
        return self.funcs[key]


def _accumulate(em: Emitter, targets, weight: str, values):
    """``t += weight * (v)`` for each target and value."""
    for t, v in zip(targets, values):
        em.line(f"{t} += {weight} * ({v})")


def _same(f, g) -> bool:
    return f == g or sp.expand(f - g) == 0
