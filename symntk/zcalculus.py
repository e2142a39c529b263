"""The Z calculus: limits of a tensor program as expectations over Gaussians (TP1 Thm 5.4,
TP2 Box 1, TP3 Box 1 / Thm 2.10).

Every vector x of a (loop-free) program and every input copy i (xi or xi') has a random variable
Z^x_i that its coordinates look like at infinite width (TP1 Thm 5.4, TP2 Box 1).  This module turns
those random variables into SymPy *atoms* and reduces expectations of products of atoms to kernel
symbols defined by equations, which is the whole derivation.

Atoms
-----
* ``base``: a Gaussian of the program's Setup or a MatMul output: ``Embedding`` (U xi), ``Bias``,
  the readout weight v, ``MatMul`` (W h) and, in the backward pass, W^T dh.  Base Gaussians of one
  *block* are jointly Gaussian; different blocks are independent (TP2 Box 1, rule 2).  A block is
  a matrix; under GIA a matrix and its transpose are different blocks (TP2 Heuristic 4.1).
* ``lincomb``: a ``Nonlin`` that is a linear combination of Gaussians (e.g. h = W x + b) is itself
  Gaussian (TP1's LinComb); its second moment gets a symbol of its own (the preactivation kernel
  Sigma).
* ``opaque``: any other vector (phi(h), a residual sum, a cotangent).  Opaque atoms are expanded
  into their definitions only when an expectation cannot be factorised without it.

Expectations (``Engine.expect``)
--------------------------------
Linearity first; then each product is split into groups of factors that share a block (groups
are independent, so the expectation factorises).  A group that is a lone opaque atom is a mean
symbol ``mu``, a pair of opaque atoms a kernel symbol ``C`` (forward) or ``D`` (backward), a group
of Gaussian functions a Gaussian expectation reduced by :mod:`symntk.gaussian`'s closed-form table,
and anything else is expanded one level and reduced again.  Every symbol is created on demand with
its defining equation, so the equations come out in evaluation order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import sympy as sp

from .activations import partial_derivative
from .program import (Bias, Carry, Concat, Dropout, Embedding, FixedReadout, Input, MatMul, Moment, Node,
                      Nonlin, Pool, Program, Readout, Scan, VectorReadout)

__all__ = ["Atom", "KernelKey", "SymbolInfo", "Engine", "FORWARD", "COTANGENT"]

#: Input copies: 0 is xi, 1 is xi'.  Kernels are derived for the pair.
COPIES = (0, 1)

#: Position index of each input copy (token t of xi, token r of xi') and the sequence lengths
#: (TP2 §6.2.1 writes C^{s^t, s-bar^r} for sequences of lengths T and T-bar).
POSITION_INDEX = (sp.Symbol("t", integer=True, positive=True),
                  sp.Symbol("r", integer=True, positive=True))
LENGTH = (sp.Symbol("T", integer=True, positive=True),
          sp.Symbol("Tbar", integer=True, positive=True))


@dataclass(frozen=True)
class Atom:
    """Z of one vector (forward) or its cotangent (backward) for one input copy."""
    kind: str                 # "base" | "lincomb" | "opaque"
    node: Node                # the program node (for cotangents: the node whose gradient it is)
    copy: int | None          # None: the same vector for every input (biases, readout weight)
    backward: bool = False    # True for cotangents d x = sqrt(n) df/dx and W^T dh base Gaussians
    block: object = None      # base atoms: the independence block (a Weight, Transpose, Bias, ...)
    arg: object = None        # base MatMul atoms: the atom multiplied by the matrix
    order: int = 0            # expansion order: later atoms are expanded first
    covariance: Callable | None = None  # base atoms: (engine, A, B) -> Cov within the block
    pos: object = None        # positioned vectors: the position (t, t - 1, T, ...); else None


@dataclass(frozen=True)
class Part:
    """The coordinates of a block (W^T, or a readout weight) that land on branch ``index`` of a
    concatenation: independent of every other branch's coordinates, with the block's variance
    scaled by the branch's share n_i / N of the width."""
    block: object
    index: int
    fraction: sp.Expr

    @property
    def variance(self) -> sp.Expr:
        return self.block.variance * self.fraction


@dataclass(frozen=True)
class Masked:
    """A block (W^T, or a readout weight) read through a dropout mask of keep rate ``keep``."""
    block: object
    keep: sp.Expr

    @property
    def variance(self) -> sp.Expr:
        return self.block.variance


def _same_example(eng: "Engine", A: "Atom", B: "Atom", keep) -> sp.Expr:
    """E[m_i m_j] / keep^2 for the dropout masks of copies i, j: 1 / keep for one example (one
    mask), 1 for two (independent masks; Neural Tangents' Dropout in train mode)."""
    return 1 / keep if A.copy == B.copy else sp.Integer(1)


@dataclass(frozen=True)
class KernelKey:
    """E[Z^a Z^b] (kind "C" forward, "D" backward) or E[Z^a] (kind "mu"), for atoms a, b."""
    kind: str
    atoms: tuple


@dataclass
class SymbolInfo:
    """What a derived symbol means; printers and code generators read this, not the name."""
    kind: str                     # "C" | "D" | "mu" | "input" | "ntk" | "nngp"
    nodes: tuple                  # program nodes (one or two)
    copies: tuple                 # input copies, e.g. (0, 1) for a cross-input kernel
    gaussian: bool = False        # a covariance of Gaussians (printed as Sigma)
    extra: dict = field(default_factory=dict)


def _real_symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


