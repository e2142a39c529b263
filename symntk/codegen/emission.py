"""Emission: the blocks and outputs of a plan as indented Python source, one CSE per straight
segment or loop body, temporaries emitted where first needed; in ``pairs`` every segment is an
innermost loop over a chunk of columns (which LLVM vectorises)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy as sp

from ..quadrature import RULE_ARRAYS
from .plan import Block, Col, key_of
from .printer import NumbaPrinter, identifier, index_code

if TYPE_CHECKING:                                   # annotations only: quadrature imports us
    from .quadrature import QuadCalls, QuadFunctions

__all__ = ["Emitter", "Store", "Section", "array_access", "scalar_access", "table_access"]


class Emitter:
    """Indented source lines plus unique local names."""

    def __init__(self):
        self.lines: list[str] = []
        self.level = 0
        self.counter = itertools.count()

    def line(self, text: str = ""):
        self.lines.append(("    " * self.level + text) if text else "")

    def fresh(self, stem: str = "t") -> str:
        return f"_{stem}{next(self.counter)}"

    def indent(self):
        self.level += 1

    def dedent(self):
        self.level -= 1


@dataclass
class Store:
    """How a family is read and written inside one function (index code or None -> code)."""
    read: object
    write: object
    name: str = ""


class Section:
    """Emits the blocks and outputs of one derivation (or part of one) into an Emitter.

    ``storage[key]`` tells how each family is accessed; every family assigned in the section
    must have local storage.  Straight-line code shares one CSE (temporaries are emitted just
    before their first use); each loop body has its own.

    ``chunk``: the code runs for a chunk of columns at once (``pairs``): every straight segment
    and every loop body becomes an innermost ``for jj in range(nb)`` loop, which LLVM vectorises
    when the body calls no library function (``acos``/``asin`` print as the polynomial helpers
    of :func:`helpers_source`).  Quantities that live across segments are arrays over ``jj``
    (``row_allocs``: allocated once per group of rows).
    """

    def __init__(self, em: Emitter, quads: QuadCalls, storage: dict, params: dict,
                 helpers: QuadFunctions, chunk: bool = False):
        self.em = em
        self.quads = quads
        self.storage = storage
        self.params = params
        self.helpers = helpers
        self.chunk = chunk
        self.row_allocs: list = []
        #: :class:`~symntk.codegen.mehler.MehlerSites` of ``pairs``: separable 2-D expectations
        #: by Mehler's formula from per-input coefficient tables (None: always quadrature)
        self.mehler = None
        self._loop = None                  # the Block whose body is being emitted
        self._guard = None                 # (lo, hi) of the open ``if lo <= l <= hi``, if any
        self._row_code: dict = {}          # hoisted row-read local -> its table read
        self._quad_users: dict = {}        # quadrature call -> segments that read it
        self._cur_seg = None               # the segment being emitted

    def _open_chunk(self):
        if self.chunk:
            self.em.line("for jj in range(nb):")
            self.em.indent()
            self.em.line("j = jb + jj")

    def _close_chunk(self):
        if self.chunk:
            self.em.dedent()

    # -- atomization: Indexed / table reads become placeholder symbols mapped to code
    def atomize(self, exprs, index):
        names = {}
        out = []
        for e in exprs:
            sub = {}
            for c in e.atoms(Col):
                inner = c.args[0]
                ph = sp.Symbol(f"col:{inner}")
                names[ph] = self._access(inner, index, col=True)
                sub[c] = ph
            e = e.xreplace(sub)
            sub = {}
            for ind in e.atoms(sp.Indexed):
                ph = sp.Symbol(f"ref:{ind}")
                names[ph] = self._access(ind, index)
                sub[ind] = ph
            e = e.xreplace(sub)
            for s in e.free_symbols:
                if s in names:
                    continue
                if s in self.params:
                    names[s] = self.params[s]
                elif s in self.storage:
                    names[s] = self.storage[s].read(None)
                elif s == index:
                    names[s] = f"float({identifier(s.name)})"
            out.append(e)
        return out, names

    def _access(self, ref, index, col=False):
        key = key_of(ref)
        st = self.storage.get(("col", key) if col else key)
        if st is None:
            raise ValueError(f"no storage for {ref}")
        if isinstance(ref, sp.Indexed):
            return st.read(index_code(ref.indices[0]))
        return st.read(None)

    def _write(self, lhs) -> str:
        key = key_of(lhs)
        st = self.storage[key]
        if isinstance(lhs, sp.Indexed):
            return st.write(index_code(lhs.indices[0]))
        return st.write(None)

    # -- emission of straight code with lazy CSE temporaries
    def emit_straight(self, assigns, index=None, guards=None):
        """One straight segment (a loop body): ``assigns`` = [(target code, expr)], one CSE,
        temporaries emitted lazily; ``guards[k]`` = (lo, hi) restricts statement k to those l."""
        if not assigns:
            return
        self._emit_segments([(0, t, e) for t, e in assigns], index, guards or [None] * len(assigns),
                            lambda seg: None)

    def _emit_segments(self, stmts, index, guards, between, epilogue=()):
        """``stmts`` = [(segment, target code, expr)] in order; ``between(seg)`` emits what comes
        before segment ``seg`` (loops).  One CSE over all of them; a temporary is emitted in the
        first segment that needs it, as an array over jj if later segments need it too."""
        exprs, names = self.atomize([e for _, _, e in stmts], index)
        if self.chunk:
            self._hoist_row_reads(exprs, names, guards)
        printer = NumbaPrinter(names)
        syms = (sp.Symbol(self.em.fresh("c")) for _ in itertools.count())
        repl, reduced = sp.cse(exprs, symbols=syms, order="none") if exprs else ([], [])
        deps = dict(repl)
        order = {t: k for k, (t, _) in enumerate(repl)}
        groups = self._quad_groups(repl, reduced)
        # segments reading each temporary: statements directly, other temporaries where those
        # are computed (the first segment that reads them); later temporaries first
        users: dict = {t: set() for t in deps}
        for (seg, _, _), e in zip(stmts, reduced):
            for t in e.free_symbols & deps.keys():
                users[t].add(seg)
        for u, v in reversed(repl):
            if users[u]:
                for t in v.free_symbols & deps.keys():
                    users[t].add(min(users[u]))
        # the same for quadrature results (a fused group is computed where first needed)
        quad_users: dict = {}
        for (seg, _, _), e in zip(stmts, reduced):
            for c in self._calls(e):
                quad_users.setdefault(c, set()).add(seg)
        for u, v in repl:
            for c in self._calls(v):
                quad_users.setdefault(c, set()).update({min(users[u])} if users[u] else ())
        emitted = set()

        def need(expr):
            for t in sorted(expr.free_symbols & deps.keys(), key=order.get):
                if t not in emitted:
                    need(deps[t])
                    emitted.add(t)
                    shared = self.chunk and len(users.get(t, ())) > 1
                    self._emit_tmp(t, deps[t], printer, groups, names, shared)

        def forget(snapshot):
            """Leaving a guarded block (``if lo <= l <= hi``): what was computed inside it does
            not exist for the other iterations; later statements compute it again."""
            before, known = snapshot
            emitted.intersection_update(before)
            for key in set(printer.names) - known:
                del printer.names[key]

        snapshot = None
        segs = sorted({seg for seg, _, _ in stmts})
        pos = 0
        for seg in segs:
            between(seg)                       # (loops: nested _emit_segments calls)
            self._quad_users, self._cur_seg = quad_users, seg
            self._open_chunk()
            guard_open = None
            while pos < len(stmts) and stmts[pos][0] == seg:
                g = guards[pos]
                if g != guard_open:
                    if guard_open is not None:
                        self.em.dedent()
                        forget(snapshot)
                    if g is not None:
                        self.em.line(f"if {g[0]} <= {identifier(index.name)} <= {g[1]}:")
                        self.em.indent()
                        snapshot = (set(emitted), set(printer.names))
                    guard_open = self._guard = g
                e = reduced[pos]
                need(e)
                e = self._replace_quads(e, printer, groups, names)
                self.em.line(f"{stmts[pos][1]} = {printer.doprint(e)}")
                pos += 1
            if guard_open is not None:
                self.em.dedent()
                forget(snapshot)
            self._guard = None
            if seg == segs[-1]:
                for line in epilogue:
                    self.em.line(line)
            self._close_chunk()
        return segs

    def _hoist_row_reads(self, exprs, names, guards):
        """Row-table reads (``T1[i, k]``: the same for every column of the chunk) become locals
        read once before the chunk loops.  In the loop LLVM cannot hoist them itself (a store to
        a scratch array might alias the table), and with those reloads and their runtime alias
        checks it gives up vectorising the layer loops (measured 2x on ReLU depth 10).  Reads of
        guarded statements stay where they are (their index may be out of the table's range)."""
        guarded = set()
        for e, g in zip(exprs, guards):
            if g is not None:
                guarded |= e.free_symbols
        for ph in sorted(names, key=str):
            code = names[ph]
            if ph in guarded or not (isinstance(code, str) and code.startswith("T1[")):
                continue
            local = self.em.fresh("row")
            self.em.line(f"{local} = {code}")
            self._row_code[local] = code
            names[ph] = local

    def _emit_tmp(self, s, v, printer, quad_groups, names, shared=False):
        v = self._replace_quads(v, printer, quad_groups, names)
        name = identifier(s.name)
        if shared:                                   # lives across segments: an array over jj
            alloc = f"{name} = np.empty(nb_max)"
            if alloc not in self.row_allocs:
                self.row_allocs.append(alloc)
            printer.names[s] = f"{name}[jj]"
        else:
            printer.names[s] = name
        self.em.line(f"{printer.names[s]} = {printer.doprint(v)}")

    def _calls(self, e):
        return [c for c in e.atoms(sp.core.function.AppliedUndef) if c.func in self.quads.specs]

    def _quad_groups(self, repl, reduced):
        groups: dict = {}
        for e in [v for _, v in repl] + list(reduced):
            for call in sorted(e.atoms(sp.core.function.AppliedUndef), key=sp.default_sort_key):
                if call.func in self.quads.specs:
                    groups.setdefault(call.args, [])
                    if call not in groups[call.args]:
                        groups[call.args].append(call)
        return groups

    def _replace_quads(self, e, printer, groups, names):
        calls = sorted((c for c in e.atoms(sp.core.function.AppliedUndef)
                        if c.func in self.quads.specs), key=sp.default_sort_key)
        if not calls:
            return e
        sub = {}
        for c in calls:
            if c not in printer.names:
                self._emit_quadrature(groups[c.args], printer)
            sub[c] = sp.Symbol(printer.names[c].split("[")[0])    # "_q4" or "_q4[jj]"
            printer.names[sub[c]] = printer.names[c]
        return e.xreplace(sub)

    # -- quadrature calls (the routines: symntk.codegen.quadrature)
    def _emit_quadrature(self, calls, printer):
        """A fused group of expectations (same covariance): one call of a module-level quadrature
        function (:class:`QuadFunctions`), so every layer shares one compiled routine."""
        em = self.em
        fn, fparams = self.helpers.get([self.quads.spec(c) for c in calls])
        locals_, stores = [], []
        for c in calls:
            name = em.fresh("q")
            locals_.append(name)
            if self.chunk and self._quad_users.get(c, set()) - {self._cur_seg}:
                self.row_allocs.append(f"{name}a = np.empty(nb_max)")  # read by later segments
                stores.append(f"{name}a[jj] = {name}")
                printer.names[c] = f"{name}a[jj]"
            else:
                printer.names[c] = name
        args = [printer.doprint(a) for a in calls[0].args]
        mehler = self._mehler_slots(calls, args)
        args += list(RULE_ARRAYS) + [self.params[p] for p in fparams]
        call = (f"{', '.join(locals_)}{',' if len(locals_) == 1 else ''} = "
                f"{fn}({', '.join(args)})")
        if mehler is None:
            em.line(call)
        else:                       # the series where its bound holds, else the 2-D rule
            c, oks = em.fresh("mc"), []
            em.line(f"{c} = min(1.0, max(-1.0, {args[2]}))")
            for name, slots in zip(locals_, mehler):
                vals = []
                for rs, cs in slots:
                    v, ok = em.fresh("mv"), em.fresh("ok")
                    em.line(f"{v}, {ok} = _mehler(M1[i, {rs}], M2[j, {cs}], {c})")
                    vals.append(v)
                    oks.append(ok)
                em.line(f"{name} = {' + '.join(vals)}")
            em.line(f"if not ({' and '.join(oks)}):")
            em.line("    " + call)
        for line in stores:
            em.line(line)


    def _mehler_slots(self, calls, args):
        """Slot codes per call (one per separable term) if the fused group goes by Mehler's
        formula (:mod:`symntk.codegen.mehler`): pair code, 2-D, separable smooth integrands, and
        the scales s1, s2 read straight from the row and column tables; else None."""
        if self.mehler is None or not self.chunk:
            return None
        specs = [self.quads.spec(c) for c in calls]
        if any(sp_.dim != 2 for sp_ in specs):
            return None
        row = self._row_code.get(args[0], args[0])
        col = args[1]
        if not (row.startswith("T1[i, ") and row.endswith("]") and col.startswith("T2[")
                and col.endswith(", j]") and row[6:-1] == col[3:-4]):
            return None
        from .mehler import separate
        splits = []
        for sp_ in specs:
            u1, u2 = sp_.variables
            terms = separate(sp_.integrand, u1, u2)
            if terms is None:
                return None
            splits.append((terms, u1, u2))
        loop = self._loop
        if loop is not None and self._guard is not None:
            loop = Block([], loop.index, int(self._guard[0]), int(self._guard[1]), 1)
        return [self.mehler.add(terms, u1, u2, row, col, loop)
                for terms, u1, u2 in splits]

    # -- blocks
    def emit_blocks(self, blocks, outputs_assigns, epilogue=()):
        """All blocks in order, then the reduction loops of the outputs' Sums, then the outputs.

        The straight code of the whole section (between and after the loops) shares one CSE;
        a temporary is emitted just before its first use, when everything it reads exists.
        """
        outputs_assigns, reductions = self.plan_reductions(outputs_assigns)
        stmts = []
        for bi, b in enumerate(blocks):
            if b.index is None:
                stmts.extend((bi, self._write(q.lhs), q.rhs) for q in b.eqs)
        stmts.extend((len(blocks), t, e) for t, e in outputs_assigns)
        done = [0]

        def between(seg):                       # the loops before straight segment ``seg``
            for bi in range(done[0], seg):
                if blocks[bi].index is not None:
                    self.emit_loop(blocks[bi])
            if seg == len(blocks):
                self.emit_reduction_loops(reductions)
            done[0] = max(done[0], seg)

        self._emit_segments(stmts, None, [None] * len(stmts), between, epilogue)
        if done[0] < len(blocks):
            between(len(blocks))

    def emit_loop(self, b: Block):
        l = identifier(b.index.name)
        if b.direction > 0:
            self.em.line(f"for {l} in range({b.start}, {b.stop + 1}):")
        else:
            self.em.line(f"for {l} in range({b.stop}, {b.start - 1}, -1):")
        self.em.indent()
        eqs = sorted(b.eqs, key=lambda q: q.guard is not None)   # guarded (hoisted) ones last
        if not eqs:
            self.em.line("pass")
        outer, self._loop = self._loop, b
        self.emit_straight([(self._write(q.lhs), q.rhs) for q in eqs], b.index,
                           [q.guard for q in eqs])
        self._loop = outer
        self.em.dedent()

    def plan_reductions(self, outputs):
        """Each Sum of the outputs gets an accumulator; Sums with one range share a loop."""
        groups: dict = {}
        sub = {}
        for _, e in outputs:
            for su in sorted(e.atoms(sp.Sum), key=sp.default_sort_key):
                if su in sub:
                    continue
                acc = sp.Symbol(self.em.fresh("sum"))
                if self.chunk:
                    self.row_allocs.append(f"{acc.name} = np.empty(nb_max)")
                self.params[acc] = f"{acc.name}[jj]" if self.chunk else acc.name
                sub[su] = acc
                groups.setdefault(su.limits[0], []).append((acc, su.function))
        return [(n, e.xreplace(sub)) for n, e in outputs], groups

    def emit_reduction_loops(self, groups):
        for (l, lo, hi), items in groups.items():
            self._open_chunk()
            for acc, _ in items:
                self.em.line(f"{self.params[acc]} = 0.0")
            self._close_chunk()
            self.em.line(f"for {identifier(l.name)} in range({int(lo)}, {int(hi) + 1}):")
            self.em.indent()
            outer, self._loop = self._loop, Block([], l, int(lo), int(hi), 1)
            self.emit_straight([(self.params[acc], acc + f) for acc, f in items], l)
            self._loop = outer
            self.em.dedent()



def array_access(name, lo, col=None):
    def access(idx):
        i = index_code(sp.sympify(idx) - lo)
        return f"{name}[{i}]" if col is None else f"{name}[{i}, {col}]"
    return access


def scalar_access(name):
    return lambda idx: name


def table_access(table, other, off, lo, transposed=False):
    """A per-input value read from a table: ``table[row, column]`` for the row input, or the
    transposed table ``table[column, j]`` (contiguous in j) for the column input."""
    def access(idx):
        k = off if lo is None else index_code(sp.sympify(idx) + off - lo)
        return f"{table}[{k}, {other}]" if transposed else f"{table}[{other}, {k}]"
    return access
