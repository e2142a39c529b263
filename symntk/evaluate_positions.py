"""NumPy reference evaluation of derivations over positions (sequences).

A positioned derivation defines kernel *families* F[t, r] (and one-index families F[t]) by one
equation each, read at shifted indices (F[t - 1, r - 1] forward, F[t + 1, r + 1] backward): the
recursion over token pairs of TP2 §6.2.1 (Eq. 14) and App. E.2.  This evaluator computes every
entry a quantity needs on demand, in dependency order, with an explicit work stack (so the
direction of each recursion never has to be declared), for all pairs of sequences at once by
broadcasting: entries of copy xi have shape (N1, 1), of xi' shape (1, N2), cross entries (N1, N2).
Positions outside 1..T hold zero: the zero state before the first token, no gradient after the last.

It is the readable reference, as :mod:`symntk.evaluate` is for one vector per example.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from .binding import bind_parameters
from .equations import Derivation
from .evaluate import _expectation_nodes, _quadrature
from .numeric import lambdify
from .result import KernelResult
from .zcalculus import LENGTH

__all__ = ["has_positions", "gram", "check_sequences"]


def has_positions(derivation: Derivation) -> bool:
    return any(inp.positions for inp in derivation.program.inputs)


def check_sequences(X, name: str, dim) -> np.ndarray:
    """Validate a batch of sequences: shape (N, T, d) with T >= 1, finite, float64."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 3:
        raise ValueError(f"{name} must be a batch of sequences of shape (N, T, d) for a program "
                         f"with a sequence input, got an array of shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} has no sequences (shape {X.shape})")
    if X.shape[1] == 0:
        raise ValueError(f"{name} has sequences of length T = 0 (shape {X.shape}); a sequence "
                         "needs at least one token")
    if X.shape[2] == 0:
        raise ValueError(f"{name} has tokens of dimension 0 (shape {X.shape})")
    if not np.all(np.isfinite(X)):
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(f"{name} contains NaN or inf (first at sequence {bad[0]}, token "
                         f"{bad[1]}, feature {bad[2]})")
    if dim is not None and sp.sympify(dim).is_Integer and X.shape[2] != int(dim):
        raise ValueError(f"{name} has tokens of dimension {X.shape[2]} but the program's input "
                         f"dimension is {dim}")
    return X


class _Entries:
    """Family entries F[i, j] computed on demand; each family's right-hand side lambdified once."""

    def __init__(self, derivation: Derivation, inputs: dict, consts: dict, lengths: dict,
                 shape: dict):
        self.d = derivation
        self.values = dict(inputs)          # (label, i, j) -> array
        self.consts = consts
        self.lengths = lengths              # copy -> length
        self.shape = shape                  # copy pattern -> broadcast shape
        self.rhs = {}
        for eq in derivation.equations:
            if isinstance(eq.lhs, sp.Indexed):
                self.rhs[eq.lhs.base.label] = (tuple(eq.lhs.indices), eq.rhs)
            else:
                self.rhs[eq.lhs] = ((), eq.rhs)
        self._compiled = {}

    def in_range(self, label, index) -> bool:
        axes = self.d.info[label].extra.get("axes", ())
        return all(1 <= i <= self.lengths[c] for i, c in zip(index, axes))

    def refs(self, expr, env):
        """(label, index) of every family entry and scalar symbol ``expr`` reads under ``env``."""
        out = []
        for ind in expr.atoms(sp.Indexed):
            out.append((ind.base.label, self.index(ind.indices, env)))
        for s in expr.free_symbols:
            if s in self.rhs and not self.rhs[s][0]:       # a position-free derived scalar
                out.append((s, ()))
        return out

    def index(self, indices, env) -> tuple:
        return tuple(_int(i, env, self.consts) for i in indices)

    def get(self, label, index):
        key = (label, *index)
        if key in self.values:
            return self.values[key]
        if index and not self.in_range(label, index):
            return 0.0
        stack = [(label, index)]
        while stack:
            lab, idx = stack[-1]
            if (lab, *idx) in self.values:
                stack.pop()
                continue
            generic, rhs = self.rhs[lab]
            env = dict(zip(generic, idx))
            missing = [(l2, i2) for l2, i2 in self._deps(rhs, env)
                       if (l2, *i2) not in self.values and (not i2 or self.in_range(l2, i2))]
            if missing:
                stack.extend(missing)
                continue
            self.values[(lab, *idx)] = self.evaluate(rhs, env)
            stack.pop()
        return self.values[key]

    def _deps(self, expr, env):
        deps = []
        for sub in _sum_free_parts(expr, env, self.consts):
            deps.extend(self.refs(sub[0], sub[1]))
        return [(l, i) for l, i in deps if (l, *i) not in self.values]

    def evaluate(self, expr, env):
        """Value of ``expr`` (sums over positions unrolled) with index values ``env``."""
        expr = sp.sympify(expr)
        if isinstance(expr, sp.Sum):
            (i, lo, hi), *rest = expr.limits
            inner = sp.Sum(expr.function, *rest) if rest else expr.function
            lo, hi = _int(lo, env, self.consts), _int(hi, env, self.consts)
            return sum((self.evaluate(inner, {**env, i: v}) for v in range(lo, hi + 1)),
                       start=0.0)
        if isinstance(expr, sp.Add) and expr.has(sp.Sum):
            return sum((self.evaluate(a, env) for a in expr.args), start=0.0)
        if isinstance(expr, sp.Mul) and expr.has(sp.Sum):
            out = 1.0
            for a in expr.args:
                out = out * self.evaluate(a, env)
            return out
        sub, known = {}, {}
        for ind in expr.atoms(sp.Indexed):
            sub[ind] = dummy = sp.Dummy()
            known[dummy] = self.get(ind.base.label, self.index(ind.indices, env))
        expr = expr.xreplace(sub)
        for s in expr.free_symbols:
            if s in self.rhs and not self.rhs[s][0]:
                known[s] = self.get(s, ())
        sub = {}
        for node in _expectation_nodes(expr):
            sub[node] = dummy = sp.Dummy()
            known[dummy] = _quadrature(node, known, self.consts, env)
        expr = expr.xreplace(sub)
        args, vals = [], []
        for s in sorted(expr.free_symbols, key=str):
            args.append(s)
            if s in known:
                vals.append(known[s])
            elif s in env:
                vals.append(env[s])
            elif s in self.consts:
                vals.append(self.consts[s])
            else:
                raise KeyError(f"symbol {s} has no value")
        return np.asarray(lambdify(args, expr, guarded=True)(*vals), dtype=np.float64)


