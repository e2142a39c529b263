"""Numba kernels for derivations over positions (sequences).

A positioned derivation is a set of kernel families (F[t], F[t, r]) defined by one equation each
and read at shifted indices, plus scalars (sums over positions).  This module schedules them and
prints one Numba module:

* **schedule.**  Families are grouped into strongly connected components of their read graph; a
  component is one loop nest over its indices, each axis running up or down as its reads require
  (F[t - 1, r - 1]: up, as TP2 Eq. 14's forward recursion; F[t + 1, r + 1]: down, as backprop),
  and within one (t, r) the equations in the order of their same-position reads.
* **passes.**  Families over the positions of one input (the variances q^t = C(xi^t, xi^t)) are
  computed once per sequence (``per_input_0`` over X1, ``per_input_1`` over X2); families over
  position pairs of two sequences live in per-thread scratch of O(T Tbar) in ``pairs``, which
  runs over sequence pairs with ``prange`` (the upper triangle when X2 is X1); nothing of size
  O(N1 N2 T Tbar) is ever stored.  The diagonal k(xi, xi) comes from the same-input system.
* **printing.**  Expressions print with :class:`symntk.codegen.NumbaPrinter` (clipped acos/asin,
  guarded square roots); sums over positions become accumulation loops.

Positions outside 1..T read zero (arrays are padded by one on each side): the zero state before
the first token, no gradient after the last.  Reads more than one position away, families over
three indices, and Gaussian expectations without a closed form are not generated yet
(NotImplementedError; the NumPy evaluator computes them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..equations import Derivation
from ..zcalculus import LENGTH

__all__ = ["compile_positions", "PositionKernel"]

CODEGEN_VERSION = "p1"


# ================================================================================= schedule
@dataclass
class _Family:
    label: sp.Symbol
    generic: tuple          # generic index symbols of the lhs (t,) or (t, r)
    axes: tuple             # input copy of each index
    rhs: sp.Expr


def _families(d: Derivation) -> tuple[dict, list]:
    fams, scalars = {}, []
    for eq in d.equations:
        if isinstance(eq.lhs, sp.Indexed):
            label = eq.lhs.base.label
            axes = d.info[label].extra.get("axes", ())
            fams[label] = _Family(label, tuple(eq.lhs.indices), tuple(axes), eq.rhs)
        else:
            scalars.append(eq)
    return fams, scalars


def _reads(expr, fams) -> list:
    """(label, offsets) of every family entry ``expr`` reads, offsets relative to the generic
    index of the reading equation."""
    out = []
    for ind in expr.atoms(sp.Indexed):
        if ind.base.label in fams:
            out.append((ind.base.label, tuple(ind.indices)))
    return out


def _sccs(nodes: list, edges: dict) -> list:
    """Tarjan's strongly connected components, dependencies first."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


@dataclass
class _Nest:
    """One loop nest: families computed together, axis directions, equations in order."""
    families: list
    generic: tuple
    axes: tuple
    directions: tuple


def _schedule(fams: dict) -> list[_Nest]:
    labels = list(fams)
    edges = {l: sorted({r for r, _ in _reads(fams[l].rhs, fams)}, key=str) for l in labels}
    nests = []
    for comp in _sccs(labels, edges):
        members = set(comp)
        f0 = fams[comp[0]]
        for l in comp:
            if fams[l].axes != f0.axes:
                raise NotImplementedError(f"families {comp} mix index sets in one recursion")
        directions = []
        same_pos_edges = {l: set() for l in comp}
        for k, g in enumerate(f0.generic):
            offs = set()
            for l in comp:
                fam = fams[l]
                for r, idx in _reads(fam.rhs, fams):
                    if r not in members:
                        continue
                    shift = [sp.expand(i - gg) for i, gg in zip(idx, fam.generic)]
                    if any(not s.is_Integer or abs(int(s)) > 1 for s in shift):
                        raise NotImplementedError(f"{l} reads {r} at {idx}: only neighbours "
                                                  "(t - 1, t + 1) are generated")
                    if all(s == 0 for s in shift[:k]) and shift[k] != 0:
                        offs.add(int(shift[k]))
                    if all(s == 0 for s in shift):
                        same_pos_edges[l].add(r)
            if len(offs) > 1:
                raise NotImplementedError(f"recursion {comp} runs both ways along {g}")
            directions.append(-1 if offs == {1} else 1)
        order = []
        for c in _sccs(comp, {l: sorted(same_pos_edges[l] - {l}, key=str) for l in comp}):
            if len(c) > 1:
                raise NotImplementedError(f"families {c} define each other at one position")
            order.extend(c)
        nests.append(_Nest(order, f0.generic, f0.axes, tuple(directions)))
    return nests