class Engine:
    """Derive kernel symbols of a loop-free program under GIA.

    ``label(node)`` gives the display name used in symbol names; ``on_equation(sym, rhs)`` is called
    once per new symbol, in evaluation order.
    """

    def __init__(self, program: Program, label: Callable[[Node], str], same_input: bool = False,
                 mode: str = "gia"):
        if program.repeats:
            raise ValueError("the Z-calculus engine needs a loop-free program (unroll Repeats first)")
        self.program = program
        self.label = label
        # k(xi, xi): both copies are one input, so Z^x_1 is Z^x_0 and cross kernels become second
        # moments of one variable (exact diagonals, no sqrt(q q - K^2) cancellation).
        self.same_input = same_input
        # GIA: Z^{Mx} is the Gaussian Zhat^{Mx}.  Exact (TP3 Box 1): Z^{Mx} = Zhat^{Mx} + Zdot^{Mx}.
        self.exact = mode == "exact"
        self._dbase: dict = {}
        self._bases: dict = {}
        self.zdot: dict[sp.Symbol, sp.Expr] = {}     # MatMul atom -> its nonzero Zdot term
        self.hats: set[sp.Symbol] = set()             # Zhat atoms that have a Zdot partner
        self.nodes = program.nodes
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.atoms: dict[sp.Symbol, Atom] = {}
        self._atom_of: dict[tuple, sp.Symbol] = {}
        self.definitions: dict[sp.Symbol, sp.Expr] = {}
        self.symbols: dict[KernelKey, sp.Symbol] = {}
        self.info: dict[sp.Symbol, SymbolInfo] = {}
        self.equations: list[tuple[sp.Symbol, sp.Expr]] = []
        self._deps: dict[sp.Symbol, frozenset] = {}
        self.input_kernels: dict[tuple, sp.Symbol] = {}
        self._names: set[str] = set()
        # positions: which Scan a Carry belongs to; atoms at shifted positions, left undefined
        # the state each Carry stands for at t - 1: the Scan itself, or a coupled state's body
        # (an LSTM's cell c^t), which is also never expanded away from the generic position
        self.state_of = {}
        for n in self.nodes:
            if isinstance(n, Scan):
                self.state_of[n.carry] = n
                for carry, body, init in getattr(n, "coupled", ()):
                    if init is not None:
                        raise NotImplementedError(
                            f"Scan {n.label()!r}: a coupled state with a nonzero initial value")
                    self.state_of[carry] = body
        self.coupled_states = {b for c, b in self.state_of.items() if not isinstance(b, Scan)}
        self.consumers = self._consumers()
        self.lazy: set[sp.Symbol] = set()
        self.key_of: dict[sp.Symbol, tuple] = {}
        self.index_symbols: set[sp.Symbol] = set(POSITION_INDEX)
        self._deps_open: set[sp.Symbol] = set()

    # ------------------------------------------------------------------ graph bookkeeping
    def _consumers(self) -> dict[Node, list[Node]]:
        """node -> the nodes that read it (its uses, whose cotangent contributions it sums)."""
        consumers: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for a in dict.fromkeys(n.operands):
                consumers[a].append(n)
        for carry, state in self.state_of.items():
            # s^t is read again at t + 1 through the carry: ds^t += d(carry)^{t+1}
            consumers[state].append(carry)
        return consumers

    def _fresh_name(self, stem: str) -> str:
        stem = "".join(ch if ch.isalnum() else "_" for ch in stem).strip("_") or "z"
        name, k = stem, 1
        while name in self._names:
            k += 1
            name = f"{stem}_{k}"
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ atoms
    def z(self, node: Node, copy: int, pos=None) -> sp.Expr:
        """Z^node for input copy ``copy`` (at position ``pos`` of a positioned vector; by default
        the copy's own index, t or r) as an expression in atoms (forward pass, TP2 Box 1)."""
        pos = self._position(node, copy, pos)
        copy = 0 if self.same_input else copy
        key = ("fwd", node, None if isinstance(node, Bias) else copy, pos)
        if key not in self._atom_of:
            rule = FORWARD.get(type(node))
            if rule is None:
                raise TypeError(f"the Z calculus has no forward rule for {type(node).__name__}")
            if node in self.coupled_states and not self.generic(pos):
                rule = _z_shifted_state
            self._atom_of[key] = out = rule(self, node, copy, pos)
            if out in self.atoms:
                self.key_of.setdefault(out, key)
        return self._atom_of[key]

    # ------------------------------------------------------------------ positions
    def _position(self, node: Node, copy: int, pos):
        if getattr(node, "positions", None) is None:
            return None
        return POSITION_INDEX[copy] if pos is None else sp.sympify(pos)

    def length(self, copy: int) -> sp.Symbol:
        return LENGTH[0 if self.same_input else copy]

    def index_of(self, pos) -> sp.Symbol | None:
        """The position index (t, r, ...) in ``pos``, or None for a fixed position such as T."""
        found = [s for s in sp.sympify(pos).free_symbols if s in self.index_symbols]
        return found[0] if found else None

    def generic(self, pos) -> bool:
        return pos is None or pos in self.index_symbols

    def lazy_atom(self, key: tuple, atom: Atom, name: str) -> sp.Symbol:
        """A Scan's state at a shifted position (s^{t-1}, s^{t+1}, s^T): an opaque atom that is
        never expanded.  Its moments are the same kernel families as the state's at t, read at a
        shifted index; expanding it would apply the body at a position where it does not hold
        (s^0 is the initial state, not the body at t = 0)."""
        sym = self.new_atom(atom, name)
        self.lazy.add(sym)
        self.key_of[sym] = key
        return sym

    def at(self, sym: sp.Symbol, pos) -> sp.Symbol:
        """The same vector's atom at another position."""
        tag, node, copy, _ = self.key_of[sym]
        return {"fwd": self.z, "bwd": self.dz, "bwd-matmul": self.transpose_atom}[tag](
            node, 0 if copy is None else copy, pos)

    def pos_tag(self, pos) -> str:
        if pos is None:
            return ""
        i = self.index_of(pos)
        if i is None:
            return f"_{pos}"
        k = sp.sympify(pos) - i
        return f"_{i}" if k == 0 else f"_{i}{'p' if k > 0 else 'm'}{abs(k)}"

    def new_atom(self, atom: Atom, name: str, definition: sp.Expr | None = None) -> sp.Symbol:
        """A fresh atom symbol; non-base atoms carry their ``definition`` in earlier atoms."""
        sym = _real_symbol(self._fresh_name(name))
        self.atoms[sym] = atom
        if definition is not None:
            self.definitions[sym] = definition
        return sym

    def is_lincomb(self, expr: sp.Expr) -> bool:
        """A linear form (no constant term) in Gaussian atoms is Gaussian (TP1's LinComb)."""
        atoms = [s for s in expr.free_symbols if s in self.atoms]
        if not atoms or any(self.atoms[s].kind == "opaque" for s in atoms):
            return False
        poly = sp.Poly(expr, *atoms) if expr.is_polynomial(*atoms) else None
        return poly is not None and poly.total_degree() == 1 and poly.coeff_monomial(1) == 0

    def dz(self, node: Node, copy: int, pos=None) -> sp.Expr:
        """Z^{dx} for the cotangent dx = sqrt(n) df/dx of ``node`` (backward pass, TP2 §6.1).

        The sum, over the node's uses, of each consumer's contribution (the ``COTANGENT`` table):
        a chain-rule factor times the consumer's own cotangent, a W^T dy base Gaussian, or the
        readout's seed.
        """
        pos = self._position(node, copy, pos)
        copy = 0 if self.same_input else copy
        key = ("bwd", node, copy, pos)
        if key in self._atom_of:
            return self._atom_of[key]
        if (isinstance(node, Scan) or node in self.coupled_states) and not self.generic(pos):
            order = 2 * len(self.nodes) - self.position[node]
            self._atom_of[key] = self.lazy_atom(
                key, Atom("opaque", node, copy, backward=True, order=order, pos=pos),
                f"dZ_{self.label(node)}_{copy}{self.pos_tag(pos)}")
            return self._atom_of[key]
        terms = []
        for c in self.consumers[node]:
            rule = COTANGENT.get(type(c))
            if rule is None:
                raise TypeError(f"the Z calculus has no backward rule for {type(c).__name__}")
            if pos is None and getattr(c, "positions", None) is not None and not isinstance(c, Carry):
                # a position-free vector (a bias) used at every position: its gradient sums them
                i, L = POSITION_INDEX[copy], self.length(copy)
                terms.append(sp.Sum(rule(self, c, node, copy, i), (i, 1, L)))
            else:
                terms.append(rule(self, c, node, copy, pos))
        definition = sp.Add(*terms)
        # A cotangent that is exactly one other atom is that atom, and a constant one (a fixed
        # readout's) is that constant: no alias symbols in the output.
        if definition in self.atoms or not (definition.free_symbols & self.atoms.keys()):
            sym = definition
        else:
            order = 2 * len(self.nodes) - self.position[node]
            sym = self.new_atom(Atom("opaque", node, copy, backward=True, order=order, pos=pos),
                                f"dZ_{self.label(node)}_{copy}{self.pos_tag(pos)}", definition)
        self._atom_of[key] = sym
        if sym in self.atoms:
            self.key_of.setdefault(sym, key)
        return sym

    def chain_factor(self, consumer: Node, fn: sp.Lambda, node: Node, copy: int,
                     pos=None) -> sp.Expr:
        """sum_k d fn / d arg_k at Z, over the arguments of ``consumer`` that are ``node``."""
        args = [self.z(a, copy, pos) for a in consumer.inputs]
        grad = sp.Integer(0)
        for var, a in zip(fn.variables, consumer.inputs):
            if a == node:
                d = partial_derivative(fn.expr, var, f"the nonlinearity of {consumer.label()!r}:")
                grad += d.subs(dict(zip(fn.variables, args)), simultaneous=True)
        return grad

    def moment(self, node: Moment, copy: int) -> sp.Expr:
        """theta = E psi(Z^{h1}, ...), a deterministic scalar per input (TP2 Box 2; the
        NETSOR-T+ Moment, TP2 App. B)."""
        if node.positions is not None:
            raise NotImplementedError(f"Moment {node.label()!r} of positioned vectors (one scalar per "
                                      "position) is not derived yet")
        copy = 0 if self.same_input else copy
        key = ("moment", node, copy)
        if key not in self._atom_of:
            rhs = self.expect(node.psi(*[self.z(a, copy) for a in node.inputs]))
            if rhs.is_Number:
                self._atom_of[key] = rhs
            else:
                sym = sp.Symbol(self._fresh_name(f"M_{self.label(node)}_{copy}"), real=True)
                self.info[sym] = SymbolInfo("M", (node,), (copy,))
                self.equations.append((sym, rhs))
                self._atom_of[key] = sym
        return self._atom_of[key]

    def moment_cotangent(self, node: Moment, copy: int) -> sp.Expr:
        """c_theta = sum over consumers y = phi(..; theta) of E[Z^{dy} d_theta phi(Z)]: the limit of
        (1/n) sum_beta dy_beta d_theta phi_beta.  Zero in BP-like programs (dy is odd in v)."""
        copy = 0 if self.same_input else copy
        key = ("moment-cot", node, copy)
        if key not in self._atom_of:
            self._atom_of[key] = sp.Add(*[
                self.expect(self.chain_factor(c, c.phi, node, copy) * self.dz(c, copy))
                for c in self.consumers[node]])
        return self._atom_of[key]

    def transpose_atom(self, use: MatMul, copy: int, pos=None, part: int | None = None) -> sp.Symbol:
        """Z^{M^T dy} for the forward use y = M x; its block is M^T (a fresh matrix under GIA).
        For y = M [x_1; ...; x_k], ``part`` i is the cotangent of x_i: the rows of M^T on x_i's
        coordinates, a block of its own with variance sigma_M^2 n_i / N."""
        pos = self._position(use, copy, pos)
        copy = 0 if self.same_input else copy
        if part is not None:
            return self._part_atom(("bwd-part", use, copy, part), use.vector, part, use.matrix,
                                   copy, self.dz(use, copy, pos), order=2 * len(self.nodes)
                                   - self.position[use])
        key = ("bwd-matmul", use, copy, pos)
        if key not in self._atom_of:
            dy = self.dz(use, copy, pos)
            matrix = use.matrix.T
            order = 2 * len(self.nodes) - self.position[use]
            # W^T dy is (a term of) the gradient of the vector W multiplied: name it after that.
            hat = self.new_atom(
                Atom("base", use.vector, copy, backward=True, block=matrix, arg=dy, order=order,
                     covariance=_cov_cotangent, pos=pos),
                f"Zhat_{self.label(use.vector)}_T_{copy}{self.pos_tag(pos)}")
            self._atom_of[key] = self.with_zdot(hat, f"Z_{self.label(use)}_T_{copy}{self.pos_tag(pos)}")
            self.key_of.setdefault(self._atom_of[key], key)
        return self._atom_of[key]

    # ------------------------------------------------------------------ exact mode: Zdot
    def with_zdot(self, hat: sp.Symbol, name: str) -> sp.Symbol:
        """Z^{Mx} = Zhat^{Mx} + Zdot^{Mx} in exact mode (TP3 Box 1, ZDot):

            Zdot^{Mx} = sigma_M^2 sum_{M^T y in the program} Z^y E[dZ^x / dZhat^{M^T y}],

        the derivative being syntactic in the Zhat's (TP3 Remark 2.11).  Only Zhat^{M^T y} that
        Z^x actually reaches can contribute, and the program is straight-line, so the sum runs over
        the block-M^T atoms in Z^x's expansion.  Where Zdot = 0 (always under GIA; in BP-like
        programs, TP2 Thm 7.2) the atom stays the Gaussian Zhat.
        """
        if not self.exact:
            return hat
        A = self.atoms[hat]
        if isinstance(A.node, MatMul) and isinstance(A.node.vector, (Concat, Dropout)):
            raise NotImplementedError(f"exact mode over {A.node.vector.label()!r} (a concatenation "
                                      "or a dropout)")
        transpose = A.block.T
        variance = A.block.variance
        terms = []
        for b in sorted(self._base_atoms(A.arg), key=self._sort_key):
            if self.atoms[b].block != transpose:
                continue
            coeff = self.expect(self._d(A.arg, b))
            if coeff != 0:
                terms.append(variance * coeff * self.atoms[b].arg)
        dot = sp.Add(*terms)
        if dot == 0:
            return hat
        sym = self.new_atom(Atom("opaque", A.node, A.copy, backward=A.backward, order=A.order),
                            name, hat + dot)
        self.zdot[sym] = dot
        self.hats.add(hat)
        return sym

    def _base_atoms(self, expr: sp.Expr) -> frozenset:
        """Base Gaussians reachable from ``expr`` through definitions (not through a base atom's
        own argument: Zhat is a fresh Gaussian, its argument only sets its covariance)."""
        out = set()
        for s in expr.free_symbols:
            if s not in self.atoms:
                continue
            if s not in self._bases:
                self._bases[s] = frozenset([s]) if self.atoms[s].kind == "base" else \
                    self._base_atoms(self.definitions[s])
            out |= self._bases[s]
        return frozenset(out)

    def _d(self, expr: sp.Expr, base: sp.Symbol) -> sp.Expr:
        """d expr / d Zhat_base by the chain rule through atom definitions."""
        total = sp.Integer(0)
        for s in expr.free_symbols:
            if s in self.atoms:
                inner = self._datom(s, base)
                if inner != 0:
                    total += sp.diff(expr, s) * inner
        return total

    def _datom(self, s: sp.Symbol, base: sp.Symbol) -> sp.Expr:
        if s == base:
            return sp.Integer(1)
        if self.atoms[s].kind == "base":
            return sp.Integer(0)
        key = (s, base)
        if key not in self._dbase:
            self._dbase[key] = self._d(self.definitions[s], base)
        return self._dbase[key]

    def _part_atom(self, key, cat: Concat, part: int, block, copy, arg, order) -> sp.Symbol:
        """The cotangent of branch ``part`` of ``cat`` read through ``block`` (a matmul's matrix
        or a readout weight): a base Gaussian of the block's rows on that branch."""
        return self._read_atom(key, cat.vectors[part], Part(block, part, cat.fractions[part]),
                               copy, arg, _cov_cotangent_part if arg is not None else _cov_setup,
                               order, f"{'T' if arg is not None else 'v'}{part}")

    def _read_atom(self, key, node, block, copy, arg, covariance, order, tag) -> sp.Symbol:
        if key not in self._atom_of:
            self._atom_of[key] = self.new_atom(
                Atom("base", node, copy, backward=True, block=block, arg=arg, order=order,
                     covariance=covariance),
                f"Z_{self.label(node)}_{tag}" + ("" if copy is None else f"_{copy}"))
        return self._atom_of[key]

    def dropout_atom(self, drop: Dropout, use, copy: int) -> sp.Symbol:
        """The cotangent of x through y = dropout(x) read by ``use`` (y = W y or a readout):
        dx = (m / keep) W^T dy (or (m / keep) v), a Gaussian given the masks, of covariance
        sigma^2 E[dy dy'] times 1/keep for one example and 1 for two (:func:`_same_example`)."""
        copy = 0 if self.same_input else copy
        if isinstance(use, MatMul):
            return self._read_atom(("bwd-drop", use, copy), drop.vector,
                                   Masked(use.matrix, drop.keep), copy, self.dz(use, copy),
                                   _cov_cotangent_dropout,
                                   2 * len(self.nodes) - self.position[use], "Tm")
        return self._read_atom(("readout-drop", use.weight, copy), drop.vector,
                               Masked(use.weight, drop.keep), copy, None, _cov_readout_dropout,
                               -1, "vm")

    def inner(self, x: Node, y: Node) -> sp.Expr:
        """lim x(xi) . y(xi') / N for vectors of the copies 0 and 1: E[Z^x_0 Z^y_1], or for
        concatenations sum_i (n_i / N) E[Z^{x_i}_0 Z^{y_i}_1] (branch by branch)."""
        if isinstance(x, Dropout) or isinstance(y, Dropout):
            if x != y:
                raise NotImplementedError(f"one matrix multiplies {x.label()!r} and {y.label()!r}")
            factor = 1 / x.keep if self.same_input else sp.Integer(1)
            return factor * self.expect(self.z(x.vector, 0) * self.z(y.vector, 1))
        if not isinstance(x, Concat) and not isinstance(y, Concat):
            return self.expect(self.z(x, 0) * self.z(y, 1))
        if not (isinstance(x, Concat) and isinstance(y, Concat)
                and x.fractions == y.fractions):
            raise NotImplementedError(f"one matrix multiplies {x.label()!r} and {y.label()!r}: "
                                      "a concatenation and a vector of another layout")
        return sp.Add(*[w * self.expect(self.z(a, 0) * self.z(b, 1))
                        for w, a, b in zip(x.fractions, x.vectors, y.vectors)])

    def readout_atom(self, readout: Readout, part: int | None = None) -> sp.Symbol:
        """Z^v of a trained readout weight: a base Gaussian of its own block, N(0, sigma_v^2);
        on branch ``part`` of a concatenation, N(0, sigma_v^2 n_i / N)."""
        if part is not None:
            return self._part_atom(("readout-part", readout.weight, part), readout.vector, part,
                                   readout.weight, None, None, order=-1)
        key = ("readout", readout.weight)
        if key not in self._atom_of:
            self._atom_of[key] = self.new_atom(
                Atom("base", readout.weight, None, backward=True, block=readout.weight, order=-1,
                     covariance=_cov_setup), f"Z_{readout.weight.name}")
        return self._atom_of[key]

    # ------------------------------------------------------------------ dependencies
    def deps(self, sym: sp.Symbol) -> frozenset:
        """The blocks an atom depends on; atoms with disjoint blocks are independent.

        A Scan's state at a shifted position depends on the same blocks as at t (the body is
        the same at every position): its blocks are those of the state at the copy's index, a
        fixed point reached by not re-entering an atom already being visited."""
        if sym in self._deps:
            return self._deps[sym]
        atom = self.atoms[sym]
        if sym in self._deps_open:
            return frozenset()
        self._deps_open.add(sym)
        try:
            if atom.kind == "base":
                out = frozenset([atom.block])
            elif sym in self.lazy:
                out = self.deps(self.at(sym, self.index_of(atom.pos) or POSITION_INDEX[0]))
            else:
                out = frozenset().union(*[self.deps(s) for s in self.definitions[sym].free_symbols
                                          if s in self.atoms])
        finally:
            self._deps_open.discard(sym)
        if not self._deps_open:
            self._deps[sym] = out
        return out

    def _factor_deps(self, factor: sp.Expr) -> frozenset:
        return frozenset().union(*[self.deps(s) for s in factor.free_symbols if s in self.atoms])

    # ------------------------------------------------------------------ symbols
    def input_kernel(self, inp: Input, i: int, j: int, pi=None, pj=None) -> sp.Expr:
        """xi_i . xi_j / d: the data the recursion starts from (TP2 Eq. 18, Sigma^in).  For
        sequences, the token kernel xi_i^{pi} . xi_j^{pj} / d, an array indexed by positions."""
        if self.same_input:
            i, j = 0, 0
        if i > j or (i == j and inp.positions and self._position_key(pj) < self._position_key(pi)):
            # one symbol per unordered pair: k_ij[p, q] = k_ji[q, p], and a sequence's own token
            # kernel k_ii is symmetric in (p, q), so it is read in one canonical order -- else
            # the covariance of (Z^{U xi^t}, Z^{U xi^r}) would hold k[t, r] and k[r, t]
            i, j, pi, pj = j, i, pj, pi
        key = (inp, i, j)
        if key not in self.input_kernels:
            name = self._fresh_name(f"k_{inp.name}_{i}{j}")
            sym = sp.IndexedBase(name, real=True) if inp.positions else sp.Symbol(name, real=True)
            self.input_kernels[key] = sym
            label = sym.label if inp.positions else sym
            self.info[label] = SymbolInfo("input", (inp, inp), (i, j),
                                          extra={"positions": 2 if inp.positions else 0})
        sym = self.input_kernels[key]
        return sym[pi, pj] if inp.positions else sym

    def _position_key(self, pos) -> tuple:
        """A total order on positions: by the index they run over (t before r), then by text."""
        i = self.index_of(pos)
        rank = POSITION_INDEX.index(i) if i in POSITION_INDEX else len(POSITION_INDEX)
        return (rank, sp.default_sort_key(sp.sympify(pos)))

    def _symbol(self, key: KernelKey, definition: Callable[[], sp.Expr], index=(),
                generic=()) -> sp.Expr:
        """The symbol for ``key`` with its equation; a constant expectation is just the constant
        (e.g. the zero mean of a cotangent), so no dead ``mu = 0`` equations appear.

        With positions, ``key`` names a kernel *family* F over positions, defined once by its
        equation at the generic indices ``generic`` (t, r) and read at ``index`` (t - 1, T, ...).
        The family exists before its right-hand side is derived, so the right-hand side may read
        the family itself at shifted positions: that is the recursion in (t, r) (TP2 Eq. 14).
        """
        if index:
            return self._family(key, definition, index, generic, self._axes(key))
        if key in self.symbols:
            return self.symbols[key]
        rhs = definition()
        if key in self.symbols:                    # defined while computing rhs
            return self.symbols[key]
        if rhs.is_Number:
            self.symbols[key] = rhs
            return rhs
        atoms = [self.atoms[a] for a in key.atoms]
        stem = {"C": "C", "D": "D", "mu": "mu"}[key.kind]
        names = "_".join(dict.fromkeys(self.label(a.node) for a in atoms))
        copies = "".join("x" if a.copy is None else str(a.copy) for a in atoms)
        sym = sp.Symbol(self._fresh_name(f"{stem}_{names}_{copies}"), real=True)
        self.symbols[key] = sym
        gaussian_ = all(a.kind in ("base", "lincomb") for a in atoms)
        self.info[sym] = SymbolInfo(key.kind, tuple(a.node for a in atoms),
                                    tuple(a.copy for a in atoms), gaussian=gaussian_,
                                    extra={"backward": any(a.backward for a in atoms),
                                           "hat": any(s in self.hats for s in key.atoms),
                                           "zdot": any(s in self.zdot for s in key.atoms)})
        self.equations.append((sym, rhs))
        return sym

    def _family(self, key: KernelKey, definition, index, generic, axes=()) -> sp.Expr:
        if key not in self.symbols:
            atoms = [self.atoms[a] for a in key.atoms]
            names = "_".join(dict.fromkeys(self.label(a.node) for a in atoms))
            copies = "".join("x" if a.copy is None else str(a.copy) for a in atoms)
            base = sp.IndexedBase(self._fresh_name(f"{key.kind}_{names}_{copies}"), real=True)
            self.symbols[key] = base
            self.info[base.label] = SymbolInfo(
                key.kind, tuple(a.node for a in atoms), tuple(a.copy for a in atoms),
                gaussian=all(a.kind in ("base", "lincomb") for a in atoms),
                extra={"backward": any(a.backward for a in atoms), "positions": len(generic),
                       "axes": axes, "hat": False, "zdot": False,
                       # each atom's position in terms of the family's generic index (printing)
                       "atom_positions": tuple(a.pos for a in atoms), "generic": tuple(generic)})
            rhs = definition()
            self.equations.append((base[generic], rhs))
        return self.symbols[key][index]

    def _axes(self, key: KernelKey) -> tuple:
        """The input copy whose positions each index of a family runs over (generic atoms sharing
        one index form a one-index family)."""
        positioned = [self.atoms[a] for a in key.atoms if self.atoms[a].pos is not None]
        indices = [self.index_of(a.pos) for a in positioned]
        if len(positioned) == 2 and indices[0] is not None and indices[0] == indices[1]:
            return (positioned[0].copy,)
        return tuple(a.copy for a in positioned)

    def _moment_key(self, kind: str, syms: list):
        """(generic atoms, the index they are read at, the generic index) for a kernel of
        positioned atoms: E[Z^a(t + i) Z^b(r + j)] is the family F[t, r] read at (t + i, r + j);
        two atoms on one index, E[Z^a(t + i) Z^b(t + j)], the family G[t] = E[Z^a(t) Z^b(t + j - i)]
        read at t + i."""
        poss = [self.atoms[s].pos for s in syms]
        if all(p is None for p in poss):
            return syms, (), ()
        idxs = [None if p is None else self.index_of(p) for p in poss]
        same_index = idxs[0] is not None and idxs[0] == idxs[1]
        if len(syms) == 2 and None not in poss and (same_index or poss[0] == poss[1]):
            # one position (a diagonal such as E[(Z^s_T)^2]) or one index with a fixed lag
            delta = sp.expand(poss[1] - poss[0])
            g = POSITION_INDEX[0]
            return [self.at(syms[0], g), self.at(syms[1], g + delta)], (poss[0],), (g,)
        generic, index, out = [], [], []
        for k, (s, p) in enumerate(zip(syms, poss)):
            if p is None:
                out.append(s)
                continue
            g = POSITION_INDEX[len(generic)]
            generic.append(g)
            index.append(p)
            out.append(self.at(s, g))
        return out, tuple(index), tuple(generic)

    def second_moment(self, a: sp.Symbol, b: sp.Symbol) -> sp.Expr:
        """The symbol for E[Z^a Z^b], defined by expanding both atoms one level."""
        a, b = sorted((a, b), key=self._sort_key)
        kind = "D" if self.atoms[a].backward or self.atoms[b].backward else "C"
        (ga, gb), index, generic = self._moment_key(kind, [a, b])
        return self._symbol(KernelKey(kind, (ga, gb)),
                            lambda: self.expect(self._expand(ga) * self._expand(gb)), index, generic)

    def mean(self, a: sp.Symbol) -> sp.Expr:
        (ga,), index, generic = self._moment_key("mu", [a])
        return self._symbol(KernelKey("mu", (ga,)), lambda: self.expect(self._expand(ga)),
                            index, generic)

    def _sort_key(self, sym):
        atom = self.atoms[sym]
        if atom.pos is not None:       # one order for a vector at every position of one index
            i = self.index_of(atom.pos)
            rank = POSITION_INDEX.index(i) if i in POSITION_INDEX else (2, str(i))
            return (atom.order, -1 if atom.copy is None else atom.copy, rank)
        return (atom.order, -1 if atom.copy is None else atom.copy, sym.name)

    def _expand(self, sym: sp.Symbol) -> sp.Expr:
        if sym in self.lazy:
            raise NotImplementedError(
                f"the derivation needs the law of {sym} (a recurrent state at a shifted position) "
                "beyond its kernels: only states entering the next step through matrix products "
                "(W s^{t-1}, as in a simple RNN) are derived as a recursion over positions")
        return self.definitions.get(sym, sym)

    # ------------------------------------------------------------------ covariance of Gaussians
    def cov(self, a: sp.Symbol, b: sp.Symbol) -> sp.Expr:
        """Cov(Z^a, Z^b) for Gaussian atoms (TP2 Box 1 MatMul rule; TP2 Eq. 18 for the Setup).

        A LinComb is expanded bilinearly; base Gaussians of different blocks are independent, and
        within a block the ``COVARIANCE`` table, keyed by the block's kind, gives the covariance.
        """
        A, B = self.atoms[a], self.atoms[b]
        if A.kind == "lincomb" and B.kind == "lincomb":
            return self.second_moment(a, b)
        if A.kind == "lincomb" or B.kind == "lincomb":
            lin, other = (a, b) if A.kind == "lincomb" else (b, a)
            return self._bilinear(self.definitions[lin], other)
        if A.block != B.block:
            return sp.Integer(0)
        return A.covariance(self, A, B)

    def _bilinear(self, expr: sp.Expr, other: sp.Symbol) -> sp.Expr:
        expr = sp.expand(expr)
        return sp.Add(*[coeff * self.cov(s, other)
                        for s in expr.free_symbols if s in self.atoms
                        for coeff in [expr.coeff(s)]])

    # ------------------------------------------------------------------ expectations
    def expect(self, expr: sp.Expr) -> sp.Expr:
        """E[expr] for an expression in atoms, as an expression in kernel symbols.

        Independent factors are separated before anything is expanded, so a Gaussian integrand
        such as phi'(u) phi'(v) with phi' a sum stays one expectation (one quadrature, or one
        closed form) instead of being cut into pieces by distributing the product.
        """
        expr = sp.sympify(expr)
        if expr.has(sp.Sum):
            return self._expect_sums(expr)
        if not isinstance(expr, sp.Add):
            coeff, factors = self._split(expr)
            if not factors:
                return coeff
            groups = self._groups(factors)
            if len(groups) > 1:
                return coeff * sp.Mul(*[self.expect(sp.Mul(*g)) for g in groups])
            product = sp.Mul(*factors)
            syms = sorted((s for s in product.free_symbols if s in self.atoms), key=self._sort_key)
            gaussian_only = all(self.atoms[s].kind != "opaque" for s in syms)
            if gaussian_only and not product.is_polynomial(*syms):
                return coeff * self._gaussian(product, syms)
        expanded = sp.expand(expr, power_exp=False, power_base=False, log=False)
        total = []
        for term in sp.Add.make_args(expanded):
            coeff, factors = self._split(term)
            total.append(coeff * self._expect_product(factors) if factors else coeff)
        return sp.Add(*total)

    def _expect_sums(self, expr: sp.Expr) -> sp.Expr:
        """E[sum_t f(t) sum_r g(r)] = sum_t sum_r E[f(t) g(r)]: sums over positions (pooling, a
        bias's gradient over every position) move outside the expectation, each with an index of
        its own."""
        total = []
        for term in sp.Add.make_args(sp.expand(expr, power_exp=False, power_base=False, log=False)):
            factors = []
            for f in sp.Mul.make_args(term):
                if isinstance(f, sp.Pow) and f.base.has(sp.Sum) and f.exp.is_Integer and f.exp > 0:
                    factors.extend([f.base] * int(f.exp))
                else:
                    factors.append(f)
            rest, limits = [], []
            used = set().union(*[f.free_symbols for f in factors if not isinstance(f, sp.Sum)])
            for f in factors:
                if not isinstance(f, sp.Sum):
                    rest.append(f)
                    continue
                body = f.function
                for (i, lo, hi) in f.limits:
                    if i in used:
                        j = next(k for k in itertools.chain(POSITION_INDEX, self._extra_indices())
                                 if k not in used)
                        body = self._reindex(body, i, j)
                        i = j
                    used.add(i)
                    limits.append((i, lo, hi))
                rest.append(body)
            inner = self.expect(sp.Mul(*rest))
            total.append(sp.Sum(inner, *limits) if inner != 0 else sp.Integer(0))
        return sp.Add(*total)

    def _reindex(self, expr: sp.Expr, i: sp.Symbol, j: sp.Symbol) -> sp.Expr:
        """``expr`` with position index i renamed j, in the positions of its atoms too."""
        sub = {a: self.at(a, self.atoms[a].pos.xreplace({i: j})) for a in expr.free_symbols
               if a in self.atoms and self.atoms[a].pos is not None
               and i in sp.sympify(self.atoms[a].pos).free_symbols}
        return expr.xreplace(sub).xreplace({i: j})

    def _extra_indices(self):
        k = 2
        while True:
            sym = sp.Symbol(f"t_{k}", integer=True, positive=True)
            self.index_symbols.add(sym)
            yield sym
            k += 1

    def _groups(self, factors: list[sp.Expr]) -> list[list[sp.Expr]]:
        """Factors linked by shared blocks; different groups are independent."""
        groups: list[tuple[frozenset, list]] = []
        for f in factors:
            deps, members = self._factor_deps(f), [f]
            keep = []
            for gdeps, gmembers in groups:
                if gdeps & deps:
                    deps, members = deps | gdeps, gmembers + members
                else:
                    keep.append((gdeps, gmembers))
            groups = keep + [(deps, members)]
        return [members for _, members in groups]

    def _split(self, term: sp.Expr):
        coeff, factors = sp.Integer(1), []
        for f in sp.Mul.make_args(term):
            if f.free_symbols & self.atoms.keys():
                factors.append(f)
            else:
                coeff *= f
        return coeff, factors

    def _expect_product(self, factors: list[sp.Expr]) -> sp.Expr:
        # 1. A nonlinear function of an opaque atom needs that atom's definition.
        for f in factors:
            inner = self._opaque_inside_heads(f)
            if inner:
                sym = max(inner, key=self._sort_key)
                product = sp.Mul(*factors).xreplace({sym: self._expand(sym)})
                return self.expect(product)
        # 2. Split into independent groups (disjoint blocks), expectation factorises.
        return sp.Mul(*[self._expect_group(members) for members in self._groups(factors)])

    def _opaque_inside_heads(self, factor: sp.Expr) -> set:
        """Opaque atoms that appear inside a non-polynomial function in ``factor``."""
        found, stack = set(), [factor]
        while stack:
            sub = stack.pop()
            polynomial = isinstance(sub, (sp.Add, sp.Mul, sp.Symbol, sp.Number)) or (
                isinstance(sub, sp.Pow) and sub.exp.is_Integer and sub.exp >= 0)
            if polynomial:
                stack.extend(sub.args)
            else:
                found |= {s for s in sub.free_symbols
                          if s in self.atoms and self.atoms[s].kind == "opaque"}
        return found

    def _expect_group(self, members: list[sp.Expr]) -> sp.Expr:
        product = sp.Mul(*members)
        syms = sorted((s for s in product.free_symbols if s in self.atoms), key=self._sort_key)
        opaque = [s for s in syms if self.atoms[s].kind == "opaque"]
        if not opaque:
            return self._gaussian(product, syms)
        powers = sp.Mul(*members).as_powers_dict()
        simple = all(b in self.atoms and self.atoms[b].kind == "opaque" for b in powers) and \
            sum(int(e) for e in powers.values()) <= 2 and all(e.is_Integer for e in powers.values())
        if simple:
            atoms_ = [b for b, e in powers.items() for _ in range(int(e))]
            if len(atoms_) == 1:
                return self.mean(atoms_[0])
            return self.second_moment(*atoms_)
        sym = max(opaque, key=self._sort_key)
        return self.expect(product.xreplace({sym: self._expand(sym)}))

    def _gaussian(self, product: sp.Expr, syms: list[sp.Symbol]) -> sp.Expr:
        """E over jointly Gaussian atoms: an explicit, unevaluated ``GaussianExpectation`` node.

        The atoms are renamed u_1..u_k (so the same expectation in two layers is the same node);
        :func:`reduce_expectations` later applies the closed-form table of :mod:`symntk.gaussian`.
        """
        if len(syms) == 1 and product == syms[0]:
            return sp.Integer(0)
        if len(syms) == 2 and product == syms[0] * syms[1]:
            return self.cov(*syms)
        if len(syms) == 1 and product == syms[0] ** 2:
            return self.cov(syms[0], syms[0])
        from .gaussian import GaussianExpectation
        us = tuple(sp.Symbol(f"u_{i + 1}", real=True) for i in range(len(syms)))
        cov = sp.ImmutableMatrix(len(syms), len(syms), lambda i, j: self.cov(syms[i], syms[j]))
        return GaussianExpectation(product.xreplace(dict(zip(syms, us))), us, cov)