def _int(expr, env, consts) -> int:
    """An index expression (t - 1, T, ...) at the given index values."""
    value = sp.sympify(sp.sympify(sp.sympify(expr).xreplace(env)).xreplace(consts))
    if not value.is_Integer:
        raise ValueError(f"position {expr} is not determined by {env}")
    return int(value)


def _sum_free_parts(expr, env, consts):
    """(subexpression, index values) pairs covering ``expr`` with its sums unrolled."""
    expr = sp.sympify(expr)
    if isinstance(expr, sp.Sum):
        (i, lo, hi), *rest = expr.limits
        inner = sp.Sum(expr.function, *rest) if rest else expr.function
        lo, hi = _int(lo, env, consts), _int(hi, env, consts)
        out = []
        for v in range(lo, hi + 1):
            out.extend(_sum_free_parts(inner, {**env, i: v}, consts))
        return out
    if expr.has(sp.Sum):
        out = []
        for a in expr.args:
            out.extend(_sum_free_parts(a, env, consts))
        return out
    return [(expr, env)]


def gram(derivation: Derivation, X1, X2=None, params: dict | None = None,
         diagonal: bool = False) -> KernelResult:
    """NNGP and NTK Gram matrices of sequence inputs: X1 (N1, T, d), X2 (N2, Tbar, d).

    ``X2=None`` means X2 = X1, with the diagonal k(x, x) from the derivation's diagonal system;
    ``diagonal=True`` returns only k(x, x), shape (N1,).
    """
    inputs = derivation.program.inputs
    if len(inputs) != 1:
        raise NotImplementedError("programs with several Input nodes need a dict of inputs")
    dim = inputs[0].dim
    X1 = check_sequences(X1, "X1", dim)
    diag = None
    if diagonal or X2 is None:
        r = _gram(derivation.diagonal, X1, X1[:1], params, rows_only=True)
        diag = KernelResult(None if r.nngp is None else r.nngp[:, 0], r.ntk[:, 0],
                            {k: v[:, 0] for k, v in r.ntk_terms.items()})
        if diagonal:
            return diag
    X2 = X1 if X2 is None else check_sequences(X2, "X2", dim)
    if X2.shape[2] != X1.shape[2]:
        raise ValueError(f"X1 has tokens of dimension {X1.shape[2]} but X2 of {X2.shape[2]}")
    full = _gram(derivation, X1, X2, params)
    if diag is not None:
        idx = np.diag_indices(full.ntk.shape[0])
        for K, k in [(full.ntk, diag.ntk), (full.nngp, diag.nngp)] + \
                [(full.ntk_terms[n], diag.ntk_terms[n]) for n in full.ntk_terms]:
            if K is not None:
                K[idx] = k
    for K in (full.ntk, full.nngp):
        if K is not None and not np.all(np.isfinite(K)):
            raise ValueError("the reference evaluator produced NaN/inf (a token sequence of zero "
                             "norm without biases makes a correlation 0/0)")
    return full


def _gram(derivation: Derivation, X1, X2, params, rows_only: bool = False) -> KernelResult:
    derivation = derivation.reduced()
    dim = X1.shape[2]
    lengths = {0: X1.shape[1], 1: X2.shape[1]}
    inputs = {}
    for label, info in derivation.inputs.items():
        i, j = info.copies
        A = X1 if i == 0 else X2
        B = X1 if j == 0 else X2
        for p in range(A.shape[1]):
            for q in range(B.shape[1]):
                if i == j == 0:
                    v = (np.einsum("nd,nd->n", A[:, p], A[:, q]) / dim)[:, None]
                elif i == j == 1:
                    v = (np.einsum("nd,nd->n", B[:, p], B[:, q]) / dim)[None, :]
                else:
                    v = A[:, p] @ B[:, q].T / dim
                inputs[(label, p + 1, q + 1)] = v
    consts = bind_parameters(derivation, params, dim)
    consts.update({LENGTH[0]: sp.Integer(lengths[0]), LENGTH[1]: sp.Integer(lengths[1])})
    entries = _Entries(derivation, inputs, consts, lengths, {})
    shape = (X1.shape[0], 1 if rows_only else X2.shape[0])

    def value(expr):
        return np.broadcast_to(entries.evaluate(expr, {}), shape).copy()

    terms = {k: value(v) for k, v in derivation.ntk_terms.items()}
    ntk = value(derivation.ntk)
    nngp = None if derivation.nngp is None else value(derivation.nngp)
    return KernelResult(nngp, ntk, terms)
