"""The plan: a derivation's equations as blocks of assignments (straight code or loops over a
layer index) and the storage family of every derived quantity, classified by the inputs it
depends on: copy 0 (xi), copy 1 (xi'), or both ("pair").  Copy-1 quantities are computed by
the copy-0 code run on the other input (:func:`class0_twins`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy as sp

from ..binding import bind
from ..equations import Derivation, Loop
from ..gaussian import GaussianExpectation, SafePow

if TYPE_CHECKING:                                   # annotations only: quadrature imports us
    from .quadrature import QuadCalls

__all__ = ["SafePow", "Eq", "Block", "Family", "Plan", "Twins", "class0_twins", "structural"]


def intval(e, what: str) -> int:
    e = sp.sympify(e)
    if not e.is_Integer:
        raise ValueError(f"{what} {e} is not an integer; bind the symbols in it with "
                         f"compile(params={{...}})")
    return int(e)



@dataclass
class Eq:
    """``lhs = rhs``; ``lhs`` a Symbol or ``Indexed``; ``guard`` (lo, hi): only for l in it."""
    lhs: sp.Expr
    rhs: sp.Expr
    guard: tuple | None = None


@dataclass
class Block:
    """A loop ``for l in [start, stop]`` (direction +1 up, -1 down), or straight code
    (``index`` None)."""
    eqs: list
    index: sp.Symbol | None = None
    start: int = 0
    stop: int = -1
    direction: int = 1


@dataclass
class Family:
    """Storage of one derived quantity: a scalar, or an array over the index range [lo, hi]."""
    key: sp.Basic                  # Symbol or IndexedBase label
    cls: object                    # 0, 1 (one input) or "pair"
    lo: int | None = None
    hi: int | None = None
    kind: str = ""                 # SymbolInfo.kind ("C", "D", "mu", "input", ...) or "hoisted"

    @property
    def is_array(self) -> bool:
        return self.lo is not None


def key_of(e):
    return e.base.label if isinstance(e, sp.Indexed) else e


def refs(e) -> set:
    """Derived quantities an expression reads: Indexed atoms and plain Symbols."""
    out = set(e.atoms(sp.Indexed))
    inner = set()
    for ind in out:
        inner |= ind.free_symbols | {ind.base.label}
    for s in e.free_symbols:
        if isinstance(s, sp.Symbol) and not isinstance(s, sp.Indexed) and s not in inner:
            out.add(s)
    return out


# ================================================================================ the analysis
class Plan:
    """Everything the emitter needs for one derivation: families, blocks, hoists, outputs."""

    def __init__(self, derivation: Derivation, structural: dict, quads: QuadCalls):
        self.quads = quads
        self.structural = structural
        d = derivation.numeric()      # the evaluator's equations: stable correlations, SafePow
        self.derivation = d
        self.params: list = []
        self.info = dict(d.info)
        self.info.update(d.inputs)
        self.inputs = dict(d.inputs)
        self.blocks = self._blocks(d.steps)
        self.outputs = self._outputs(d)
        self.families: dict = {}
        self._collect_families()

    # ---------------------------------------------------------------------------- steps
    def _prep(self, e):
        """Structural substitution, expectation nodes -> quadrature calls.  (Negative powers of
        variances are already :class:`~symntk.gaussian.SafePow`: :mod:`symntk.numerics`.)"""
        e = sp.sympify(e)
        if self.structural:
            e = e.xreplace(self.structural)
        nodes = sorted(e.atoms(GaussianExpectation), key=sp.default_sort_key)
        if nodes:
            e = e.xreplace({n: self.quads.call(n) for n in nodes})
        return e

    def _index(self, e):
        e = sp.sympify(e)
        return e.xreplace(self.structural) if self.structural else e

    def _blocks(self, steps) -> list:
        blocks = []
        for s in steps:
            if isinstance(s, Loop):
                start = intval(self._index(s.start), "loop start")
                stop = intval(self._index(s.stop), "loop stop")
                eqs = [Eq(self._lhs(q.lhs), self._prep(q.rhs)) for q in s.equations]
                blocks.append(Block(eqs, s.index, start, stop, s.direction))
            else:
                eq = Eq(self._lhs(s.lhs), self._prep(s.rhs))
                if blocks and blocks[-1].index is None:
                    blocks[-1].eqs.append(eq)
                else:
                    blocks.append(Block([eq]))
        return blocks

    def _lhs(self, lhs):
        if isinstance(lhs, sp.Indexed):
            return lhs.base[self._index(lhs.indices[0])]
        return lhs

    def _outputs(self, d) -> list:
        outs = []
        if d.nngp is not None:
            outs.append(("nngp", self._prep_out(d.nngp)))
        outs.append(("ntk", self._prep_out(d.ntk)))
        for name, term in d.ntk_terms.items():
            outs.append((("term", name), self._prep_out(term)))
        return outs

    def _prep_out(self, e):
        e = sp.sympify(e)
        sums = e.atoms(sp.Sum)
        sub = {}
        for s in sums:
            (l, lo, hi), = s.limits
            lo, hi = intval(self._index(lo), "Sum limit"), intval(self._index(hi), "Sum limit")
            sub[s] = sp.Sum(self._prep(s.function), (l, lo, hi))
        e = e.xreplace(sub)
        rest = e.xreplace({s: sp.Symbol(f"__sum{i}") for i, s in enumerate(sub.values())})
        return self._prep(rest).xreplace({sp.Symbol(f"__sum{i}"): s
                                          for i, s in enumerate(sub.values())})

    # ---------------------------------------------------------------------------- families
    def _cls_of_key(self, key):
        info = self.info.get(key)
        if info is None:
            return None
        copies = set(c for c in info.copies if c is not None)
        if copies == {0}:
            return 0
        if copies == {1}:
            return 1
        return "pair"

    def _collect_families(self):
        for b in self.blocks:
            for q in b.eqs:
                self._add_assignment(q.lhs, b)
        for sym, info in self.inputs.items():
            self.families[sym] = Family(sym, self._cls_of_key(sym), kind="input")
        # Families whose rhs reads the other class are pair quantities (never in practice).
        changed = True
        while changed:
            changed = False
            for b in self.blocks:
                for q in b.eqs:
                    fam = self.families[key_of(q.lhs)]
                    if fam.cls == "pair":
                        continue
                    for r in refs(q.rhs):
                        f2 = self.families.get(key_of(r))
                        if f2 is not None and f2.cls != fam.cls:
                            fam.cls = "pair"
                            changed = True
                            break
        known = set(self.families) | {b.index for b in self.blocks if b.index is not None}
        free = set()
        for b in self.blocks:
            for q in b.eqs:
                free |= q.rhs.free_symbols
        for _, e in self.outputs:
            free |= e.free_symbols
        sums = set()
        for _, e in self.outputs:
            for s in e.atoms(sp.Sum):
                sums |= set(s.variables)
        self.params = sorted((s for s in free if s not in known and s not in sums
                              and not isinstance(s, (sp.Indexed, sp.Idx))), key=str)

    def _add_assignment(self, lhs, block: Block):
        key = key_of(lhs)
        fam = self.families.get(key)
        if fam is None:
            info = self.info.get(key)
            fam = self.families[key] = Family(key, self._cls_of_key(key),
                                              kind=info.kind if info else "hoisted")
            if fam.cls is None:
                fam.cls = "pair"
        if isinstance(lhs, sp.Indexed):
            idx = lhs.indices[0]
            if block.index is not None:
                off = intval(idx - block.index, "index offset")
                lo, hi = block.start + off, block.stop + off
            else:
                lo = hi = intval(idx, "index")
            fam.lo = lo if fam.lo is None else min(fam.lo, lo)
            fam.hi = hi if fam.hi is None else max(fam.hi, hi)

    def cls(self, ref):
        fam = self.families.get(key_of(ref))
        return None if fam is None else fam.cls



#: The canonical loop index of per-input definitions.
LIDX = sp.Symbol("l__", integer=True)


class Col(sp.Function):
    """Marks a per-input value read for the *column* input (table T2) in pair code."""
    nargs = 1



@dataclass(frozen=True)
class Twins:
    """Copy-1 quantities and their copy-0 twins (same nodes, same kind)."""
    twins: dict

    def rename(self, e):
        """``e`` with every copy-1 quantity replaced by its copy-0 twin."""
        twins = self.twins
        sub = {}
        for ind in e.atoms(sp.Indexed):
            k = ind.base.label
            if k in twins:
                sub[ind] = sp.IndexedBase(twins[k])[ind.indices[0]]
        for s in e.free_symbols:
            if s in twins:
                sub[s] = twins[s]
        return e.xreplace(sub)


def class0_twins(plan: Plan) -> Twins:
    """Map copy-1 quantities to their copy-0 twins: the per-input code is written once and run
    on both inputs.  Checks that the twins have the same equations."""
    twins = {}
    by_sig = {}
    for key, info in plan.info.items():
        copies = set(c for c in info.copies if c is not None)
        if copies == {0}:
            by_sig[(info.kind, tuple(info.nodes))] = key
    for key, info in plan.info.items():
        copies = set(c for c in info.copies if c is not None)
        if copies == {1}:
            twin = by_sig.get((info.kind, tuple(info.nodes)))
            if twin is None:
                raise NotImplementedError(f"{key} (input xi') has no twin for input xi")
            twins[key] = twin

    rename = Twins(twins).rename
    # check: every copy-1 equation is its twin's equation renamed
    eqs0 = {}
    for b in plan.blocks:
        for q in b.eqs:
            if plan.cls(q.lhs) == 0:
                eqs0[(b.index is not None, q.lhs)] = q.rhs
    for b in plan.blocks:
        for q in b.eqs:
            if plan.cls(q.lhs) == 1:
                lhs0, rhs0 = rename(q.lhs), rename(q.rhs)
                other = eqs0.get((b.index is not None, lhs0))
                if other is None or sp.expand(other - rhs0) != 0:
                    raise NotImplementedError(
                        f"the per-input equations of xi and xi' differ ({q.lhs} vs {lhs0}); "
                        "this program is not symmetric in its two inputs")
    for key, twin in twins.items():
        f1, f0 = plan.families.get(key), plan.families.get(twin)
        if f1 is not None and f0 is not None and f1.is_array:
            if f1.lo < f0.lo or f1.hi > f0.hi:
                raise NotImplementedError(f"{key} is computed beyond the range of {twin}")
    return Twins(twins)



def structural(derivation: Derivation, params: dict | None) -> dict:
    """Symbols in loop bounds and indices must be numbers when the code is generated."""
    syms = set()

    def scan(d):
        for s in d.steps:
            if isinstance(s, Loop):
                syms.update(sp.sympify(s.start).free_symbols, sp.sympify(s.stop).free_symbols)
                for q in s.equations:
                    for ind in q.lhs.atoms(sp.Indexed) | q.rhs.atoms(sp.Indexed):
                        syms.update(ind.indices[0].free_symbols - {s.index})
            else:
                for ind in s.lhs.atoms(sp.Indexed) | s.rhs.atoms(sp.Indexed):
                    syms.update(ind.indices[0].free_symbols)
        for e in [d.ntk] + ([d.nngp] if d.nngp is not None else []):
            for su in sp.sympify(e).atoms(sp.Sum):
                (_, lo, hi), = su.limits
                syms.update(sp.sympify(lo).free_symbols, sp.sympify(hi).free_symbols)
    scan(derivation)
    if derivation.diagonal is not None:
        scan(derivation.diagonal)
    syms -= set(derivation.loop_indices)
    if not syms:
        return {}
    bound, missing = bind(syms, params)
    if missing:
        raise ValueError(f"loop bounds depend on {missing}: bind them when compiling, "
                         "compile(params={...}) (the generated loops need integer bounds)")
    return {s: sp.Integer(int(v)) for s, v in bound.items()}
