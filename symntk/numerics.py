r"""The numeric form of a derivation: the equations that the NumPy evaluator (:mod:`symntk.evaluate`)
and the code generator (:mod:`symntk.codegen`) both evaluate, so that the two agree by construction.

It is :meth:`~symntk.equations.Derivation.reduced` (the closed-form table applied) with two
numerical conventions, each defined once in the closed-form table (:mod:`symntk.gaussian`):

1. **Stable correlations near 1.**  The arc-cosine kernels (TP2 Fact E.2, Cho & Saul 2009) read the
   angle ``theta = acos(S12 / sqrt(S11 S22))``; for two inputs a distance ``eps`` apart,
   ``theta ~ eps`` while the rounding error of ``S12 / sqrt(S11 S22)`` is ~1e-16, so ``acos`` returns
   ``theta`` with an absolute error ~1e-8 and deep networks compound it.  Here every pair kernel
   ``T(xi, xi')`` whose correlation reaches such a closed form gets a companion, the squared
   distance ``dist_T = E (Z(xi) - Z(xi'))^2 = T(xi, xi) + T(xi', xi') - 2 T(xi, xi')``, computed by
   its own recursion that never forms that difference:

   * at the input, ``||xi - xi'||^2 / d`` from the data (the ``distance`` input symbol);
   * through Dense layers and biases, linearly (``sigma_w^2 dist``: biases cancel exactly);
   * through a nonlinearity, by the entry's ``distance`` form (e.g. ``dist/2 - sqrt(S11 S22)/pi
     (sin theta - theta cos theta)`` for ReLU);

   and the closed forms are evaluated in ``gap = 1 - c`` (:func:`~symntk.gaussian.correlation_gap`)
   by the entry's ``stable`` form.  A pair kernel whose equation is not linear in table entries and
   pair kernels (with the same coefficients for ``xi`` and ``xi'``) gets the plain difference
   ``T00 + T11 - 2 T01`` instead: no worse than the correlation itself.  Kernels of identical inputs
   then equal the diagonal system's to rounding, and near-duplicate inputs keep their digits.

2. **Zero-variance limits.**  Negative powers of a variance (the ``1/sqrt(S11 S22)`` of a
   correlation) become :class:`~symntk.gaussian.SafePow` (0 at a zero variance, i.e. ``c = 0``):
   an input of zero norm without biases has a kernel (the limit), in both numeric paths.

Programs over positions (sequences) get only the second convention for now.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from .equations import Derivation, Equation, Loop
from .gaussian import DualActivation, GaussianExpectation, SafePow, correlation_gap, reduce_node

__all__ = ["numeric_form"]


def numeric_form(d: Derivation) -> Derivation:
    """The numeric form of ``d`` (module docstring), cached on ``d``; its diagonal system too."""
    cached = getattr(d, "_numeric", None)
    if cached is not None:
        return cached
    has_positions = any(inp.positions for inp in d.program.inputs)
    if d.closed_forms or has_positions or d.diagonal is None:
        out = d.reduced()
    else:
        out = _Stabilizer(d).run()
    out = _safe_powers(out)
    if d.diagonal is not None:
        out = replace(out, diagonal=numeric_form(d.diagonal))
    object.__setattr__(out, "_reduced", None)
    object.__setattr__(out, "_numeric", out)
    object.__setattr__(d, "_numeric", out)        # a cache: the data stay frozen
    return out


# ==================================================================================== helpers
def _map_rhs(d: Derivation, f) -> Derivation:
    def step(s):
        if isinstance(s, Loop):
            return Loop(s.index, s.start, s.stop, s.direction,
                        tuple(Equation(e.lhs, f(e.rhs)) for e in s.equations))
        return Equation(s.lhs, f(s.rhs))
    return replace(d, steps=[step(s) for s in d.steps],
                   nngp=None if d.nngp is None else f(d.nngp), ntk=f(d.ntk),
                   ntk_terms={k: f(v) for k, v in d.ntk_terms.items()}, _reduced=None)


def _safe_powers(d: Derivation) -> Derivation:
    """Negative powers of variances (diagonal kernel symbols) -> SafePow (zero-variance limit)."""
    variances = {k for k, i in {**d.info, **d.inputs}.items()
                 if i.kind in ("C", "D", "input") and len(set(i.copies)) == 1
                 and not i.extra.get("distance")}

    def is_variance(b):
        key = b.base.label if isinstance(b, sp.Indexed) else b
        return key in variances

    def is_var_pow(x):
        return (isinstance(x, sp.Pow) and x.exp.is_Number and x.exp < 0
                and isinstance(x.base, (sp.Symbol, sp.Indexed)) and is_variance(x.base))
    return _map_rhs(d, lambda e: sp.sympify(e).replace(is_var_pow, lambda x: SafePow(x.base, x.exp)))


def _named(expr: sp.Expr, ref: sp.Expr) -> sp.Expr:
    """``expr`` reduced by the table with named entries left as DualActivation nodes (as the
    LaTeX printer does); ``ref`` (the reduced expression) if that would change the value."""
    out = {}
    for n in expr.atoms(GaussianExpectation):
        out[n] = reduce_node(n, named=True)
    candidate = sp.sympify(expr).xreplace(out)
    expanded = candidate.xreplace({n: n.doit() for n in candidate.atoms(DualActivation)})
    return candidate if expanded == ref else ref


def _key(x):
    return x.base.label if isinstance(x, sp.Indexed) else x


def _gap_info(info):
    """What a gap symbol means: 1 - c of the pair kernel it is computed for (class: pair)."""
    from .zcalculus import SymbolInfo
    nodes = tuple(info.nodes) if info is not None else ()
    extra = dict(info.extra) if info is not None else {}
    return SymbolInfo("gap", nodes, (0, 1), False, extra)


def _index_candidates(e0, e1, index):
    """Values ``v`` of ``index`` for which ``e0`` at ``index = v`` may equal ``e1``: matched on
    the indices of one array both read (``a[index + k]`` in ``e0``, ``a[m]`` in ``e1``)."""
    out = []
    for x in sorted(e0.atoms(sp.Indexed), key=sp.default_sort_key):
        k = sp.expand(x.indices[0] - index)
        if k.has(index):
            continue
        for y in e1.atoms(sp.Indexed):
            if y.base == x.base:
                v = sp.expand(y.indices[0] - k)
                if v not in out:
                    out.append(v)
        if out:
            break
    return out


class _Stabilizer:
    """Builds the distance companions and the stable closed forms of one pair derivation."""

    def __init__(self, d: Derivation):
        self.d = d
        self.red = d.reduced()
        self.meaning = {**d.info, **d.inputs}
        # twins: pair key -> (key for copies (0, 0), key for copies (1, 1))
        by_sig = {}
        for k, i in self.meaning.items():
            by_sig[(i.kind, tuple(i.nodes), i.extra.get("hat"), i.extra.get("backward"),
                    tuple(i.copies))] = k
        self.twins = {}
        for k, i in self.meaning.items():
            if tuple(i.copies) == (0, 1):
                sig = (i.kind, tuple(i.nodes), i.extra.get("hat"), i.extra.get("backward"))
                t0, t1 = by_sig.get(sig + ((0, 0),)), by_sig.get(sig + ((1, 1),))
                if t0 is not None and t1 is not None:
                    self.twins[k] = (t0, t1)
        # equations by left-hand side, with their container (None: straight code; else the Loop)
        self.where: dict = {}
        self.named: dict = {}
        for s, r in zip(d.steps, self.red.steps):
            pairs = zip(s.equations, r.equations) if isinstance(s, Loop) else [(s, r)]
            for e, f in pairs:
                self.where[e.lhs] = (s if isinstance(s, Loop) else None, f.rhs)
                self.named[e.lhs] = _named(e.rhs, f.rhs)
        self.delta: dict = {}             # pair key -> its distance key (Symbol / IndexedBase label)
        self.extra_eqs: dict = {}         # lhs after which -> [Equation]
        self.new_info: dict = {}
        self.new_inputs: dict = {}

    # ------------------------------------------------------------------ pair atoms and twins
    def _is_pair(self, x) -> bool:
        i = self.meaning.get(_key(x))
        return i is not None and tuple(i.copies) == (0, 1)

    def _pair_atoms(self, e):
        atoms = {x for x in e.atoms(sp.Indexed) if self._is_pair(x)}
        inner = set().union(*(x.free_symbols for x in atoms)) if atoms else set()
        atoms |= {s for s in e.free_symbols if s not in inner and self._is_pair(s)}
        return atoms

    def _twin_of(self, x, c: int):
        key = _key(x)
        if key not in self.twins:
            return None
        t = self.twins[key][c]
        return sp.IndexedBase(t)[x.indices] if isinstance(x, sp.Indexed) else t

    def _twin(self, e, c: int):
        """``e`` (pair atoms and DualActivations) with both inputs replaced by input ``c``."""
        sub = {}
        for dual in e.atoms(DualActivation):
            s11, s12, s22, _ = dual.stats
            v = s11 if c == 0 else s22
            sub[dual] = dual.entry(v, v, v, sp.S.One)
        e = e.xreplace(sub)
        sub = {}
        for x in self._pair_atoms(e):
            t = self._twin_of(x, c)
            if t is None:
                return None
            sub[x] = t
        return e.xreplace(sub)

    # ------------------------------------------------------------------ distances
    def distance(self, e01, e00, e11, anchor=None):
        """A stable expression of ``e00 + e11 - 2 e01``, or None.

        ``e01`` must be linear in pair atoms and table entries, ``e00``/``e11`` its twins; then
        the distance is the same linear combination of the atoms' distances.
        """
        duals = sorted(e01.atoms(DualActivation), key=sp.default_sort_key)
        holes = {x: sp.Dummy() for x in duals}
        rest = e01.xreplace(holes)
        for x in sorted(self._pair_atoms(rest), key=sp.default_sort_key):
            holes[x] = sp.Dummy()
        items = list(holes)
        body = e01.xreplace(holes)
        if not items:
            return sp.S.Zero if sp.expand(e00 - e01) == 0 and sp.expand(e11 - e01) == 0 else None
        try:
            poly = sp.Poly(body, *holes.values())
        except sp.PolynomialError:
            return None
        if poly.total_degree() > 1 or any(self._pair_atoms(c) or c.atoms(DualActivation)
                                          for c in poly.coeffs()):
            return None
        for c, ec in ((0, e00), (1, e11)):
            t = self._twin(e01, c)
            if t is None or sp.expand(t - ec) != 0:
                return None
        total = []
        for x in items:
            coeff = poly.coeff_monomial(holes[x])
            if coeff == 0:
                continue
            dx = self._item_distance(x, anchor)
            if dx is None:
                return None
            total.append(coeff * dx)
        return sp.Add(*total)

    def _item_distance(self, x, anchor):
        if isinstance(x, DualActivation):
            s11, s12, s22, c = x.stats
            entry = x.entry
            dist = self.distance(s12, s11, s22) if entry.distance is not None else None
            if dist is not None:
                return entry.distance(s11, s22, dist, self._gap(s11, s22, dist, anchor))
            return entry(s11, s11, s11, sp.S.One) + entry(s22, s22, s22, sp.S.One) - 2 * x.doit()
        key = _key(x)
        dkey = self._family(key)
        if dkey is None:
            return None
        return dkey[x.indices] if isinstance(x, sp.Indexed) else dkey

    def _family(self, key):
        """The distance companion of the pair kernel family ``key`` (built on first use)."""
        if key in self.delta:
            return self.delta[key]
        info = self.meaning.get(key)
        if key not in self.twins or info is None:
            return None
        if key in self.d.inputs:
            dsym = sp.Symbol(f"dist_{key.name}", real=True)
            self.new_inputs[dsym] = replace(info, extra={**info.extra, "distance": True})
            self.delta[key] = dsym
            return dsym
        eqs = [lhs for lhs in self.where if _key(lhs) == key]
        plan = []
        for lhs in eqs:
            # (an entry without both twins, e.g. the last layer's C(xi, xi') of an MLP, is read
            # by no correlation: it gets no companion)
            t0, t1 = self._twin_of(lhs, 0), self._twin_of(lhs, 1)
            if t0 in self.where and t1 in self.where and \
                    self.where[lhs][0] is self.where[t0][0] is self.where[t1][0]:
                plan.append((lhs, t0, t1))
        if not plan:
            return None
        indexed = any(isinstance(lhs, sp.Indexed) for lhs in eqs)
        name = f"dist_{key.name}"
        dkey = sp.IndexedBase(name) if indexed else sp.Symbol(name, real=True)
        dlabel = dkey.label if indexed else dkey
        self.delta[key] = dkey
        self.new_info[dlabel] = replace(info, kind="dist", extra={**info.extra, "distance_of": key})
        for lhs, t0, t1 in plan:
            rhs = self.distance(self.named[lhs], self.where[t0][1], self.where[t1][1], lhs)
            if rhs is None:                  # the plain difference: no worse than today
                rhs = t0 + t1 - 2 * lhs
            target = dkey[lhs.indices] if indexed else dkey
            after = max((lhs, t0, t1), key=self._position)
            self.extra_eqs.setdefault(after, []).append(Equation(target, rhs))
        return dkey

    def _position(self, lhs):
        return list(self.where).index(lhs)

    def _gap(self, s11, s22, dist, anchor):
        """The symbol of ``gap = 1 - c`` (:func:`~symntk.gaussian.correlation_gap`), defined by its
        own equation just before ``anchor``: an atom, so that no closed form distributes its
        products over it (``(1 - c)/2`` must not become ``1/2 - c/2``)."""
        container = self.where[anchor][0]
        expr = correlation_gap(s11, s22, dist)
        key = (id(container), expr)
        sym = self.gaps.get(key)
        if sym is None:
            sym = self._earlier_gap(expr, anchor)
            if sym is not None:
                return sym
        if sym is None:
            n = len(self.gaps)
            if container is not None and expr.has(container.index):
                sym = sp.IndexedBase(f"gap{n}")[container.index]
                label = sym.base.label
            else:
                sym = label = sp.Symbol(f"gap{n}", real=True)
            self.gaps[key] = sym
            self.new_info[label] = _gap_info(self.meaning.get(_key(anchor)))
            self.gap_eqs[sym] = (anchor, expr)
        elif self._position(anchor) < self._position(self.gap_eqs[sym][0]):
            self.gap_eqs[sym] = (anchor, expr)     # needed earlier than first met
        return sym

    def _earlier_gap(self, expr, anchor):
        """The gap of an earlier loop that equals ``expr`` at one of its iterations, as that
        loop's entry (e.g. the forward loop's ``gap[l]`` in the backward recursion of layer
        ``l``), or None.  One gap, hence one angle ``theta`` per layer and pair: the backward
        pass reads the forward's instead of recomputing it (the code generator then computes
        the angle once, in the forward loop)."""
        here = self.where[anchor][0]
        step = self._step_of(anchor)
        for (_, e0), sym in self.gaps.items():
            if not isinstance(sym, sp.Indexed):
                continue
            loop = self.where[self.gap_eqs[sym][0]][0]
            if loop is None or loop is here or self._step_index[id(loop)] >= step:
                continue
            lidx = loop.index
            lo, hi = sorted((loop.start, loop.stop))
            for cand in _index_candidates(e0, expr, lidx):
                if e0.xreplace({lidx: cand}) != expr:
                    continue
                if here is not None and cand.has(here.index):
                    a, b = sorted((here.start, here.stop))
                    span = (cand.xreplace({here.index: a}), cand.xreplace({here.index: b}))
                else:
                    span = (cand, cand)
                if all(v.is_Integer and lo <= v <= hi for v in span) and \
                        not (cand.free_symbols - ({here.index} if here is not None else set())):
                    return sym.base[cand]
        return None

    def _step_of(self, lhs):
        c = self.where[lhs][0]
        return self._step_index[id(c)] if c is not None else self._step_index[lhs]

    # ------------------------------------------------------------------ rewriting
    def stable(self, e, anchor=None):
        """``e`` (named form) with stable closed forms where the distance of the pair is known
        (``anchor``: the equation being rewritten; None for the outputs: plain closed forms)."""
        sub = {}
        for dual in sorted(e.atoms(DualActivation), key=sp.default_sort_key):
            entry = dual.entry
            s11, s12, s22, _ = dual.stats
            dist = (self.distance(s12, s11, s22, anchor)
                    if entry.stable is not None and anchor is not None else None)
            sub[dual] = (dual.doit() if dist is None
                         else entry.stable(s11, s22, self._gap(s11, s22, dist, anchor)))
        return e.xreplace(sub)

    def _output(self, expr, ref):
        return self.stable(_named(expr, ref))

    def run(self) -> Derivation:
        d, red = self.d, self.red
        self.gaps, self.gap_eqs = {}, {}
        self._step_index = {}
        for k, s in enumerate(d.steps):
            self._step_index[id(s) if isinstance(s, Loop) else s.lhs] = k
        rewritten = {lhs: self.stable(self.named[lhs], lhs) for lhs in self.where}
        outputs = dict(nngp=None if d.nngp is None else self._output(d.nngp, red.nngp),
                       ntk=self._output(d.ntk, red.ntk),
                       ntk_terms={k: self._output(v, red.ntk_terms[k]) for k, v in d.ntk_terms.items()})
        before: dict = {}
        for sym, (anchor, expr) in self.gap_eqs.items():
            before.setdefault(anchor, []).append(Equation(sym, expr))

        def with_extra(lhs):
            out = before.get(lhs, []) + [Equation(lhs, rewritten[lhs])]
            return out + self.extra_eqs.get(lhs, [])

        steps = []
        for s in d.steps:
            if isinstance(s, Loop):
                body = tuple(q for e in s.equations for q in with_extra(e.lhs))
                steps.append(Loop(s.index, s.start, s.stop, s.direction, body))
            else:
                steps.extend(with_extra(s.lhs))
        return replace(red, steps=steps, info={**red.info, **self.new_info},
                       inputs={**red.inputs, **self.new_inputs}, _reduced=None, **outputs)