def reduce_expectations(expr: sp.Expr) -> sp.Expr:
    """Replace every ``GaussianExpectation`` by its closed form where the table has one, or by
    expectations over fewer Gaussians (:func:`symntk.gaussian.reduce_node`: the policy)."""
    from .gaussian import GaussianExpectation, reduce_node
    nodes = expr.atoms(GaussianExpectation)
    if not nodes:
        return expr
    return expr.xreplace({n: reduce_node(n) for n in nodes})


# ============================================================================ rule tables
# One entry per node kind and stage, registered here as JAX registers its primitives' rules:
# FORWARD[kind](engine, node, copy) -> Z^node; COTANGENT[kind](engine, consumer, operand, copy) ->
# the consumer's term in Z^{d operand}.  A base atom carries its covariance rule within its block.

def _cov_setup(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """A bias or a readout weight: one Gaussian vector shared by every input (TP2 Eq. 18)."""
    return A.block.variance


def _cov_embedding(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """Cov(Z^{U xi}, Z^{U xi'}) = sigma_U^2 xi . xi' / d (TP2 §6.1, input layer); for tokens,
    sigma_U^2 xi^t . xi'^r / d (TP2 Eq. 14)."""
    return A.block.variance * eng.input_kernel(A.node.input, A.copy, B.copy, A.pos, B.pos)


def _cov_matmul(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """Cov(Zhat^{Wx}, Zhat^{Wy}) = sigma_W^2 E[Z^x Z^y] (TP2 Box 1; TP3 Box 1 ZHat)."""
    return A.block.variance * eng.expect(A.arg * B.arg)


def _cov_cotangent(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """Cov(Z^{M^T dy}, Z^{M^T dy'}) = sigma_M^2 E[Z^{dy} Z^{dy'}] for y = M x, M : A(n_y, n_x).

    Cotangents are normalised by their own width, dx = sqrt(n_x) df/dx (so the NTK term of M is
    sigma_M^2 E[dy dy'] E[x x'], TP2 Eq. 12): dx = sqrt(n_x / n_y) M^T dy, whose coordinates have
    variance (n_x / n_y) (sigma_M^2 / n_x) n_y E[dy^2].  The forward law of M^T would carry
    (n_y / n_x) sigma_M^2 instead (TP2 App. C); the two agree for square matrices."""
    return A.block.T.variance * eng.expect(A.arg * B.arg)


def _z_embedding(eng: Engine, node: Embedding, copy: int, pos) -> sp.Expr:
    return eng.new_atom(Atom("base", node, copy, block=node.weight, order=eng.position[node],
                             covariance=_cov_embedding, pos=pos),
                        f"Z_{eng.label(node)}_{copy}{eng.pos_tag(pos)}")


def _z_bias(eng: Engine, node: Bias, copy: int, pos) -> sp.Expr:
    return eng.new_atom(Atom("base", node, None, block=node, order=eng.position[node],
                             covariance=_cov_setup), f"Z_{eng.label(node)}")


def _cov_matmul_concat(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """W [x_1; ...; x_k] = sum_i W_i x_i with independent column blocks W_i of entries
    N(0, sigma_W^2 / N): Cov = sigma_W^2 sum_i (n_i / N) E[Z^{x_i} Z^{x'_i}] (Neural Tangents'
    FanInConcat followed by Dense: the width-weighted average of the branch kernels)."""
    fractions = A.node.vector.fractions
    return A.block.variance * sp.Add(*[w * eng.expect(a * b)
                                       for w, a, b in zip(fractions, A.arg, B.arg)])


def _cov_cotangent_part(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """dx_i = sqrt(n_i) df/dx_i = sqrt(n_i / n_y) W_i^T dy for y = W [x_1; ...]: coordinates of
    variance (n_i / n_y)(sigma_W^2 / N) n_y E[dy^2] = sigma_W^2 (n_i / N) E[dy^2]."""
    return A.block.variance * eng.expect(A.arg * B.arg)


def _cov_matmul_dropout(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """W (m x / keep): Cov = sigma_W^2 E[m_i m_j] / keep^2 E[Z^x_i Z^x_j] (:func:`_same_example`)."""
    return A.block.variance * _same_example(eng, A, B, A.node.vector.keep) * \
        eng.expect(A.arg * B.arg)


def _cov_cotangent_dropout(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """dx = (m / keep) sqrt(n_x / n_y) W^T dy: sigma_W^2 E[dy dy'] times the mask factor."""
    return A.block.block.variance * _same_example(eng, A, B, A.block.keep) * \
        eng.expect(A.arg * B.arg)


def _cov_readout_dropout(eng: Engine, A: Atom, B: Atom) -> sp.Expr:
    """dx = (m / keep) v for f = v . (m x / keep) / sqrt(n): sigma_v^2 times the mask factor."""
    return A.block.variance * _same_example(eng, A, B, A.block.keep)


def _z_matmul(eng: Engine, node: MatMul, copy: int, pos) -> sp.Expr:
    tag = eng.pos_tag(pos)
    if isinstance(node.vector, Dropout):
        arg = eng.z(node.vector.vector, copy, pos)
        return eng.with_zdot(eng.new_atom(
            Atom("base", node, copy, block=node.matrix, arg=arg, order=eng.position[node],
                 covariance=_cov_matmul_dropout, pos=pos), f"Zhat_{eng.label(node)}_{copy}{tag}"),
            f"Z_{eng.label(node)}_{copy}{tag}")
    if isinstance(node.vector, Concat):
        arg = sp.Tuple(*[eng.z(v, copy, pos) for v in node.vector.vectors])
        return eng.with_zdot(eng.new_atom(
            Atom("base", node, copy, block=node.matrix, arg=arg, order=eng.position[node],
                 covariance=_cov_matmul_concat, pos=pos), f"Zhat_{eng.label(node)}_{copy}{tag}"),
            f"Z_{eng.label(node)}_{copy}{tag}")
    arg = eng.z(node.vector, copy, pos)
    hat = eng.new_atom(Atom("base", node, copy, block=node.matrix, arg=arg,
                            order=eng.position[node], covariance=_cov_matmul, pos=pos),
                       f"Zhat_{eng.label(node)}_{copy}{tag}")
    return eng.with_zdot(hat, f"Z_{eng.label(node)}_{copy}{tag}")


def _z_nonlin(eng: Engine, node: Nonlin, copy: int, pos) -> sp.Expr:
    definition = node.phi(*[eng.z(a, copy, pos) for a in node.inputs])
    kind = "lincomb" if eng.is_lincomb(definition) else "opaque"
    return eng.new_atom(Atom(kind, node, copy, order=eng.position[node], pos=pos),
                        f"Z_{eng.label(node)}_{copy}{eng.pos_tag(pos)}", definition)


def _z_scan(eng: Engine, node: Scan, copy: int, pos) -> sp.Expr:
    """s^t is the body at t; at any other position (t - 1, T) a never-expanded atom."""
    if eng.generic(pos):
        return eng.z(node.body, copy, pos)
    if node.init is not None:
        raise NotImplementedError(
            f"Scan {node.label()!r} starts from a nonzero state: only the zero initial state "
            "s^0 = 0 is derived as a recursion over positions so far")
    return eng.lazy_atom(("fwd", node, copy, pos),
                         Atom("opaque", node, copy, order=eng.position[node], pos=pos),
                         f"Z_{eng.label(node)}_{copy}{eng.pos_tag(pos)}")


def _z_shifted_state(eng: Engine, node: Node, copy: int, pos) -> sp.Expr:
    """A coupled state (the LSTM cell c^{t-1}) away from the generic position: never expanded."""
    return eng.lazy_atom(("fwd", node, copy, pos),
                         Atom("opaque", node, copy, order=eng.position[node], pos=pos),
                         f"Z_{eng.label(node)}_{copy}{eng.pos_tag(pos)}")


def _z_pool(eng: Engine, node: Pool, copy: int, pos) -> sp.Expr:
    """x^T (last) or (1/T) sum_t x^t (mean), a position-free vector."""
    L = eng.length(copy)
    if node.how not in ("last", "mean"):
        raise NotImplementedError(f"Pool(x, {node.how!r}) of a sequence: use 'mean' or 'last' "
                                  "('sum' and 'flatten' are derived over graph nodes and pixels)")
    if node.how == "last":
        return eng.z(node.vector, copy, L)
    i = POSITION_INDEX[copy]
    return eng.new_atom(Atom("opaque", node, copy, order=eng.position[node]),
                        f"Z_{eng.label(node)}_{copy}",
                        sp.Sum(eng.z(node.vector, copy, i), (i, 1, L)) / L)


def _concat_forward(eng: Engine, node: Node, copy: int, pos):
    raise TypeError(f"{node.label()!r} (a concatenation or a dropout) has no Z of its own: only "
                    "a matmul or a readout reads it")


FORWARD: dict[type, Callable] = {
    Embedding: _z_embedding,
    Bias: _z_bias,
    MatMul: _z_matmul,
    Nonlin: _z_nonlin,
    Moment: lambda eng, node, copy, pos: eng.moment(node, copy),
    Scan: _z_scan,
    # the carry at t is the state at t - 1 (zero before the first position)
    Carry: lambda eng, node, copy, pos: eng.z(eng.state_of[node], copy, pos - 1),
    Pool: _z_pool,
    Concat: _concat_forward,
    Dropout: _concat_forward,
}


def _dz_nonlin(eng: Engine, c: Nonlin, node: Node, copy: int, pos) -> sp.Expr:
    """y = phi(..x..): dx += d_x phi(Z) Z^{dy}."""
    return eng.chain_factor(c, c.phi, node, copy, pos) * eng.dz(c, copy, pos)


def _dz_moment(eng: Engine, c: Moment, node: Node, copy: int, pos) -> sp.Expr:
    """theta = (1/n) sum psi(x): sqrt(n) df/dx_alpha through theta is c_theta psi'(Z^x)
    (NETSOR+ backprop, TP2 App. D)."""
    return eng.moment_cotangent(c, copy) * eng.chain_factor(c, c.psi, node, copy)


def _dz_pool(eng: Engine, c: Pool, node: Node, copy: int, pos) -> sp.Expr:
    """p = (1/T) sum_t x^t: dx^t = dp / T; p = x^T: dx^t = [t = T] dp (AvgPool / LastState
    readouts, TP2 App. E.2)."""
    L = eng.length(copy)
    weight = 1 / L if c.how == "mean" else sp.KroneckerDelta(pos, L)
    return weight * eng.dz(c, copy)


def _dz_concat(eng: Engine, c: Concat, node: Node, copy: int, pos) -> sp.Expr:
    """x_i is the slice of [x_1; ...; x_k] on its coordinates: dx_i is the cotangent of the
    concatenation restricted there, through each reader (W^T dy or the readout weight) a
    Gaussian of its own block (:class:`Part`), independent across branches."""
    out = sp.Integer(0)
    for i, branch in enumerate(c.vectors):
        if branch != node:
            continue
        for use in eng.consumers[c]:
            if isinstance(use, MatMul):
                out += eng.transpose_atom(use, copy, pos, part=i)
            elif isinstance(use, Readout):
                out += eng.readout_atom(use, part=i)
            else:
                raise TypeError(f"{use.label()!r} reads the concatenation {c.label()!r}")
    return out


def _dz_dropout(eng: Engine, c: Dropout, node: Node, copy: int, pos) -> sp.Expr:
    """y = m x / keep: dx = (m / keep) dy, through each reader a Gaussian given the masks."""
    out = sp.Integer(0)
    for use in eng.consumers[c]:
        if not isinstance(use, (MatMul, Readout)):
            raise TypeError(f"{use.label()!r} reads the dropout {c.label()!r}")
        out += eng.dropout_atom(c, use, copy)
    return out


def _dz_vector_readout(eng: Engine, c: VectorReadout, node: Node, copy: int, pos) -> sp.Expr:
    """f = u . h / sqrt(n): dh gets Z^u and du gets Z^h."""
    out = sp.Integer(0)
    if node == c.vector:
        out += eng.z(c.weight, copy)
    if node == c.weight:
        out += eng.z(c.vector, copy)
    return out


COTANGENT: dict[type, Callable] = {
    Nonlin: _dz_nonlin,
    Moment: _dz_moment,
    # y = M x: Z^{M^T dy}, in the block of M^T (a fresh matrix under GIA, TP2 Heuristic 4.1).
    MatMul: lambda eng, c, node, copy, pos: eng.transpose_atom(c, copy, pos),
    # f = v . h / sqrt(n): dh = v, the readout weight's own Gaussian.
    Readout: lambda eng, c, node, copy, pos: eng.readout_atom(c),
    VectorReadout: _dz_vector_readout,
    # f = sum_alpha h_alpha / sqrt(n): dh = 1.
    FixedReadout: lambda eng, c, node, copy, pos: sp.Integer(1),
    Pool: _dz_pool,
    Concat: _dz_concat,
    Dropout: _dz_dropout,
    # the state s^t is the value of the Scan's body at t
    Scan: lambda eng, c, node, copy, pos: eng.dz(c, copy, pos),
    # s^t is read at t + 1 through the carry (TP2 Eq. 15: ds^{t-1} = W^T dg^t); nothing after T
    Carry: lambda eng, c, node, copy, pos: eng.dz(c, copy, pos + 1),
}