# ================================================================================= printing
class _Printer:
    """NumbaPrinter with storage templates for family entries and input kernels."""

    def __init__(self, storage: dict):
        from .printer import NumbaPrinter

        class P(NumbaPrinter):
            def _print_Indexed(self_, expr):
                label = expr.base.label
                if label not in storage:
                    raise NotImplementedError(f"no storage for {expr}")
                return storage[label].format(*[self_._print_index(i) for i in expr.indices])

            def _print_index(self_, i):
                return _index_code(i)

            def _print_KroneckerDelta(self_, expr):
                a, b = (_index_code(x) for x in expr.args)
                return f"(1.0 if {a} == {b} else 0.0)"

        self.p = P()

    def __call__(self, expr) -> str:
        return self.p.doprint(expr)


def _index_code(i) -> str:
    i = sp.sympify(i)
    if i.is_Integer:
        return str(int(i))
    return str(i).replace(" ", "")


# ================================================================================= emission
class _Emitter:
    def __init__(self):
        self.lines = []
        self.tmp = 0

    def emit(self, depth, text):
        self.lines.append("    " * depth + text)

    def fresh(self, stem="s"):
        self.tmp += 1
        return f"_{stem}{self.tmp}"


def _emit_expr(em: _Emitter, pr: _Printer, depth: int, expr: sp.Expr, target: str):
    """``target = expr`` with every Sum over positions unrolled into accumulation loops."""
    sub = {}
    for s in _outermost_sums(expr):
        acc = em.fresh("acc")
        em.emit(depth, f"{acc} = 0.0")
        d = depth
        for (i, lo, hi) in reversed(s.limits):
            em.emit(d, f"for {i} in range({_index_code(lo)}, {_index_code(hi)} + 1):")
            d += 1
        inner = em.fresh("term")
        _emit_expr(em, pr, d, s.function, inner)
        em.emit(d, f"{acc} += {inner}")
        sub[s] = sp.Symbol(acc)
    em.emit(depth, f"{target} = {pr(expr.xreplace(sub))}")


def _outermost_sums(expr):
    out, stack = [], [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, sp.Sum):
            out.append(e)
            continue
        stack.extend(e.args)
    return list(dict.fromkeys(out))


def _length(copy: int) -> str:
    return "T0" if copy == 0 else "T1"


def _emit_nests(em, pr, depth, nests, fams, store_of):
    for nest in nests:
        d = depth
        for g, axis, direction in zip(nest.generic, nest.axes, nest.directions):
            L = _length(axis)
            rng = f"range(1, {L} + 1)" if direction > 0 else f"range({L}, 0, -1)"
            em.emit(d, f"for {g} in {rng}:")
            d += 1
        for label in nest.families:
            fam = fams[label]
            tmp = em.fresh("v")
            _emit_expr(em, pr, d, fam.rhs, tmp)
            em.emit(d, f"{store_of(label).format(*[str(g) for g in fam.generic])} = {tmp}")


def _own_token_kernels(pair: Derivation, one: dict):
    """A rewrite of pair-stage expressions reading a sequence's own token kernel k_ii[p, p] =
    xi_i^p . xi_i^p / d (the variance of a position-wise first layer W xi^t, whose covariance
    with the other sequence's W xi'^r reads it directly, with no family in between) as a family
    of that input over one index, added to ``one``: computed once per sequence in
    ``per_input_i``, where k_ii is at hand, instead of once per pair."""
    own = {l: info.copies[0] for l, info in pair.inputs.items()
           if info.copies[0] == info.copies[1]}
    made = {}

    def lift(expr):
        sub = {}
        for ind in expr.atoms(sp.Indexed):
            label = ind.base.label
            if label not in own:
                continue
            p, q = ind.indices
            if sp.expand(p - q) != 0:
                raise NotImplementedError(
                    f"{ind} (one sequence's tokens at two positions) is read per pair of "
                    "sequences; compiled kernels read it only within families of one input")
            if label not in made:
                g = sp.Symbol("t", integer=True, positive=True)
                name = sp.Symbol(f"q_{label}")
                one[name] = _Family(name, (g,), (own[label],), ind.base[g, g])
                made[label] = sp.IndexedBase(name)
            sub[ind] = made[label][p]
        return expr.xreplace(sub)
    return lift


