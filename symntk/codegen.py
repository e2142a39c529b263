"""Numba code generation: a :class:`~symntk.derivation.Derivation` becomes a Python module on disk.

Stage 4 of the pipeline (style.md §2, §6): plain data in (the derivation's equations), plain text
out (a module of two ``numba.njit(cache=True)`` functions), nothing calls back up.

``per_input(q, ...)``
    everything that depends on one input only, for every row: the "copy 0" half of the
    derivation (the diagonal kernels ``C_h_00[l]`` of theory §2.5), the per-input factors the pair
    code needs (``1/sqrt(Sigma_00)``, ...), and the whole ``derivation.diagonal`` system, whose
    NNGP/NTK are the exact k(x, x) (no ``sqrt(q q' - K^2)`` cancellation).
``pairs(T1, T2, ...)``
    a ``prange`` over rows computing only the mixed symbols (copies 0 and 1) and the outputs.
    Columns go in chunks of :data:`CHUNK`: every straight segment and every loop body is an
    innermost loop over the chunk, which LLVM vectorises (``acos``/``asin`` are polynomials in
    the module, not libm calls: NumPy's SIMD ``arccos`` would otherwise be ~9x faster per
    element than the compiled kernel's).  Per-input values are read from the two tables ``T1``
    (rows of X1) and ``T2`` (X2, transposed so a chunk reads contiguous memory).

How the text is made:

1. Gaussian-expectation nodes without a closed form become calls ``Q3(s1, s2, rho)`` of their
   whitening parameters (theory §5, "General phi"); calls that share their arguments are later
   evaluated in one quadrature loop.
2. Variances in negative powers (the ``1/sqrt(Sigma_11 Sigma_22)`` of every correlation) become
   ``SafePow`` (zero when the variance is zero: a zero input with no bias has a well-defined
   kernel, and every term multiplying that factor vanishes with it).
3. *Forward hoisting*: a subexpression of a backward-loop equation that depends only on forward
   quantities of the same layer (``acos`` of the layer's correlation, a quadrature of the layer's
   covariance) is computed in the forward loop instead, where common-subexpression elimination
   shares it with the forward equations.  Each transcendental function runs once per layer.
4. *Per-input hoisting*: factors of pair expressions that depend on one input only move into
   ``per_input``.
5. ``sympy.cse`` across all outputs of a step (a loop body, or the straight-line code around the
   loops), printed by :class:`NumbaPrinter` (a ``PythonCodePrinter``: ``NumPyPrinter``'s
   ``Max``/``Min`` do not compile in Numba).  A temporary is emitted just before its first
   use; one that later straight segments also read lives in an array over the chunk.

Repeated blocks stay loops (style.md §5): arrays are indexed by the layer and sized from the loop
bounds, so the text, and Numba's compile time, do not grow with depth.  Model parameters
(variances) are *arguments* (``theta``), not constants: one compiled module serves every
hyper-parameter value, which is what sweeps and fits need (a symbolic ``weight_std`` compiles
once); numeric variances that the builders put into the equations are constants already, and
only loop bounds must be known when the code is generated (``compile(params=...)``).

The module is content-addressed (hash of the source and the Numba version) in
``$SYMNTK_CACHE_DIR`` (default ``platformdirs.user_cache_dir("symntk")``), registered in
``sys.modules`` before ``exec_module`` so Numba's cache can locate it, and never rewritten, so
Numba's on-disk cache stays valid.  An unusable cache degrades to an uncached compile with a
warning.  No callable is ever passed to a jitted function (that would disable caching) and
``fastmath`` is never used (it deletes the NaN guards).
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import keyword
import os
import re
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .derivation import Derivation, Loop

__all__ = ["CODEGEN_VERSION", "NumbaPrinter", "SafePow", "GeneratedKernel", "generate",
           "load_module", "cache_dir", "cache_info", "clear_cache", "CacheWarning"]

#: Bumped whenever the generated text changes meaning (part of every module's hash).
CODEGEN_VERSION = "1"

#: Module names: ``symntk_kernel_<hash>``.
MODULE_PREFIX = "symntk_kernel_"


class CacheWarning(UserWarning):
    """The kernel cache could not be used; the kernel was compiled without it."""


# ======================================================================================= nodes
class SafePow(sp.Function):
    """``x**p`` for ``x > 0``, else 0: a negative power of a variance (theory §5's ``c``).

    The correlation ``Sigma_12 / sqrt(Sigma_11 Sigma_22)`` is undefined at a zero variance, but
    every closed form multiplies the terms that use it by a power of that variance or by a
    zero input kernel, so any finite value gives the right limit; 0 is the natural one.
    """
    nargs = 2

    @classmethod
    def eval(cls, x, p):
        if x.is_Number and p.is_Number:
            return x ** p if x > 0 else sp.S.Zero
        return None


# ===================================================================================== printer
def _float(x) -> str:
    v = float(x)
    if v != v or v in (float("inf"), float("-inf")):
        return {"nan": "math.nan", "inf": "math.inf", "-inf": "-math.inf"}[repr(v)]
    return repr(v)


class NumbaPrinter(PythonCodePrinter):
    """Python source that Numba compiles, with the numerical guards of style.md §6.

    * numbers print as float literals (``169/100 -> 1.69``): no integer arithmetic in kernels;
    * ``acos``/``asin`` are the module's ``_acos``/``_asin``, which clip their argument into
      [-1, 1] (rounding pushes correlations past 1) and, being polynomials, vectorise;
    * fractional powers clip the base at 0 (``sqrt(1 - c**2)`` at c = 1 + 1e-16);
    * ``Max``/``Min`` print as nested builtin ``max``/``min`` of two arguments;
    * ``Heaviside`` uses its value at 0 (SymPy's default 1/2) as the default branch, ``sign`` 0;
    * ``Piecewise`` always has a default branch (NaN when no condition holds: never a silent value);
    * ``SafePow(x, p)`` is ``x**p if x > 0 else 0``.

    ``names`` maps SymPy symbols to the code that reads them (locals, table entries, parameters).
    """
    printmethod = "_numbacode"

    def __init__(self, names: dict | None = None):
        super().__init__({"fully_qualified_modules": True, "standard": "python3",
                          "allow_unknown_functions": False})
        self.names = names if names is not None else {}

    # -- atoms
    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        return identifier(expr.name)

    _print_Dummy = _print_Symbol

    def _print_Indexed(self, expr):
        if expr in self.names:
            return self.names[expr]
        raise ValueError(f"no storage for {expr} in this function")

    def _print_Integer(self, expr):
        return _float(expr)

    def _print_Rational(self, expr):
        return _float(expr)

    def _print_Float(self, expr):
        return _float(expr)

    def _print_Half(self, expr):
        return "0.5"

    def _print_Zero(self, expr):
        return "0.0"

    def _print_One(self, expr):
        return "1.0"

    def _print_NegativeOne(self, expr):
        return "-1.0"

    def _print_Exp1(self, expr):
        return "math.e"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    # -- powers
    def _print_Pow(self, expr, rational=False):
        base, e = expr.base, expr.exp
        if base == sp.E:
            return f"math.exp({self._print(e)})"
        b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
        if e.is_Integer:
            n = int(e)
            if n == 0:
                return "1.0"
            if n < 0:
                return f"(1.0 / ({self._print(sp.Pow(base, -n, evaluate=False))}))"
            if n == 1:
                return self._print(base)
            if n <= 3 and (base.is_Symbol or base.is_Atom):
                return "(" + "*".join([b] * n) + ")"
            return f"{b}**{n}"
        if e == sp.S.Half:
            return f"math.sqrt(max(0.0, {self._print(base)}))"
        if e == -sp.S.Half:
            return f"(1.0 / math.sqrt(max(0.0, {self._print(base)})))"
        if e.is_Rational and e.q == 2:
            return f"max(0.0, {self._print(base)})**{_float(e)}"
        return f"{b}**{self.parenthesize(e, sp.printing.precedence.PRECEDENCE['Pow'])}"

    def _print_SafePow(self, expr):
        x, p = expr.args
        xs = self._print(x)
        if p == -sp.S.Half:
            val = f"1.0 / math.sqrt({xs})"
        elif p == -1:
            val = f"1.0 / {xs}"
        elif p == sp.S.Half:
            val = f"math.sqrt({xs})"
        else:
            val = f"{xs}**{_float(p)}"
        return f"({val} if {xs} > 0.0 else 0.0)"

    # -- inverse trigonometric functions: clipped, branch-free helpers (see _HELPERS)
    def _print_acos(self, expr):
        return f"_acos({self._print(expr.args[0])})"

    def _print_asin(self, expr):
        return f"_asin({self._print(expr.args[0])})"

    # -- kinks
    def _minmax(self, expr, fn):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out

    def _print_Max(self, expr):
        return self._minmax(expr, "max")

    def _print_Min(self, expr):
        return self._minmax(expr, "min")

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        h0 = expr.args[1] if len(expr.args) > 1 else sp.S.Half
        return f"(1.0 if {x} > 0.0 else (0.0 if {x} < 0.0 else {self._print(h0)}))"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"(1.0 if {x} > 0.0 else (-1.0 if {x} < 0.0 else 0.0))"

    def _print_Piecewise(self, expr):
        out = "math.nan"
        for e, c in reversed(expr.args):
            if c == sp.true:
                out = self._print(e)
            else:
                out = f"({self._print(e)} if {self._print(c)} else {out})"
        return out

    def _print_Relational(self, expr):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"({self._print(expr.lhs)} {op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " and ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " or ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(not {self._print(expr.args[0])})"

    def _print_Function(self, expr):
        raise NotImplementedError(f"no Numba code for the function {expr.func} in {expr}")

    def _print_Sum(self, expr):
        raise ValueError(f"a Sum reached the printer: {expr} (reductions are loops)")


_IDENT = re.compile(r"[^0-9a-zA-Z_]")


def identifier(name: str) -> str:
    """A valid, non-keyword Python identifier for a SymPy name."""
    out = _IDENT.sub("_", name)
    if not out or out[0].isdigit() or keyword.iskeyword(out):
        out = "v_" + out
    return out


def _int(e) -> str:
    """An index expression (integers and the loop variable) as Python integer code."""
    e = sp.sympify(e)
    if e.is_Integer:
        return str(int(e))
    return sp.sstr(sp.expand(e))


def _intval(e, what: str) -> int:
    e = sp.sympify(e)
    if not e.is_Integer:
        raise ValueError(f"{what} {e} is not an integer; bind the symbols in it with "
                         f"compile(params={{...}})")
    return int(e)


# =========================================================================== quadrature calls
@dataclass(frozen=True)
class QuadSpec:
    """One Gaussian expectation without a closed form, as a call of its whitening parameters."""
    name: str
    integrand: sp.Expr        # in the real symbols ``variables``
    variables: tuple
    dim: int


class _Quads:
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


# ===================================================================================== plan IR
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


def _key_of(e):
    return e.base.label if isinstance(e, sp.Indexed) else e


def _refs(e) -> set:
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
class _Plan:
    """Everything the emitter needs for one derivation: families, blocks, hoists, outputs."""

    def __init__(self, derivation: Derivation, structural: dict, quads: _Quads):
        self.quads = quads
        self.structural = structural
        d = derivation.reduced()
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
        """Structural substitution, expectation nodes -> quadrature calls, safe powers."""
        from .gaussian import GaussianExpectation
        e = sp.sympify(e)
        if self.structural:
            e = e.xreplace(self.structural)
        nodes = sorted(e.atoms(GaussianExpectation), key=sp.default_sort_key)
        if nodes:
            e = e.xreplace({n: self.quads.call(n) for n in nodes})
        return self._safe_powers(e)

    def _is_variance(self, ref) -> bool:
        info = self.info.get(_key_of(ref))
        if info is None or info.kind not in ("C", "D", "input"):
            return False
        return len(set(info.copies)) == 1

    def _safe_powers(self, e):
        def is_var_pow(x):
            return (isinstance(x, sp.Pow) and x.exp.is_Number and x.exp < 0
                    and isinstance(x.base, (sp.Symbol, sp.Indexed)) and self._is_variance(x.base))
        return e.replace(is_var_pow, lambda x: SafePow(x.base, x.exp))

    def _index(self, e):
        e = sp.sympify(e)
        return e.xreplace(self.structural) if self.structural else e

    def _blocks(self, steps) -> list:
        blocks = []
        for s in steps:
            if isinstance(s, Loop):
                start = _intval(self._index(s.start), "loop start")
                stop = _intval(self._index(s.stop), "loop stop")
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
            lo, hi = _intval(self._index(lo), "Sum limit"), _intval(self._index(hi), "Sum limit")
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
                    fam = self.families[_key_of(q.lhs)]
                    if fam.cls == "pair":
                        continue
                    for r in _refs(q.rhs):
                        f2 = self.families.get(_key_of(r))
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
        key = _key_of(lhs)
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
                off = _intval(idx - block.index, "index offset")
                lo, hi = block.start + off, block.stop + off
            else:
                lo = hi = _intval(idx, "index")
            fam.lo = lo if fam.lo is None else min(fam.lo, lo)
            fam.hi = hi if fam.hi is None else max(fam.hi, hi)

    def cls(self, ref):
        fam = self.families.get(_key_of(ref))
        return None if fam is None else fam.cls


# ============================================================================ hoisting passes
class _Hoister:
    """Forward hoisting (backward-loop subexpressions into the forward loop) and per-input
    hoisting (one-input factors of pair expressions into ``per_input``)."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.counter = itertools.count()

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
                fam_off[_key_of(q.lhs)] = _intval(q.lhs.indices[0] - F.index, "offset")
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
        for r in _refs(e):
            key = _key_of(r)
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
        an indexed definition is in the canonical index ``_LIDX``)."""
        plan = self.plan
        self.defs: dict = {}              # (expression, lo, hi) -> IndexedBase or Symbol
        self.def_list: list = []
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
        for r in _refs(e):
            if r == index or r in self.plan.params:
                continue
            fam = self.plan.families.get(_key_of(r))
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
        norm = plan.to_class0(e) if c == 1 else e
        if index is not None:
            lo, hi = rng
            keyt = (norm.xreplace({index: _LIDX}), lo, hi)
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
            return _Col(ref[index]) if c == 1 else ref[index]
        return _Col(ref) if c == 1 else ref


def _costly(e) -> bool:
    """Does ``e`` call a function (acos, a quadrature, ...) or take a fractional power?"""
    for x in sp.preorder_traversal(e):
        if isinstance(x, sp.Function) and not isinstance(x, SafePow):
            return True
        if isinstance(x, sp.Pow) and not x.exp.is_Integer:
            return True
    return False


#: The canonical loop index of per-input definitions.
_LIDX = sp.Symbol("l__", integer=True)


class _Col(sp.Function):
    """Marks a per-input value read for the *column* input (table T2) in pair code."""
    nargs = 1


# ============================================================================ code emission
class _Emitter:
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
class _Store:
    """How a family is read and written inside one function (index code or None -> code)."""
    read: object
    write: object
    name: str = ""


class _Section:
    """Emits the blocks and outputs of one derivation (or part of one) into an _Emitter.

    ``storage[key]`` tells how each family is accessed; every family assigned in the section
    must have local storage.  Straight-line code shares one CSE (temporaries are emitted just
    before their first use); each loop body has its own.

    ``chunk``: the code runs for a chunk of columns at once (``pairs``): every straight segment
    and every loop body becomes an innermost ``for jj in range(nb)`` loop, which LLVM vectorises
    when the body calls no library function (``acos``/``asin`` print as the polynomial helpers
    of :func:`_helpers_source`).  Quantities that live across segments are arrays over ``jj``
    (``row_allocs``: allocated once per group of rows).
    """

    def __init__(self, em: _Emitter, quads: _Quads, storage: dict, options: dict, params: dict,
                 chunk: bool = False):
        self.em = em
        self.quads = quads
        self.storage = storage
        self.options = options
        self.params = params
        self.chunk = chunk
        self.row_allocs: list = []
        self.helpers: _QuadFunctions | None = None

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
            for c in e.atoms(_Col):
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
        key = _key_of(ref)
        st = self.storage.get(("col", key) if col else key)
        if st is None:
            raise ValueError(f"no storage for {ref}")
        if isinstance(ref, sp.Indexed):
            return st.read(_int(ref.indices[0]))
        return st.read(None)

    def _write(self, lhs) -> str:
        key = _key_of(lhs)
        st = self.storage[key]
        if isinstance(lhs, sp.Indexed):
            return st.write(_int(lhs.indices[0]))
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
                    if g is not None:
                        self.em.line(f"if {g[0]} <= {identifier(index.name)} <= {g[1]}:")
                        self.em.indent()
                    guard_open = g
                e = reduced[pos]
                need(e)
                e = self._replace_quads(e, printer, groups, names)
                self.em.line(f"{stmts[pos][1]} = {printer.doprint(e)}")
                pos += 1
            if guard_open is not None:
                self.em.dedent()
            if seg == segs[-1]:
                for line in epilogue:
                    self.em.line(line)
            self._close_chunk()
        return segs

    def _emit_tmp(self, s, v, printer, quad_groups, names, shared=False):
        v = self._replace_quads(v, printer, quad_groups, names)
        name = identifier(s.name)
        if shared:                                   # lives across segments: an array over jj
            self.row_allocs.append(f"{name} = np.empty(nb_max)")
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

    # -- quadrature loops (theory §5; the rule is chosen by options["rule"])
    def _emit_quadrature(self, calls, printer):
        """A fused group of expectations (same covariance): one call of a module-level quadrature
        function (:class:`_QuadFunctions`), so every layer shares one compiled routine."""
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
        args += _QUAD_ARGS.split(", ") + [self.params[p] for p in fparams]
        em.line(f"{', '.join(locals_)}{',' if len(locals_) == 1 else ''} = "
                f"{fn}({', '.join(args)})")
        for line in stores:
            em.line(line)

    def _emit_quadrature_body(self, outs, args, printer):
        """The loops of a quadrature routine: ``outs`` = [(local, QuadSpec)]."""
        spec0 = outs[0][1]
        if spec0.dim == 1:
            self._quad1(outs, args, printer)
        elif spec0.dim == 2:
            if self.options.get("rule", "polar") == "polar":
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
        for a, v in zip(accs, vals):
            em.line(f"{a} += HW[{b}] * ({v})")
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
        em.line("# kink rays u1 = 0 and u2 = 0 (theory §5; see symntk.kernels.polar_rule)")
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
        for i, v in zip(ins, vals):
            em.line(f"{i} += RW[{b_}] * ({v})")
        em.dedent()
        for a, i in zip(accs, ins):
            em.line(f"{a} += {wa} * {i}")
        em.dedent()
        em.dedent()
        for (name, _), a in zip(outs, accs):
            em.line(f"{name} = {a} * 0.15915494309189535")

    def _quad2_tensor(self, outs, args, printer):
        """Tensor Gauss-Hermite on the whitened plane: u1 = s1 z1, u2 = s2 (c z1 + r z2)."""
        em = self.em
        s1, s2, c, r = (em.fresh(n) for n in ("s1", "s2", "c", "r"))
        em.line("# E[F(u1, u2)]: tensor Gauss-Hermite on the whitened Gaussian (theory §5)")
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
        for i, v in zip(ins, vals):
            em.line(f"{i} += GW[{b_}] * ({v})")
        em.dedent()
        for a, i in zip(accs, ins):
            em.line(f"{a} += GW[{a_}] * {i}")
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
        for a, v in zip(accs, vals):
            em.line(f"{a} += {w} * ({v})")
        for _ in idx:
            em.dedent()
        for (name, _), a in zip(outs, accs):
            em.line(f"{name} = {a}")

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
        self.emit_straight([(self._write(q.lhs), q.rhs) for q in eqs], b.index,
                           [q.guard for q in eqs])
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
            self.emit_straight([(self.params[acc], acc + f) for acc, f in items], l)
            self.em.dedent()


class _QuadFunctions:
    """Module-level quadrature routines, one per fused group of integrands:
    ``_quad_Q0_Q1(s1, s2, c, <rule arrays>, <parameters>) -> (E F0, E F1)``."""

    def __init__(self, quads: _Quads, options: dict, param_code: dict):
        self.quads, self.options, self.param_code = quads, options, param_code
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
            em = _Emitter()
            em.line("")
            em.line("")
            em.line("@njit(cache=CACHE)")
            pnames = [self.param_code[p] for p in fparams]
            em.line(f"def {name}({', '.join(argn + _QUAD_ARGS.split(', ') + pnames)}):")
            em.indent()
            what = ", ".join(f"E[{sp_.integrand}]" for sp_ in specs)
            em.line(f'"""{what}"""' if len(what) < 80 else f'"""{what[:75]} ..."""')
            sec = _Section(em, self.quads, {}, self.options,
                           {p: self.param_code[p] for p in fparams})
            outs = [(f"_v{i}", sp_) for i, sp_ in enumerate(specs)]
            printer = NumbaPrinter({})
            sec._emit_quadrature_body(outs, argn, printer)
            em.line(f"return {', '.join(o for o, _ in outs)}{',' if len(outs) == 1 else ''}")
            self.sources.append("\n".join(em.lines))
            self.funcs[key] = (name, fparams)
        return self.funcs[key]


def _same(f, g) -> bool:
    if f == g:
        return True
    try:
        return sp.expand(f - g) == 0
    except Exception:                       # pragma: no cover - expand never fails on these
        return False


# ====================================================================== the generated module
@dataclass
class GeneratedKernel:
    """The text of a kernel module and what the driver needs to call it."""
    source: str
    key: str                           # content hash (module name suffix)
    params: list                       # parameter symbols, in the order of ``theta``
    table_width: int                   # columns of the per-input tables
    has_nngp: bool
    term_names: list                   # names of ntk_terms, in the order of the ``terms`` array
    pair_inputs: list                  # name of the pair input symbol (xi.xi'/d), if any
    rule: str
    from_manifest: bool = False        # read back from the cache instead of generated

    @property
    def module_name(self) -> str:
        return MODULE_PREFIX + self.key


def _structural(derivation: Derivation, params: dict | None) -> dict:
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
    params = dict(params or {})
    by_name = {str(k): v for k, v in params.items()}
    out, missing = {}, []
    for s in sorted(syms, key=str):
        v = params.get(s, by_name.get(str(s)))
        if v is None:
            missing.append(str(s))
        else:
            out[s] = sp.Integer(int(v))
    if missing:
        raise ValueError(f"loop bounds depend on {missing}: bind them when compiling, "
                         "compile(params={...}) (the generated loops need integer bounds)")
    return out


def generate(derivation: Derivation, rule: str = "polar", params: dict | None = None
             ) -> GeneratedKernel:
    """Generate the kernel module text for ``derivation`` (see the module docstring).

    ``rule``: the 2-D quadrature for expectations without a closed form, ``"polar"`` (split at
    the kinks, default) or ``"hermite"`` (tensor Gauss-Hermite).  ``params`` binds only
    structural symbols (loop bounds); variances stay arguments.
    """
    if rule not in ("polar", "hermite"):
        raise ValueError(f"unknown quadrature rule {rule!r}; expected 'polar' or 'hermite'")
    if derivation.diagonal is None:
        raise ValueError("the derivation has no diagonal system (derive() always makes one)")
    inputs = derivation.program.inputs
    if len(inputs) != 1:
        raise NotImplementedError("programs with several Input nodes are not compiled yet")
    structural = _structural(derivation, params)
    fingerprint = _fingerprint(derivation, rule, structural)
    known = _read_manifest(fingerprint)
    if known is not None:
        return known
    quads = _Quads()
    pair = _Plan(derivation, structural, quads)
    diag = _Plan(derivation.diagonal, structural, quads)
    pair.to_class0 = _class0_mapper(pair)
    h = _Hoister(pair)
    h.forward()
    h.per_input()
    pair_inputs = [s for s, f in pair.families.items() if f.kind == "input" and f.cls == "pair"]
    if len(pair_inputs) > 1:
        raise NotImplementedError("more than one cross-input kernel symbol")
    params_all = sorted(set(pair.params) | set(diag.params), key=str)
    params_all = [p for p in params_all if p not in pair.inputs and p not in diag.inputs]
    src, width = _module_source(pair, diag, h, params_all, pair_inputs, rule)
    digest = hashlib.sha256()
    import numba
    digest.update(src.encode())
    digest.update(numba.__version__.encode())
    digest.update(sys.version.encode())
    key = digest.hexdigest()[:24]
    terms = [n[1] for n, _ in pair.outputs if isinstance(n, tuple)]
    gen = GeneratedKernel(src, key, params_all, width, derivation.nngp is not None, terms,
                          [str(s) for s in pair_inputs], rule)
    _write_manifest(fingerprint, gen)
    return gen


# --------------------------------------------------------------------------- manifests
#: The generator's own text: any change to it invalidates every manifest.
with open(__file__, "rb") as _fh:
    _SELF = hashlib.sha256(_fh.read()).hexdigest()


def _fingerprint(derivation: Derivation, rule: str, structural: dict) -> str:
    """A hash of everything the generated text depends on: the *reduced* equations (the closed-
    form table lives elsewhere and may change), what each symbol is (copies decide the classes),
    the options, and this file.  ``srepr`` keeps the assumptions of every symbol."""
    h = hashlib.sha256()
    for part in (CODEGEN_VERSION, _SELF, rule, repr(sorted(map(str, structural.items())))):
        h.update(part.encode())
    for d in (derivation.reduced(), derivation.diagonal.reduced()):
        items = [d.mode, d.nngp, d.ntk, sorted(d.ntk_terms.items(), key=lambda kv: kv[0]),
                 [inp.dim for inp in d.program.inputs]]
        for st in d.steps:
            if isinstance(st, Loop):
                items.append((st.index, st.start, st.stop, st.direction,
                              [(q.lhs, q.rhs) for q in st.equations]))
            else:
                items.append((st.lhs, st.rhs))
        for table in (d.info, d.inputs):
            for key in sorted(table, key=sp.default_sort_key):
                i = table[key]
                items.append((key, i.kind, tuple(i.copies), tuple(map(str, i.nodes))))
        h.update(sp.srepr(items).encode())
    return h.hexdigest()[:32]


def _manifest_path(fingerprint: str) -> str:
    return os.path.join(cache_dir(), "manifests", fingerprint + ".json")


def _read_manifest(fingerprint: str):
    """The GeneratedKernel of an earlier run (skips generation on a warm start), or None."""
    import json
    try:
        with open(_manifest_path(fingerprint), encoding="utf-8") as fh:
            m = json.load(fh)
        with open(os.path.join(cache_dir(), MODULE_PREFIX + m["key"] + ".py"),
                  encoding="utf-8") as fh:
            source = fh.read()
        digest = hashlib.sha256(source.encode())
        import numba
        digest.update(numba.__version__.encode())
        digest.update(sys.version.encode())
        if digest.hexdigest()[:24] != m["key"]:
            return None                           # damaged or foreign: generate afresh
        params = [sp.Symbol(name, **assumptions) for name, assumptions in m["params"]]
        return GeneratedKernel(source, m["key"], params, m["table_width"], m["has_nngp"],
                               m["term_names"], m["pair_inputs"], m["rule"], from_manifest=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(fingerprint: str, gen: GeneratedKernel):
    import json
    m = {"key": gen.key, "params": [[p.name, p.assumptions0] for p in gen.params],
         "table_width": gen.table_width, "has_nngp": gen.has_nngp, "term_names": gen.term_names,
         "pair_inputs": gen.pair_inputs, "rule": gen.rule}
    try:
        path = _manifest_path(fingerprint)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(m, fh)
        os.replace(tmp, path)
    except OSError:
        pass                                      # the manifest only saves time


def _class0_mapper(plan: _Plan):
    """Map copy-1 quantities to their copy-0 twins (same nodes, same kind): the per-input code is
    written once and run on both inputs.  Checks that the twins have the same equations."""
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

    def rename(e):
        sub = {}
        for ind in e.atoms(sp.Indexed):
            k = ind.base.label
            if k in twins:
                sub[ind] = sp.IndexedBase(twins[k])[ind.indices[0]]
        for s in e.free_symbols:
            if s in twins:
                sub[s] = twins[s]
        return e.xreplace(sub)

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
    rename.twins = twins
    return rename


# ------------------------------------------------------------------------ module assembly
_HEADER = '''"""Generated by symntk.codegen {version} for {name!r} ({mode}).  Do not edit: the file
name is the hash of this text, and Numba's on-disk cache is keyed on it.

per_input: the one-input half of the derivation and the diagonal system, row by row.
pairs:     the mixed (xi, xi') half and the outputs, prange over rows, columns in chunks.
"""
import math

import numpy as np
from numba import njit, prange

CACHE = {cache}
CHUNK = {chunk}
'''

#: Columns per chunk in ``pairs``: long enough for SIMD, short enough for L1/L2.
CHUNK = 128

#: asin(x) = x + x^3 P(x^2) on |x| <= 1/2: P's coefficients (increasing powers of z = x^2),
#: interpolated at 13 Chebyshev nodes of [0, 1/4] in 50-digit arithmetic
#: (:func:`asin_coefficients` recomputes them; tests check |asin error| <= 2 ulp).
ASIN_COEFFS = (0.16666666666666669, 0.07499999999998433, 0.04464285714635543,
               0.030381944138531247, 0.02237217294214989, 0.017352392720869973,
               0.013971212973552933, 0.011479177415184906, 0.01032281435018578,
               0.005457506718640358, 0.01740087944269402, -0.014851887071247204,
               0.028757851367421566)


def asin_coefficients(degree: int = 12, dps: int = 50) -> tuple:
    """Coefficients of P with asin(s) = s + s^3 P(s^2), interpolating at Chebyshev nodes."""
    import mpmath
    with mpmath.workdps(dps):
        n = degree + 1
        nodes = [(mpmath.cos(mpmath.pi * (k + mpmath.mpf(1) / 2) / n) + 1) / 8 for k in range(n)]

        def target(z):
            r = mpmath.sqrt(z)
            return (mpmath.asin(r) - r) / (z * r)
        A = mpmath.matrix([[z ** j for j in range(n)] for z in nodes])
        c = mpmath.lu_solve(A, mpmath.matrix([target(z) for z in nodes]))
        return tuple(float(c[j]) for j in range(n))


def _helpers_source() -> str:
    """``_acos``/``_asin`` without a library call: LLVM vectorises the loops that use them
    (NumPy's own SIMD ``arccos`` is ~9x faster than a scalar libm call per element)."""
    horner = "\n".join(f"    p = p * z + {c!r}" for c in reversed(ASIN_COEFFS[:-1]))
    return f'''

@njit(cache=CACHE)
def _asin_core(s, z):
    """asin(s) for 0 <= s <= 1/2, z = s * s: s + s z P(z)."""
    p = {ASIN_COEFFS[-1]!r}
{horner}
    return s + s * z * p


@njit(cache=CACHE)
def _acos(x):
    """acos of x clipped into [-1, 1]; branch-free; acos(x) = 2 asin(sqrt((1 - x)/2)) near 1."""
    x = min(1.0, max(-1.0, x))
    a = abs(x)
    big = a > 0.5
    z = 0.5 * (1.0 - a) if big else a * a
    r = _asin_core(math.sqrt(z) if big else a, z)
    small = 1.5707963267948966 - (r if x >= 0.0 else -r)
    large = 2.0 * r if x > 0.0 else 3.141592653589793 - 2.0 * r
    return large if big else small


@njit(cache=CACHE)
def _asin(x):
    """asin of x clipped into [-1, 1]; branch-free."""
    x = min(1.0, max(-1.0, x))
    a = abs(x)
    big = a > 0.5
    z = 0.5 * (1.0 - a) if big else a * a
    r = _asin_core(math.sqrt(z) if big else a, z)
    v = 1.5707963267948966 - 2.0 * r if big else r
    return v if x >= 0.0 else -v
'''


_QUAD_ARGS = "RR, RW, AT, AW, HR, HW, GZ, GW, KZ, KW"


def _module_source(pair: _Plan, diag: _Plan, h: _Hoister, params: list, pair_inputs, rule,
                   cache: bool = True):
    d = pair.derivation
    parts = [_HEADER.format(version=CODEGEN_VERSION, name=d.program.name, mode=d.mode,
                            cache="True", chunk=CHUNK)]
    param_code = {p: f"p_{identifier(p.name)}" for p in params}
    options = {"rule": rule}
    helpers = _QuadFunctions(pair.quads, options, param_code)

    # ------------------------------------------------------------------ per_input
    em = _Emitter()
    em.level = 0
    # table layout: families read by the pair code, in class-0 form
    twins = pair.to_class0.twins
    needed0 = set()                          # class-0 keys the pair code reads (row or column)
    for b in pair.blocks:
        for q in b.eqs:
            if pair.cls(q.lhs) != "pair":
                continue
            for r in _refs(q.rhs):
                _note_read(pair, r, needed0, twins)
            for c in q.rhs.atoms(_Col):
                _note_read(pair, c.args[0], needed0, twins)
    for _, e in pair.outputs:
        for r in _refs(e):
            _note_read(pair, r, needed0, twins)
        for c in e.atoms(_Col):
            _note_read(pair, c.args[0], needed0, twins)
    layout = {}
    width = 0
    for key in sorted(needed0, key=str):
        fam = pair.families[key]
        if fam.is_array:
            layout[key] = (width, fam.lo)
            width += fam.hi - fam.lo + 1
        else:
            layout[key] = (width, None)
            width += 1
    width = max(width, 1)

    # per-input equations needed (class 0), pruned by dependency
    defs = {}
    for key, expr, lo, hi in h.def_list:
        defs[key] = (expr, lo, hi)
    need = set(needed0)
    changed = True
    while changed:
        changed = False
        for key, (expr, lo, hi) in defs.items():
            if key in need:
                for r in _refs(expr):
                    k2 = _key_of(r)
                    if k2 in pair.families and pair.families[k2].cls == 0 and k2 not in need:
                        need.add(k2)
                        changed = True
        for b in pair.blocks:
            for q in b.eqs:
                k = _key_of(q.lhs)
                if pair.cls(q.lhs) == 0 and k in need:
                    for r in _refs(q.rhs):
                        k2 = _key_of(r)
                        f2 = pair.families.get(k2)
                        if f2 is not None and f2.cls == 0 and k2 not in need:
                            need.add(k2)
                            changed = True
    pi_blocks = []
    for b in pair.blocks:
        eqs = [q for q in b.eqs if pair.cls(q.lhs) == 0 and _key_of(q.lhs) in need]
        if eqs:
            pi_blocks.append(Block(eqs, b.index, b.start, b.stop, b.direction))
    # hoisted definitions: one loop per (range), scalars at the end
    by_range = {}
    for key, (expr, lo, hi) in defs.items():
        if key not in need:
            continue
        if lo is None:
            by_range.setdefault(None, []).append(Eq(key, expr))
        else:
            by_range.setdefault((lo, hi), []).append(Eq(sp.IndexedBase(key)[_LIDX], expr))
    for rng, eqs in by_range.items():
        if rng is None:
            pi_blocks.append(Block(eqs))
        else:
            pi_blocks.append(Block(eqs, _LIDX, rng[0], rng[1], 1))

    storage = {}
    alloc = []
    inputs0 = {k for k in pair.families if pair.families[k].cls == 0
               and pair.families[k].kind == "input"}
    for key in sorted(need | inputs0, key=str):
        fam = pair.families[key]
        nm = "a_" + identifier(str(key)) if fam.is_array else "v_" + identifier(str(key))
        if fam.kind == "input":
            storage[key] = _Store(lambda idx: "q[i]", None)
            continue
        if fam.is_array:
            alloc.append(f"{nm} = np.zeros({fam.hi - fam.lo + 1})")
            storage[key] = _Store(_arr(nm, fam.lo), _arr(nm, fam.lo), nm)
        else:
            storage[key] = _Store(_sc(nm), _sc(nm))
    # diagonal system: its own names ("d_" prefix)
    dstorage = {}
    for key, fam in diag.families.items():
        if fam.kind == "input":
            dstorage[key] = _Store(lambda idx: "q[i]", None)
            continue
        nm = "d_a_" + identifier(str(key)) if fam.is_array else "d_v_" + identifier(str(key))
        if fam.is_array:
            alloc.append(f"{nm} = np.zeros({fam.hi - fam.lo + 1})")
            dstorage[key] = _Store(_arr(nm, fam.lo), _arr(nm, fam.lo), nm)
        else:
            dstorage[key] = _Store(_sc(nm), _sc(nm))

    em.line("@njit(cache=CACHE, nogil=True)")
    em.line(f"def per_input(q, theta, {_QUAD_ARGS}, T, dnngp, dntk, dterms):")
    em.indent()
    em.line('"""Per-input table T[i, :] and the exact diagonal k(x_i, x_i); q[i] = x_i.x_i/d."""')
    for k, p in enumerate(params):
        em.line(f"{param_code[p]} = theta[{k}]")
    for a in alloc:
        em.line(a)
    em.line("for i in range(q.shape[0]):")
    em.indent()
    sec = _Section(em, pair.quads, storage, options, dict(param_code))
    sec.helpers = helpers
    sec.emit_blocks(pi_blocks, [])
    for key, (off, lo) in layout.items():
        fam = pair.families[key]
        st = storage[key]
        if fam.is_array:               # element loop: slice assignment compiles slowly
            n = fam.hi - fam.lo + 1
            em.line(f"for k in range({n}):")
            em.line(f"    T[i, {off} + k] = {st.name}[k]")
        else:
            em.line(f"T[i, {off}] = {st.read(None)}")
    # diagonal section
    dsec = _Section(em, diag.quads, dstorage, options, dict(param_code))
    dsec.helpers = helpers
    douts = diag.outputs
    assigns = []
    for name, e in douts:
        if name == "nngp":
            assigns.append(("dnngp[i]", e))
        elif name == "ntk":
            assigns.append(("dntk[i]", e))
    term_names = [n[1] for n, _ in pair.outputs if isinstance(n, tuple)]
    dterm = {n[1]: e for n, e in douts if isinstance(n, tuple)}
    for k, n in enumerate(term_names):
        assigns.append((f"dterms[{k}, i]", dterm.get(n, sp.S.Zero)))
    dsec.emit_blocks(diag.blocks, assigns)
    em.dedent()
    em.dedent()
    parts.append("\n".join(em.lines))

    # ------------------------------------------------------------------ pairs
    em = _Emitter()
    pstorage = {}
    palloc = []
    for key, fam in pair.families.items():
        if fam.cls != "pair":
            continue
        nm = ("a_" if fam.is_array else "v_") + identifier(str(key))
        if fam.is_array:
            palloc.append(f"{nm} = np.empty(({fam.hi - fam.lo + 1}, nb_max))")
            pstorage[key] = _Store(_arr(nm, fam.lo, "jj"), _arr(nm, fam.lo, "jj"), nm)
        else:
            palloc.append(f"{nm} = np.empty(nb_max)")
            pstorage[key] = _Store(_sc(nm + "[jj]"), _sc(nm + "[jj]"), nm)
    for key, (off, lo) in layout.items():
        pstorage[key] = _Store(_tab("T1", "i", off, lo), None)
        pstorage[("col", key)] = _Store(_tab_t("T2", "j", off, lo), None)
    for k1, k0 in twins.items():
        if k0 in layout:
            off, lo = layout[k0]
            pstorage[k1] = _Store(_tab_t("T2", "j", off, lo), None)
    em.line("")
    em.line("")
    em.line("@njit(cache=CACHE, parallel=True)")
    em.line(f"def pairs(T1, T2, theta, {_QUAD_ARGS}, nngp, ntk, terms, with_terms, r0, r1, sym,")
    em.line("          gscale, bad, groups):")
    em.indent()
    em.line('"""Rows r0..r1-1 of the Gram matrices; ntk[i, j] holds xi.xi\' on entry (times gscale')
    em.line("is xi.xi'/d).  T1[i, :] is the per-input table of row i, T2[:, j] (transposed) of")
    em.line("column j.  Columns go in chunks of CHUNK: every step is a loop over the chunk.")
    em.line("")
    em.line("sym: X2 is X1; only j > i is computed (rows interleaved to balance the triangle).")
    em.line("bad[i]: how many NTK entries of row i are not finite (overflow is reported).")
    em.line("groups: rows are dealt to this many parallel groups, each with its own scratch.")
    em.line('"""')
    for k, p in enumerate(params):
        em.line(f"{param_code[p]} = theta[{k}]")
    em.line("n2 = ntk.shape[1]")
    em.line("nrows = r1 - r0")
    em.line("nb_max = min(CHUNK, n2)")
    em.line("ngroups = max(1, min(nrows, groups))")
    em.line("for g in prange(ngroups):")
    em.indent()
    for a in palloc:
        em.line(a)
    alloc_at = len(em.lines)
    em.line("for ii in range(g, nrows, ngroups):")
    em.indent()
    em.line("if sym:")
    em.line("    i = r0 + ii // 2 if ii % 2 == 0 else r1 - 1 - ii // 2")
    em.line("else:")
    em.line("    i = r0 + ii")
    em.line("nbad = 0")
    em.line("for jb in range(i + 1 if sym else 0, n2, CHUNK):")
    em.indent()
    em.line("nb = min(CHUNK, n2 - jb)")
    pblocks = []
    for b in pair.blocks:
        eqs = [q for q in b.eqs if pair.cls(q.lhs) == "pair"]
        if eqs:
            pblocks.append(Block(eqs, b.index, b.start, b.stop, b.direction))
    psec = _Section(em, pair.quads, pstorage, options, dict(param_code), chunk=True)
    psec.helpers = helpers
    if pair_inputs:
        psec._open_chunk()
        for s_ in pair_inputs:
            em.line(f"{pstorage[s_].write(None)} = ntk[i, j] * gscale")
        psec._close_chunk()
    assigns = []
    for name, e in pair.outputs:
        if name == "nngp":
            assigns.append(("nngp[i, j]", e))
        elif name == "ntk":
            assigns.append(("_ntk", e))
    terms = [(n, e) for n, e in pair.outputs if isinstance(n, tuple)]
    assigns += [(f"_term{k}", e) for k, (_, e) in enumerate(terms)]
    epilogue = ["ntk[i, j] = _ntk", "if not math.isfinite(_ntk):", "    nbad += 1"]
    if terms:
        epilogue.append("if with_terms:")
        epilogue += [f"    terms[{k}, i, j] = _term{k}" for k in range(len(terms))]
    psec.emit_blocks(pblocks, assigns, epilogue)
    em.dedent()
    em.line("bad[i] = nbad")
    em.dedent()
    em.dedent()
    em.dedent()
    em.lines[alloc_at:alloc_at] = ["        " + a for a in dict.fromkeys(psec.row_allocs)]
    parts.append("\n".join(em.lines))
    body = "\n".join(parts[1:]).strip("\n")
    quad = [q.strip("\n") for q in helpers.sources]
    used = body + "".join(quad)
    trig = [_helpers_source().strip("\n")] if ("_acos(" in used or "_asin(" in used) else []
    return "\n\n\n".join([parts[0].strip("\n")] + trig + quad + [body]) + "\n", width


def _note_read(plan, r, needed0, twins):
    key = _key_of(r)
    fam = plan.families.get(key)
    if fam is None or fam.cls == "pair":
        return
    if fam.cls == 1:
        key = twins.get(key, key)
    if plan.families[key].kind == "input":
        needed0.add(key)
        return
    needed0.add(key)


def _arr(name, lo, col=None):
    def access(idx):
        i = _int(sp.sympify(idx) - lo)
        return f"{name}[{i}]" if col is None else f"{name}[{i}, {col}]"
    return access


def _sc(name):
    return lambda idx: name


def _tab_t(table, col, off, lo):
    """A per-input value of the column input: the transposed table, contiguous in j."""
    def access(idx):
        if lo is None:
            return f"{table}[{off}, {col}]"
        return f"{table}[{_int(sp.sympify(idx) + off - lo)}, {col}]"
    return access


def _tab(table, row, off, lo):
    def access(idx):
        if lo is None:
            return f"{table}[{row}, {off}]"
        return f"{table}[{row}, {_int(sp.sympify(idx) + off - lo)}]"
    return access


# ================================================================================ the cache
def cache_dir() -> str:
    """``$SYMNTK_CACHE_DIR``, else ``platformdirs.user_cache_dir("symntk")``."""
    env = os.environ.get("SYMNTK_CACHE_DIR")
    if env:
        return env
    import platformdirs
    return platformdirs.user_cache_dir("symntk")


def load_module(gen: GeneratedKernel, use_cache: bool = True):
    """Import the generated module, from the cache directory if possible.

    Returns ``(module, cached)``.  Any failure to write or read the cache (unwritable
    directory, a foreign file in the way) warns (:class:`CacheWarning`) and falls back to an
    in-memory module with ``CACHE = False``.
    """
    name = gen.module_name
    if use_cache:
        try:
            path = _write_source(gen)
            mod = sys.modules.get(name)
            if mod is not None and getattr(mod, "__file__", None) == path:
                return mod, True
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod                 # before exec_module: Numba's cache needs it
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return mod, True
        except (OSError, SyntaxError, ValueError, ImportError) as exc:
            warnings.warn(f"symntk kernel cache unusable ({type(exc).__name__}: {exc}); "
                          "compiling without it", CacheWarning, stacklevel=3)
    return _memory_module(gen), False


def _memory_module(gen: GeneratedKernel):
    name = gen.module_name + "_nocache"
    src = gen.source.replace("CACHE = True", "CACHE = False", 1)
    mod = types.ModuleType(name)
    mod.__file__ = f"<symntk generated {gen.key}>"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)   # noqa: S102 - our own generated text
    return mod


def _write_source(gen: GeneratedKernel) -> str:
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, gen.module_name + ".py")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            if fh.read() == gen.source:
                return path
        # a corrupted or foreign file under our name: replace it, and drop Numba's stale index
        warnings.warn(f"replacing a damaged kernel module in the cache: {path}", CacheWarning,
                      stacklevel=4)
        _drop_numba_cache(root, gen.module_name)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp_", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(gen.source)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def drop_numba_cache(gen: GeneratedKernel):
    """Remove Numba's cache files of one generated module (after they failed to load)."""
    try:
        _drop_numba_cache(cache_dir(), gen.module_name)
    except OSError:
        pass


def _drop_numba_cache(root: str, module_name: str):
    pyc = os.path.join(root, "__pycache__")
    if not os.path.isdir(pyc):
        return
    for f in os.listdir(pyc):
        if f.startswith(module_name + "."):
            try:
                os.unlink(os.path.join(pyc, f))
            except OSError:
                pass


def cache_info(root: str | None = None) -> dict:
    """Modules and Numba cache files in the cache directory: counts and bytes."""
    root = root or cache_dir()
    out = {"path": root, "modules": 0, "numba_files": 0, "bytes": 0}
    if not os.path.isdir(root):
        return out
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                out["bytes"] += os.path.getsize(p)
            except OSError:
                continue
            if f.startswith(MODULE_PREFIX) and f.endswith(".py") and dirpath == root:
                out["modules"] += 1
            elif f.endswith((".nbi", ".nbc")):
                out["numba_files"] += 1
    return out


def clear_cache(root: str | None = None) -> int:
    """Delete generated modules and their Numba cache files; returns the number of files."""
    root = root or cache_dir()
    n = 0
    if not os.path.isdir(root):
        return 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            manifest = os.path.basename(dirpath) == "manifests" and f.endswith(".json")
            if f.startswith((MODULE_PREFIX, ".tmp_")) or f.endswith((".nbi", ".nbc")) or manifest:
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except OSError:
                    pass
    return n
