"""Hoisting passes over a :class:`~symntk.codegen.plan.Plan`: forward hoisting (backward-loop
subexpressions into the forward loop, where CSE shares them) and per-input hoisting (one-input
factors of pair expressions into ``per_input``)."""
from __future__ import annotations

import itertools

import sympy as sp

from .plan import LIDX, Block, Col, Eq, Family, Plan, SafePow, Twins, intval, key_of, refs

__all__ = ["Hoister"]


class Hoister:
    """Forward hoisting (backward-loop subexpressions into the forward loop) and per-input
    hoisting (one-input factors of pair expressions into ``per_input``)."""

    def __init__(self, plan: Plan, twins: Twins):
        self.plan = plan
        self.twins = twins
        self.counter = itertools.count()
        self.defs: dict = {}              # (expression, lo, hi) -> IndexedBase or Symbol
        #: per-input definitions: (key, expression in class-0 symbols, lo, hi)
        self.def_list: list = []

    # ------------------------------------------------------------- forward hoisting (pair code)
    def forward(self):
        plan = self.plan
        blocks = plan.blocks
        for fi, F in enumerate(blocks):
            if F.index is None or F.direction != 1:
                continue
            fam_off = {}
            for q in F.eqs:
                if plan.cls(q.lhs) != "pair":
                    continue
                if not isinstance(q.lhs, sp.Indexed):
                    fam_off = {}
                    break
                fam_off[key_of(q.lhs)] = intval(q.lhs.indices[0] - F.index, "offset")
            if not fam_off:
                continue
            before = set()
            for b in blocks[:fi]:
                if b.index is None:
                    before |= {q.lhs for q in b.eqs if not isinstance(q.lhs, sp.Indexed)}
            ctx = dict(F=F, fam_off=fam_off, before=before, hoisted={})
            for b in blocks[fi + 1:]:
                for q in b.eqs:
                    if plan.cls(q.lhs) == "pair":
                        q.rhs = self._fwd(q.rhs, b, ctx)
            for k, (name, e) in enumerate(plan.outputs):
                plan.outputs[k] = (name, self._fwd_sums(e, ctx))
            for norm, (fam, lo, hi) in ctx["hoisted"].items():
                guard = None if (lo, hi) == (F.start, F.stop) else (lo, hi)
                F.eqs.append(Eq(sp.IndexedBase(fam.key)[F.index], norm[0], guard))
                fam.lo, fam.hi = lo, hi

    def _fwd_sums(self, e, ctx):
        """Outputs: the bodies of their Sums are loop code, the rest straight code."""
        sums = sorted(e.atoms(sp.Sum), key=sp.default_sort_key)
        holes = {s: sp.Symbol(f"__s{i}") for i, s in enumerate(sums)}
        rest = self._fwd(e.xreplace(holes), Block([]), ctx)
        back = {}
        for s, h in holes.items():
            (l, lo, hi), = s.limits
            back[h] = sp.Sum(self._fwd(s.function, Block([], l, int(lo), int(hi), 1), ctx),
                             (l, lo, hi))
        return rest.xreplace(back)

    def _fwd_shift(self, e, src: Block, ctx):
        """Can ``e`` move into the forward loop F?  Returns ``(True, delta)`` with ``e`` reading
        F's quantities at F's iteration ``l_src + delta`` (``delta`` None: reads none of them),
        or ``(False, None)``."""
        plan, fam_off, before = self.plan, ctx["fam_off"], ctx["before"]
        delta = None
        for r in refs(e):
            key = key_of(r)
            fam = plan.families.get(key)
            if isinstance(r, sp.Indexed):
                if fam is None:
                    return False, None
                if fam.cls != "pair":
                    continue                        # per-input values: always available
                if key not in fam_off:
                    return False, None
                idx = r.indices[0]
                m = idx - src.index if src.index is not None else idx
                if not m.is_Integer:
                    return False, None
                dlt = int(m) - fam_off[key]
                if delta is None:
                    delta = dlt
                elif delta != dlt:
                    return False, None
            elif r == src.index or r in plan.params:
                continue
            elif fam is not None and (fam.cls != "pair" or fam.kind == "input" or r in before):
                continue
            else:
                return False, None
        return True, delta

    def _fwd(self, e, src: Block, ctx):
        if e.is_Atom or isinstance(e, (sp.Indexed, sp.Sum)):
            return e
        if not _costly(e):
            return e                        # polynomial arithmetic: not worth an array
        ok, delta = self._fwd_shift(e, src, ctx)
        if ok and delta is not None:
            return e if self._trivial(e) else self._make_fwd(e, src, delta, ctx)
        if isinstance(e, (sp.Add, sp.Mul)):
            movable, consts, rest = {}, [], []
            for a in e.args:
                ok, d = self._fwd_shift(a, src, ctx)
                if ok and d is None:
                    consts.append(a)
                elif ok:
                    movable.setdefault(d, []).append(a)
                else:
                    rest.append(self._fwd(a, src, ctx))
            new = list(rest)
            for d, group in movable.items():
                if len(movable) == 1:
                    group, consts = group + consts, []
                sub = e.func(*group)
                costly = _costly(sub) and not self._trivial(sub)
                new.append(self._make_fwd(sub, src, d, ctx) if costly else sub)
            return e.func(*new, *consts)
        return e.func(*[self._fwd(a, src, ctx) for a in e.args])

    def _make_fwd(self, e, src: Block, delta: int, ctx):
        """Replace ``e`` by ``H[l_src + delta]``; F computes ``H[l]`` (guarded to the needed l)."""
        F, hoisted = ctx["F"], ctx["hoisted"]
        l = F.index
        if src.index is not None:
            norm = e.xreplace({src.index: l - delta})
            lo, hi = src.start + delta, src.stop + delta
        else:
            norm = self._concrete_to_loop(e, delta, l)
            if norm is None:
                return e
            lo = hi = delta
        norm = norm.xreplace({ind: ind.base[sp.expand(ind.indices[0])]
                              for ind in norm.atoms(sp.Indexed)})
        if lo < F.start or hi > F.stop:
            return e
        entry = None
        for (expr, tag), ent in hoisted.items():
            if expr == norm and lo <= ent[2] + 1 and hi >= ent[1] - 1:
                entry = ent
                break
        if entry is None:
            base = sp.IndexedBase(f"H{next(self.counter)}")
            fam = Family(base.label, "pair", lo, hi, "hoisted")
            self.plan.families[base.label] = fam
            entry = [fam, lo, hi]
            hoisted[(norm, len(hoisted))] = entry
        entry[1], entry[2] = min(entry[1], lo), max(entry[2], hi)
        idx = (src.index + delta) if src.index is not None else sp.Integer(delta)
        return sp.IndexedBase(entry[0].key)[idx]

    def _concrete_to_loop(self, e, c, l):
        """Top-level expression with concrete indices -> the same in loop index l (at l = c)."""
        sub = {}
        for ind in e.atoms(sp.Indexed):
            k = ind.indices[0]
            if not k.is_Integer:
                return None
            sub[ind] = ind.base[l + (int(k) - c)]
        return e.xreplace(sub)

    @staticmethod
    def _trivial(e) -> bool:
        if e.is_Atom or isinstance(e, sp.Indexed):
            return True
        if isinstance(e, sp.Mul):
            non = [a for a in e.args if not a.is_Number]
            return len(non) <= 1 and all(a.is_Atom or isinstance(a, sp.Indexed) for a in non)
        return False

    # ------------------------------------------------------------------- per-input hoisting
    def per_input(self):
        """Move one-input factors of the pair expressions into per-input definitions
        (``def_list``: (key, expression in class-0 symbols, lo, hi), lo = hi = None for scalars;
        an indexed definition is in the canonical index ``LIDX``)."""
        plan = self.plan
        for b in plan.blocks:
            for q in b.eqs:
                if plan.cls(q.lhs) != "pair":
                    continue
                rng = q.guard if q.guard else ((b.start, b.stop) if b.index is not None else None)
                q.rhs = self._pi(q.rhs, b.index, rng)
        for k, (name, e) in enumerate(plan.outputs):
            sub = {}
            for s in e.atoms(sp.Sum):
                (l, lo, hi), = s.limits
                sub[s] = sp.Sum(self._pi(s.function, l, (int(lo), int(hi))), (l, lo, hi))
            e = e.xreplace(sub)
            syms = {s: sp.Symbol(f"__s{i}") for i, s in enumerate(sub.values())}
            e = self._pi(e.xreplace(syms), None, None).xreplace({v: k2 for k2, v in syms.items()})
            plan.outputs[k] = (name, e)

    def _class_set(self, e, index):
        """Classes (0, 1, "pair") of what ``e`` reads; parameters and the index are none."""
        out = set()
        for r in refs(e):
            if r == index or r in self.plan.params:
                continue
            fam = self.plan.families.get(key_of(r))
            out.add("pair" if fam is None else fam.cls)     # unknown: a Sum placeholder
        return out

    def _pi(self, e, index, rng):
        if e.is_Atom or isinstance(e, sp.Indexed):
            return e
        cs = self._class_set(e, index)
        if cs in ({0}, {1}) and not self._trivial(e):
            return self._make_pi(e, cs.pop(), index, rng)
        if isinstance(e, (sp.Add, sp.Mul)):
            groups = {0: [], 1: []}
            consts, rest = [], []
            for a in e.args:
                ca = self._class_set(a, index)
                if not ca:
                    consts.append(a)
                elif ca in ({0}, {1}):
                    groups[next(iter(ca))].append(a)
                else:
                    rest.append(self._pi(a, index, rng))
            new = list(rest)
            target = 0 if groups[0] else (1 if groups[1] else None)
            if target is not None:
                groups[target].extend(consts)
                consts = []
            for c in (0, 1):
                g = groups[c]
                if not g:
                    continue
                sub = e.func(*g)
                new.append(sub if self._trivial(sub) else self._make_pi(sub, c, index, rng))
            new.extend(consts)
            return e.func(*new)
        return e.func(*[self._pi(a, index, rng) for a in e.args])

    def _make_pi(self, e, c, index, rng):
        """A per-input definition for ``e`` (class c), in class-0 form; returns the reference."""
        plan = self.plan
        norm = self.twins.rename(e) if c == 1 else e
        if index is not None:
            lo, hi = rng
            keyt = (norm.xreplace({index: LIDX}), lo, hi)
        else:
            keyt = (norm, None, None)
        ref = self.defs.get(keyt)
        if ref is None:
            n = next(self.counter)
            if index is not None:
                base = sp.IndexedBase(f"P{n}")
                fam = Family(base.label, 0, lo, hi, "hoisted")
                plan.families[base.label] = fam
                self.def_list.append((base.label, keyt[0], lo, hi))
                ref = base
            else:
                sym = sp.Symbol(f"P{n}")
                plan.families[sym] = Family(sym, 0, kind="hoisted")
                self.def_list.append((sym, norm, None, None))
                ref = sym
            self.defs[keyt] = ref
        if index is not None:
            return Col(ref[index]) if c == 1 else ref[index]
        return Col(ref) if c == 1 else ref


def _costly(e) -> bool:
    """Does ``e`` call a function (acos, a quadrature, ...) or take a fractional power?"""
    for x in sp.preorder_traversal(e):
        if isinstance(x, sp.Function) and not isinstance(x, SafePow):
            return True
        if isinstance(x, sp.Pow) and not x.exp.is_Integer:
            return True
    return False