def _hoist(cross: dict, one: dict) -> None:
    """Move subexpressions of the cross recursions that read one sequence only (e.g.
    sqrt(1 + 2 q^t) in V_erf) into new families of that sequence, computed once per input
    instead of once per pair and position pair."""
    made = {}

    def side_of(expr):
        reads = expr.atoms(sp.Indexed)
        labels = {r.base.label for r in reads} | {r.base for r in reads} | reads
        others = expr.free_symbols - labels - {i for r in reads for i in r.indices}
        if not reads or any(not str(o).startswith(("theta[", "T0", "T1")) for o in others):
            return None
        keys = set()
        for r in reads:
            fam = one.get(r.base.label)
            if fam is None or len(fam.axes) != 1 or not isinstance(r.indices[0], sp.Symbol):
                return None
            keys.add((fam.axes[0], r.indices[0]))
        return keys.pop() if len(keys) == 1 else None

    def costly(expr):
        return any(isinstance(a, sp.Function) or (isinstance(a, sp.Pow) and not a.exp.is_Integer)
                   for a in sp.preorder_traversal(expr))

    def visit(expr):
        if isinstance(expr, (sp.Indexed, sp.Symbol, sp.Number)) or not expr.args:
            return expr
        key = side_of(expr)
        if key is not None and costly(expr):
            side, index = key
            if expr not in made:
                label = sp.Symbol(f"H{len(made)}_{side}")
                one[label] = _Family(label, (index,), (side,), expr)
                made[expr] = label
            return sp.IndexedBase(made[expr])[index]
        return expr.func(*[visit(a) for a in expr.args])

    for fam in cross.values():
        fam.rhs = visit(fam.rhs)


def _check_closed(d: Derivation):
    from ..gaussian import GaussianExpectation
    for e in d.equations:
        if e.rhs.has(GaussianExpectation):
            raise NotImplementedError(
                f"{e.lhs} needs a Gaussian expectation without closed form; compiled kernels over "
                "positions use closed forms only so far (Derivation.gram evaluates it)")


def _source(pair: Derivation, diag: Derivation, params: list) -> tuple[str, list]:
    pair, diag = pair.reduced(), diag.reduced()
    _check_closed(pair)
    _check_closed(diag)
    fams, scalars = _families(pair)
    dfams, dscalars = _families(diag)
    for f in list(fams.values()) + list(dfams.values()):
        if len(f.axes) > 2:
            raise NotImplementedError(f"family {f.label} has {len(f.axes)} position indices")
    names = {s: f"theta[{k}]" for k, s in enumerate(params)}
    term_names = list(pair.ntk_terms)

    def subst(expr):
        return expr.xreplace({s: sp.Symbol(n) for s, n in names.items()}).xreplace(
            {LENGTH[0]: sp.Symbol("T0"), LENGTH[1]: sp.Symbol("T1")})

    # ---- storage templates
    one = {l: f for l, f in fams.items() if set(f.axes) <= {0} or set(f.axes) <= {1}}
    cross = {l: f for l, f in fams.items() if l not in one}
    for f in fams.values():
        f.rhs = subst(f.rhs)
    lift = _own_token_kernels(pair, one)
    for f in cross.values():
        f.rhs = lift(f.rhs)
    _hoist(cross, one)

    def per_input_store(label, fam, row):
        dims = ", ".join("{%d}" % k for k in range(len(fam.axes)))
        return f"{_ident(label)}[{row}, {dims}]"

    storage = {}
    for l, f in one.items():
        storage[l] = per_input_store(l, f, "a" if f.axes[0] == 0 else "b")
    for l, f in cross.items():
        storage[l] = f"{_ident(l)}[" + ", ".join("{%d}" % k for k in range(len(f.axes))) + "]"
    for l, info in pair.inputs.items():
        i, j = info.copies
        storage[l] = f"{_ident(l)}[{{0}}, {{1}}]"
    pr = _Printer(storage)
    em = _Emitter()
    em.emit(0, "import math")
    em.emit(0, "import numpy as np")
    em.emit(0, "from numba import njit, prange")
    em.emit(0, "CACHE = True")
    from .module import helpers_source
    em.lines.extend(helpers_source().splitlines())

    for f in dfams.values():
        f.rhs = subst(f.rhs)
    pair_outputs = [lift(subst(pair.nngp if pair.nngp is not None else sp.Integer(0)))] + \
        [lift(subst(pair.ntk_terms[n])) for n in term_names]
    diag_outputs = [subst(diag.nngp if diag.nngp is not None else sp.Integer(0))] + \
        [subst(diag.ntk_terms[n]) for n in term_names]
    scalars = [(e.lhs, lift(subst(e.rhs))) for e in scalars]
    for l, f in one.items():                    # own token kernels the outputs read
        storage.setdefault(l, per_input_store(l, f, "a" if f.axes[0] == 0 else "b"))
    dscalars = [(e.lhs, subst(e.rhs)) for e in dscalars]
    pr.p.names.update({sp.Symbol(f"theta[{k}]"): f"theta[{k}]" for k in range(len(params))})
    for s, _ in scalars + dscalars:
        pr.p.names[s] = _ident(s)

    # ---- per-input pass over one side: families of that copy, stored (N, T + 2[, T + 2])
    for copy, side in ((0, "a"), (1, "b")):
        mine = {l: f for l, f in one.items() if f.axes[0] == copy}
        k_in = [l for l, info in pair.inputs.items() if info.copies == (copy, copy)]
        args = ", ".join(["X", "theta"] + [_ident(l) for l in mine])
        em.emit(0, "")
        em.emit(0, "@njit(cache=CACHE, parallel=True, error_model='numpy')")
        em.emit(0, f"def per_input_{copy}({args}):")
        em.emit(1, f"N, T{copy}, dim = X.shape")
        em.emit(1, f"for {side} in prange(N):")
        for l in k_in:
            em.emit(2, f"{_ident(l)} = np.zeros((T{copy} + 2, T{copy} + 2))")
            em.emit(2, f"for p in range(T{copy}):")
            em.emit(3, f"for q in range(T{copy}):")
            em.emit(4, f"{_ident(l)}[p + 1, q + 1] = np.dot(X[{side}, p], X[{side}, q]) / dim")
        _emit_nests(em, pr, 2, _schedule(mine) if mine else [], mine, lambda l: storage[l])
        em.emit(1, "return 0")

    # ---- pairs: cross families in per-thread scratch, outputs per pair
    carg = ", ".join(["X1", "X2", "theta", "symmetric", "out"] +
                     [_ident(l) for l in one])
    em.emit(0, "")
    em.emit(0, "@njit(cache=CACHE, parallel=True, error_model='numpy')")
    em.emit(0, f"def pairs({carg}):")
    em.emit(1, "N1, T0, dim = X1.shape")
    em.emit(1, "N2, T1, _ = X2.shape")
    em.emit(1, "for a in prange(N1):")
    # per-thread scratch, reused for every b: the interior is overwritten, the zero border stays
    for l, info in pair.inputs.items():
        if info.copies == (0, 1):
            em.emit(2, f"{_ident(l)} = np.zeros((T0 + 2, T1 + 2))")
    for l, f in cross.items():
        shape = ", ".join(f"{_length(c)} + 2" for c in f.axes)
        em.emit(2, f"{_ident(l)} = np.zeros(({shape},))")
    em.emit(2, "for b in range(a + 1 if symmetric else 0, N2):")
    for l, info in pair.inputs.items():
        if info.copies == (0, 1):
            em.emit(3, "for p in range(T0):")
            em.emit(4, "for q in range(T1):")
            em.emit(5, "acc = 0.0")
            em.emit(5, "for c in range(dim):")
            em.emit(6, "acc += X1[a, p, c] * X2[b, q, c]")
            em.emit(5, f"{_ident(l)}[p + 1, q + 1] = acc / dim")
    _emit_nests(em, pr, 3, _schedule(cross) if cross else [], cross, lambda l: storage[l])
    for lhs, rhs in scalars:
        _emit_expr(em, pr, 3, rhs, _ident(lhs))
    for k, e in enumerate(pair_outputs):
        tmp = em.fresh("o")
        _emit_expr(em, pr, 3, e, tmp)
        em.emit(3, f"out[{k}, a, b] = {tmp}")
    em.emit(1, "return 0")

    # ---- the diagonal k(xi, xi): the same-input system, all per input
    dstorage = {}
    for l, f in dfams.items():
        dstorage[l] = f"{_ident(l)}[" + ", ".join("{%d}" % k for k in range(len(f.axes))) + "]"
    for l in diag.inputs:
        dstorage[l] = f"{_ident(l)}[{{0}}, {{1}}]"
    dpr = _Printer(dstorage)
    dpr.p.names.update(pr.p.names)
    em.emit(0, "")
    em.emit(0, "@njit(cache=CACHE, parallel=True, error_model='numpy')")
    em.emit(0, "def diagonal(X, theta, out):")
    em.emit(1, "N, T0, dim = X.shape")
    em.emit(1, "T1 = T0")
    em.emit(1, "for a in prange(N):")
    for l in diag.inputs:
        em.emit(2, f"{_ident(l)} = np.zeros((T0 + 2, T0 + 2))")
        em.emit(2, "for p in range(T0):")
        em.emit(3, "for q in range(T0):")
        em.emit(4, f"{_ident(l)}[p + 1, q + 1] = np.dot(X[a, p], X[a, q]) / dim")
    for l, f in dfams.items():
        shape = ", ".join("T0 + 2" for _ in f.axes)
        em.emit(2, f"{_ident(l)} = np.zeros(({shape},))")
    _emit_nests(em, dpr, 2, _schedule(dfams) if dfams else [], dfams, lambda l: dstorage[l])
    for lhs, rhs in dscalars:
        _emit_expr(em, dpr, 2, rhs, _ident(lhs))
    for k, e in enumerate(diag_outputs):
        tmp = em.fresh("o")
        _emit_expr(em, dpr, 2, e, tmp)
        em.emit(2, f"out[{k}, a] = {tmp}")
    em.emit(1, "return 0")
    shapes = {l: len(f.axes) for l, f in one.items()}
    one_sides = {l: f.axes[0] for l, f in one.items()}
    return "\n".join(em.lines) + "\n", term_names, shapes, one_sides


def _ident(sym) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(sym))


# ================================================================================= driver
class PositionKernel:
    """A compiled positioned derivation: ``k(X1, X2=None, params=None)`` -> KernelResult."""

    def __init__(self, derivation: Derivation, module, params: list, term_names: list,
                 shapes: dict, sides: dict):
        self.derivation = derivation
        self.module = module
        self.params = params
        self.term_names = term_names
        self.shapes = shapes
        self.sides = sides

    def __call__(self, X1, X2=None, params=None):
        from ..binding import bind_parameters
        from ..evaluate_positions import check_sequences
        from ..result import KernelResult
        dim = self.derivation.program.inputs[0].dim
        X1 = np.ascontiguousarray(check_sequences(X1, "X1", dim))
        symmetric = X2 is None
        X2 = X1 if symmetric else np.ascontiguousarray(check_sequences(X2, "X2", dim))
        if X2.shape[2] != X1.shape[2]:
            raise ValueError(f"X1 has tokens of dimension {X1.shape[2]} but X2 of {X2.shape[2]}")
        consts = bind_parameters(self.derivation, params, X1.shape[2])
        theta = np.array([float(consts[p]) for p in self.params], dtype=np.float64)
        m = self.module
        tables = []
        for label, n_idx in self.shapes.items():
            X = X1 if self.sides[label] == 0 else X2
            shape = (X.shape[0],) + (X.shape[1] + 2,) * n_idx
            tables.append(np.zeros(shape))
        for copy, X in ((0, X1), (1, X2)):
            mine = [t for t, l in zip(tables, self.shapes) if self.sides[l] == copy]
            getattr(m, f"per_input_{copy}")(X, theta, *mine)
        K = len(self.term_names) + 1
        out = np.zeros((K, X1.shape[0], X2.shape[0]))
        m.pairs(X1, X2, theta, symmetric, out, *tables)
        if symmetric:
            dg = np.zeros((K, X1.shape[0]))
            m.diagonal(X1, theta, dg)
            from ..kernels import symmetrize
            for k in range(K):
                symmetrize(out[k], dg[k])
        if not np.all(np.isfinite(out)):
            raise ValueError("the compiled kernel produced NaN/inf (a token sequence of zero norm "
                             "without biases makes a correlation 0/0)")
        terms = {n: out[k + 1] for k, n in enumerate(self.term_names)}
        ntk = sum(terms.values()) if terms else np.zeros_like(out[0])
        return KernelResult(out[0] if self.derivation.nngp is not None else None, ntk, terms)


def compile_positions(derivation: Derivation) -> PositionKernel:
    """Generate the Numba module of a positioned derivation and load it through the kernel
    cache (:func:`symntk.codegen.cache.load_module`)."""
    from .cache import load_module, source_hash
    from .module import ModuleSource
    params = sorted(derivation.parameters(), key=str)
    source, term_names, shapes, sides = _source(derivation, derivation.diagonal, params)
    module, _ = load_module(ModuleSource(source, source_hash(CODEGEN_VERSION + source), "positions"))
    return PositionKernel(derivation, module, params, term_names, shapes, sides)
