"""Finite-width ground truth: sample a program at width n, run it, backpropagate, form the empirical NTK.

This module is the *independent referee* of the derivation engine (design §4-5): it reads the
program, never the derivation, and evaluates it with real Gaussian matrices.

* :func:`sample` draws every parameter with the program's forward law (theory §1.4): a weight
  ``W : A(fan_out, fan_in)`` has iid N(0, variance / fan_in) entries, a bias and the readout vector v
  have iid N(0, variance) entries (the readout "matrix" V = v^T / sqrt(n) therefore has entries
  N(0, variance / n) and is stored like any weight).
* Reverse mode runs over the unrolled program, batched over the N inputs (every vector is an
  (N, dim) array).  It is *exact*: the same matrix W is used in the forward pass and, as W^T, in
  backprop; a weight used several times (tying, W and W^T in the forward pass) accumulates.  No
  gradient-independence assumption (GIA, theory §3.3) is made anywhere.
* :func:`empirical_ntk` forms Theta(xi, xi') = sum_params <d f(xi)/d theta, d f(xi')/d theta> in the
  structured form of TP2 Eq. (10)-(12) (theory §3.1) without per-example Jacobians, or, with
  ``method="jacobian"``, by materialising the per-example Jacobian (the test oracle).
* :func:`monte_carlo` averages the empirical NTK and NNGP over seeds.

Parametrization (theory §1.5) changes only which variable is trained.  Writing the forward-law
parameter as W = s * omega with omega trained, d f / d omega = s * d f / d W, so every NTK term is
``s^2 * <dF/dW, dF'/dW>`` with the raw gradient dF/dW.  The factor s^2 is (:func:`ntk_factor`):

===================  ============================  ===================
parametrization      weight / readout (fan_in m)   bias / output bias
===================  ============================  ===================
``"ntk"`` (Jacot)    variance / m                  variance
``"tp"``             1 / m                         1
``"standard"``       1                             1
===================  ============================  ===================
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import sympy as sp

from .program import (PARAMETRIZATIONS, Bias, Carry, Embedding, FixedReadout, Input, MatMul, Moment,
                      Node, Nonlin, OutputBias, Program, Readout, Transpose, Weight)
from .binding import by_name as _by_name, subs_by_name as _subs
from .numeric import lambdify

__all__ = ["FiniteNetwork", "EmpiricalNTK", "MonteCarloKernel", "sample", "empirical_ntk",
           "monte_carlo", "ntk_factor"]

Param = Weight | Bias | OutputBias


# ----------------------------------------------------------------------------- binding numbers
def _unroll(program: Program) -> Program:
    """The loop-free program (``Program.unrolled``); the simulator runs straight-line graphs only."""
    if not isinstance(program, Program):
        raise TypeError(f"expected a symntk Program, got {type(program).__name__}")
    unrolled = program.unrolled()
    if unrolled.repeats:
        raise ValueError(f"program {program.name!r} still has Repeat nodes after unrolling "
                         f"({[r.label() for r in unrolled.repeats]}); nested loops are not supported")
    return unrolled


def _dim_exprs(program: Program) -> Iterator[sp.Expr]:
    for node in program.nodes:
        if isinstance(node, Weight):
            yield node.fan_out
            yield node.fan_in
        elif isinstance(node, (Bias, Carry)):
            yield node.dim


def _positive_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _bind(program: Program, width, input_dim, values) -> dict[sp.Symbol, sp.Expr]:
    """Map every free symbol of the program's dimensions, variances and nonlinearities to a number.

    Width symbols take ``width`` (an int for all of them, or a dict symbol-or-name -> int); input
    dimension symbols take ``input_dim`` (an int, or a dict input-name -> int) or an entry of the
    ``width`` dict; any other symbol (sigma_w, a Nonlin parameter, ...) comes from ``values``.
    """
    input_syms = {s for inp in program.inputs for s in inp.dim.free_symbols}
    dim_syms = set().union(*(e.free_symbols for e in _dim_exprs(program))) - input_syms
    binding: dict[sp.Symbol, sp.Expr] = {}

    widths = _by_name(width, "width") if isinstance(width, Mapping) else None
    if widths is None:
        w = _positive_int(width, "width")
        binding.update({s: sp.Integer(w) for s in dim_syms})
    else:
        for s in dim_syms | input_syms:
            if s.name in widths:
                binding[s] = sp.Integer(_positive_int(widths[s.name], f"width of {s.name}"))
        missing = sorted(s.name for s in dim_syms if s not in binding)
        if missing:
            raise ValueError(f"no width given for the width symbol(s) {missing} "
                             f"(the width dict has {sorted(widths)})")

    for inp in program.inputs:
        if inp.dim.is_Integer:
            continue
        if isinstance(input_dim, Mapping):
            given = input_dim.get(inp.name)
        else:
            given = input_dim
        if given is not None:
            sym = inp.dim
            if not isinstance(sym, sp.Symbol):
                raise ValueError(f"input {inp.name!r} has dimension {inp.dim}; give its symbols "
                                 "in the width dict instead of input_dim")
            d = _positive_int(given, f"input_dim of {inp.name!r}")
            if sym in binding and binding[sym] != d:
                raise ValueError(f"input dimension {sym} bound to {binding[sym]} and {d}")
            binding[sym] = sp.Integer(d)
        elif not inp.dim.free_symbols <= set(binding):
            raise ValueError(
                f"input {inp.name!r} has symbolic dimension {inp.dim}: pass input_dim=... to sample() "
                "(empirical_ntk and monte_carlo infer it from the data)")

    for key, value in _by_name(values or {}, "values").items():
        binding[sp.Symbol(key)] = sp.sympify(value)
    return binding


def _number(expr: sp.Expr, binding, what: str) -> float:
    value = _subs(sp.sympify(expr), binding)
    if value.free_symbols:
        raise ValueError(f"{what} = {expr} has unbound symbol(s) "
                         f"{sorted(s.name for s in value.free_symbols)}; pass values={{...}}")
    return float(value)


def _int_dim(expr: sp.Expr, binding, what: str) -> int:
    value = _number(expr, binding, what)
    if not (value.is_integer() and value >= 1):
        raise ValueError(f"{what} = {expr} evaluates to {value}, not a positive integer")
    return int(value)


def _param_label(node: Param) -> str:
    return node.name if isinstance(node, OutputBias) else node.label()


# ----------------------------------------------------------------------------- nonlinearities
def _numeric_function(expr: sp.Expr, variables: tuple[sp.Symbol, ...], what: str) -> Callable:
    """``expr`` as a vectorised numpy function of ``variables``.

    DiracDelta is replaced by 0: at finite width a kink is hit with probability 0, so the almost-
    everywhere derivative is what reverse mode (and any autograd) computes.
    """
    expr = expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)
    bad = expr.atoms(sp.Derivative, sp.Subs, sp.Integral)
    if bad:
        raise ValueError(f"{what}: cannot evaluate {sorted(map(str, bad))} numerically")
    return lambdify(variables, expr, scipy=True)


@functools.lru_cache(maxsize=512)
def _compile_nonlin(phi: sp.Lambda, binding: tuple[tuple[str, sp.Expr], ...]):
    """phi and its partial derivatives d phi / d x_i as numpy functions (cached per Lambda).

    The Lambda's variables are replaced by fresh *real* dummies before ``sympy.diff``, so that
    Abs, Max, sign differentiate to sign / Heaviside rather than to complex-valued forms.
    """
    real = tuple(sp.Dummy(f"x{i}", real=True) for i in range(len(phi.variables)))
    expr = phi.expr.xreplace(dict(zip(phi.variables, real)))
    expr = _subs(expr, dict((sp.Symbol(k), v) for k, v in binding))
    stray = expr.free_symbols - set(real)
    if stray:
        raise ValueError(f"nonlinearity {phi.expr} has unbound parameter(s) "
                         f"{sorted(s.name for s in stray)}; pass values={{...}}")
    f = _numeric_function(expr, real, f"nonlinearity {phi.expr}")
    df = tuple(_numeric_function(sp.diff(expr, x), real, f"derivative of {phi.expr}") for x in real)
    return f, df


def _as_vector(value, shape) -> np.ndarray:
    """lambdify returns a scalar for constant expressions (e.g. the derivative of a sum)."""
    return np.broadcast_to(np.asarray(value, dtype=np.float64), shape)


# ----------------------------------------------------------------------------- parametrization
def ntk_factor(param: Param, parametrization: str, variance: float, fan_in: int) -> float:
    """s^2 in NTK term = s^2 <dF/dW, dF'/dW>, where W = s * omega and omega is trained (theory §1.5).

    ``fan_in`` is ignored for biases and the output bias.
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; expected one of {PARAMETRIZATIONS}")
    if isinstance(param, Weight):
        return {"ntk": variance / fan_in, "tp": 1.0 / fan_in, "standard": 1.0}[parametrization]
    return {"ntk": variance, "tp": 1.0, "standard": 1.0}[parametrization]


# ----------------------------------------------------------------------------- forward rules
# One rule per node kind, as in a JAX interpreter: rule(net, node, env, n_examples) -> (N, dim).
def _fwd_input(net, node: Input, env, n):
    return env[node]  # placed in env by _check_inputs


def _fwd_embedding(net, node: Embedding, env, n):
    return env[node.input] @ net._params[node.weight].T  # (U xi)^T = xi^T U^T, batched over rows


def _fwd_matmul(net, node: MatMul, env, n):
    W = net._params[node.weight]
    # rows are examples: (W h)^T = h^T W^T, and (W^T h)^T = h^T W
    return env[node.vector] @ (W if node.transposed else W.T)


def _fwd_bias(net, node: Bias, env, n):
    return np.broadcast_to(net._params[node], (n, net.dim(node)))  # the same vector for every input


def _fwd_nonlin(net, node: Nonlin, env, n):
    f, _ = net._nonlin(node)
    return _as_vector(f(*(env[a] for a in node.inputs)), (n, net.dim(node)))


def _fwd_moment(net, node: Moment, env, n):
    # theta = (1/n) sum_alpha psi(h_alpha), one scalar per example, kept as an (N, 1) column so it
    # broadcasts into the Nonlins that take it as a parameter (NETSOR+, theory §1.3).
    f, _ = net._moment(node)
    d = next(net.dim(a) for a in node.inputs)
    return _as_vector(f(*(env[a] for a in node.inputs)), (n, d)).mean(axis=1, keepdims=True)


_FORWARD = {Input: _fwd_input, Embedding: _fwd_embedding, MatMul: _fwd_matmul, Bias: _fwd_bias,
            Nonlin: _fwd_nonlin, Moment: _fwd_moment}


# ----------------------------------------------------------------------------- backward rules
# rule(net, node, cotangent G (N, dim), env, tape) accumulates cotangents of the node's arguments
# (tape.add) and records the parameter gradients (tape.use / tape.bias).
def _bwd_input(net, node, G, env, tape):
    pass  # the input is data, not a parameter


def _bwd_embedding(net, node: Embedding, G, env, tape):
    # y = U xi: dF/dU = g xi^T, an outer product (out-space g, in-space xi)
    tape.use(node.weight, G, env[node.input])


def _bwd_matmul(net, node: MatMul, G, env, tape):
    W, z = net._params[node.weight], env[node.vector]
    if node.transposed:
        # y = W^T z: dz += W g, and dF/dW = z g^T (z lives in W's out-space, g in its in-space)
        tape.add(node.vector, G @ W.T)
        tape.use(node.weight, z, G)
    else:
        # y = W z: dz += W^T g, and dF/dW = g z^T
        tape.add(node.vector, G @ W)
        tape.use(node.weight, G, z)


def _bwd_bias(net, node: Bias, G, env, tape):
    tape.bias(node, G)  # the cotangent of the bias node already sums every use


def _bwd_nonlin(net, node: Nonlin, G, env, tape):
    _, df = net._nonlin(node)
    args = [env[a] for a in node.inputs]
    for a, d in zip(node.inputs, df):
        g = G * _as_vector(d(*args), G.shape)
        # a Moment argument is one scalar per example: dF/dtheta sums over coordinates
        tape.add(a, g.sum(axis=1, keepdims=True) if isinstance(a, Moment) else g)


def _bwd_moment(net, node: Moment, G, env, tape):
    # theta = (1/n) sum_alpha psi(h_alpha): dF/dh_alpha += dF/dtheta * psi'(h_alpha) / n
    _, dpsi = net._moment(node)
    args = [env[a] for a in node.inputs]
    d = next(net.dim(a) for a in node.inputs)
    for a, dp in zip(node.inputs, dpsi):
        tape.add(a, G * _as_vector(dp(*args), (G.shape[0], d)) / d)


_BACKWARD = {Input: _bwd_input, Embedding: _bwd_embedding, MatMul: _bwd_matmul, Bias: _bwd_bias,
             Nonlin: _bwd_nonlin, Moment: _bwd_moment}


class _Tape:
    """Reverse-mode state for one batch: cotangents of vectors and the raw parameter gradients.

    A weight's per-example gradient is kept *factored*, as a list of uses (A, B) with
    dF/dW = sum_uses A[i] outer B[i] (A in W's out-space, B in its in-space), so the NTK can be
    contracted without ever forming an (N, fan_out, fan_in) array.
    """

    def __init__(self, params):
        self.cot: dict[Node, np.ndarray] = {}
        self.uses: dict[Param, list[tuple[np.ndarray, np.ndarray]]] = {p: [] for p in params
                                                                        if isinstance(p, Weight)}
        self.biases: dict[Param, np.ndarray | None] = {p: None for p in params
                                                       if not isinstance(p, Weight)}

    def add(self, node, g):
        prev = self.cot.get(node)
        self.cot[node] = g if prev is None else prev + g  # never in place: g may be a view

    def use(self, weight, a, b):
        self.uses[weight].append((a, b))

    def bias(self, node, g):
        prev = self.biases[node]
        self.biases[node] = g if prev is None else prev + g


@dataclass
class _Pass:
    """Outputs and factored raw gradients of one batch (the result of forward + reverse mode)."""
    outputs: np.ndarray
    uses: dict
    biases: dict
    n: int


# ----------------------------------------------------------------------------- the network
class FiniteNetwork:
    """A program with every width bound to an integer and every parameter drawn (theory §1.4).

    ``net(X)`` evaluates the network; ``net.gradients(X)`` gives per-example raw gradients;
    ``net.ntk(X1, X2)`` the empirical NTK.  Parameters are exposed by label (``"W[2]"``, ``"b1"``,
    ``"v"``, ``"b_out"``) through :attr:`parameters`.
    """

    def __init__(self, program: Program, params: dict, binding: dict, parametrization=None,
                 seed=None, source: Program | None = None):
        self.program = program
        self._dim_names = {s.name for inp in program.inputs for s in inp.dim.free_symbols} | {
            s.name for e in _dim_exprs(program) for s in e.free_symbols}
        self.source = source if source is not None else program
        self._params = params
        self._binding = binding
        self.parametrization = parametrization
        self.seed = seed
        self._dims: dict[Node, int] = {}
        self._labels = {_param_label(p): p for p in params}

    # -- structure -------------------------------------------------------------------------
    @property
    def dims(self) -> dict[str, int]:
        """The integer bound to each dimension symbol (widths and input dimensions)."""
        return {s.name: int(v) for s, v in self._binding.items() if s.name in self._dim_names}

    @property
    def parameters(self) -> dict[str, np.ndarray]:
        """Label -> a read-only view of the forward-law parameter (W, b, V = v^T/sqrt(n), b_out)."""
        out = {}
        for label, p in self._labels.items():
            view = self._params[p].view()
            view.flags.writeable = False
            out[label] = view
        return out

    @property
    def readout_is_zero_mean(self) -> bool:
        """True for a trained Readout (zero-mean v): then E f f'^T is the NNGP (theory §2.3)."""
        out = self.program.output
        return isinstance(out, Readout) and out.trained

    def dim(self, node) -> int:
        d = self._dims.get(node)
        if d is None:
            d = self._dims[node] = _int_dim(node.dim, self._binding, f"dimension of {node.label()}")
        return d

    def _nonlin(self, node: Nonlin):
        return self._compiled(node.phi)

    def _moment(self, node: Moment):
        return self._compiled(node.psi)

    def _compiled(self, lam):
        free = tuple(sorted((s.name, v) for s, v in self._binding.items()
                            if s.name in {f.name for f in lam.expr.free_symbols}))
        return _compile_nonlin(lam, free)

    def with_parameters(self, updates: Mapping[str, np.ndarray]) -> "FiniteNetwork":
        """A copy with some parameters replaced (by label); used e.g. for finite differences."""
        params = dict(self._params)
        for label, value in updates.items():
            if label not in self._labels:
                raise KeyError(f"no parameter {label!r}; parameters are {sorted(self._labels)}")
            p = self._labels[label]
            value = np.asarray(value, dtype=np.float64)
            if value.shape != params[p].shape:
                raise ValueError(f"parameter {label!r} has shape {params[p].shape}, got {value.shape}")
            params[p] = value
        return FiniteNetwork(self.program, params, self._binding, self.parametrization, self.seed,
                             self.source)

    def factor(self, label: str, parametrization=None) -> float:
        """The NTK factor s^2 of one parameter (see :func:`ntk_factor`)."""
        p = self._labels[label]
        return ntk_factor(p, self._parametrization_of(p, parametrization), self._variance(p),
                          self._fan_in(p))

    def _variance(self, p: Param) -> float:
        return _number(p.variance, self._binding, f"variance of {_param_label(p)}")

    def _fan_in(self, p: Param) -> int:
        return self._params[p].shape[1] if isinstance(p, Weight) else 1

    def _parametrization_of(self, p: Param, override) -> str:
        for choice in (override, self.parametrization):
            if isinstance(choice, str):
                return choice
            if isinstance(choice, Mapping) and _param_label(p) in choice:
                return choice[_param_label(p)]
        return p.parametrization

    # -- evaluation ------------------------------------------------------------------------
    def _check_inputs(self, X) -> tuple[dict, int]:
        inputs = self.program.inputs
        if not isinstance(X, Mapping):
            if len(inputs) != 1:
                raise ValueError(f"the program has {len(inputs)} inputs {[i.name for i in inputs]}; "
                                 "pass a dict input-name -> array")
            X = {inputs[0].name: X}
        names = {i.name for i in inputs}
        if set(X) != names:
            raise ValueError(f"inputs given for {sorted(X)} but the program's inputs are {sorted(names)}")
        env, n = {}, None
        for inp in inputs:
            x = np.asarray(X[inp.name])
            d = self.dim(inp)
            if x.dtype.kind not in "biuf":
                raise ValueError(f"input {inp.name!r} must be a real array, got dtype {x.dtype}")
            if x.ndim != 2:
                raise ValueError(f"input {inp.name!r} must have shape (N, {d}), got shape {x.shape}"
                                 + (" (use x[None, :] for a single example)" if x.ndim == 1 else ""))
            if x.shape[1] != d:
                raise ValueError(f"input {inp.name!r} must have shape (N, {d}), got shape {x.shape}: "
                                 f"the network was sampled with input dimension {d}")
            if x.shape[0] == 0:
                raise ValueError(f"input {inp.name!r} has no examples (shape {x.shape})")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"input {inp.name!r} contains NaN or infinite entries")
            if n is not None and x.shape[0] != n:
                raise ValueError(f"inputs have different numbers of examples ({n} and {x.shape[0]})")
            n = x.shape[0]
            env[inp] = x.astype(np.float64, copy=False)
        return env, n

    def _forward(self, X) -> tuple[np.ndarray, dict, int]:
        env, n = self._check_inputs(X)
        for node in self.program.nodes:
            rule = _FORWARD.get(type(node))
            if rule is not None and node not in env:
                env[node] = rule(self, node, env, n)
            elif rule is None and not isinstance(node, (Weight, Transpose, OutputBias, Readout,
                                                        FixedReadout)):
                raise TypeError(f"the finite-width simulator has no rule for {type(node).__name__}")
        out = self.program.output
        h = env[out.vector]
        if isinstance(out, Readout) and out.trained:
            f = h @ self._params[out.weight][0]  # V = v^T / sqrt(n) is stored as a (1, n) matrix
            if out.bias is not None:
                f = f + self._params[out.bias]
        elif isinstance(out, Readout):
            # the readout vector u is computed by the network: f = u . h / sqrt(n)
            f = (env[out.weight] * h).sum(axis=1) / np.sqrt(h.shape[1])
            if out.bias is not None:
                f = f + self._params[out.bias]
        else:
            f = h.sum(axis=1) / np.sqrt(h.shape[1])  # f = sum_alpha h_alpha / sqrt(n)
        return f, env, n

    def __call__(self, X) -> np.ndarray:
        """The outputs f(X), shape (N,)."""
        return self._forward(X)[0]

    forward = __call__

    def _backward(self, X) -> _Pass:
        """Forward pass, then one reverse sweep in reverse topological order (theory §3.2)."""
        f, env, n = self._forward(X)
        tape = _Tape(self._params)
        out = self.program.output
        h = out.vector
        if isinstance(out, Readout) and out.trained:
            V = self._params[out.weight]
            ones = np.ones((n, 1))
            tape.add(h, ones @ V)            # df/dh = V
            tape.use(out.weight, ones, env[h])  # f = V h: dF/dV = 1 outer h
            if out.bias is not None:
                tape.bias(out.bias, ones)
        elif isinstance(out, Readout):
            root = np.sqrt(self.dim(h))
            tape.add(h, env[out.weight] / root)   # f = u . h / sqrt(n)
            tape.add(out.weight, env[h] / root)
            if out.bias is not None:
                tape.bias(out.bias, np.ones((n, 1)))
        else:
            d = self.dim(h)
            tape.add(h, np.full((n, d), 1.0 / np.sqrt(d)))
        for node in reversed(self.program.nodes):
            G = tape.cot.get(node)
            if G is not None:
                _BACKWARD[type(node)](self, node, G, env, tape)
        biases = {p: (g if g is not None else np.zeros((n, self._params[p].size)))
                  for p, g in tape.biases.items()}
        return _Pass(f, tape.uses, biases, n)

    def gradients(self, X) -> dict[str, np.ndarray]:
        """Per-example raw gradients dF(x_i)/dP for every parameter P (label -> (N, *P.shape)).

        Materialised from the factored uses: dF/dW = sum_uses A[i] outer B[i].  Memory is
        N * (#parameters) floats: meant for tests and small networks.
        """
        return {_param_label(p): g for p, g in self._jacobian_blocks(self._backward(X), scale=None)}

    def _jacobian_blocks(self, tape: _Pass, scale) -> Iterator[tuple[Param, np.ndarray]]:
        """(param, per-example gradient) one parameter at a time (so memory peaks at one block)."""
        for p in self._params:
            s = 1.0 if scale is None else np.sqrt(scale(p))
            shape = (tape.n,) + self._params[p].shape
            if not isinstance(p, Weight):
                yield p, s * np.asarray(tape.biases[p], dtype=np.float64).reshape(shape)
                continue
            uses = tape.uses[p]
            g = np.empty(shape) if uses else np.zeros(shape)
            # Scale the small factor, write the first outer product straight into g and add later
            # uses in chunks of examples: peak memory stays one block plus <= 256 MB.
            chunk = max(1, 2 ** 25 // max(1, shape[1] * shape[2]))
            for k, (a, b) in enumerate(uses):
                a = a * s
                if k == 0:
                    np.multiply(a[:, :, None], b[:, None, :], out=g)
                    continue
                for i in range(0, tape.n, chunk):
                    g[i:i + chunk] += a[i:i + chunk, :, None] * b[i:i + chunk, None, :]
            yield p, g
            del g  # release this block before the next one is allocated

    def ntk(self, X1, X2=None, method: str = "structured", parametrization=None) -> "EmpiricalNTK":
        """The empirical NTK of this network; see :func:`empirical_ntk`."""
        if method not in ("structured", "jacobian"):
            raise ValueError(f"method must be 'structured' or 'jacobian', got {method!r}")
        t1 = self._backward(X1)
        t2 = t1 if X2 is None else self._backward(X2)

        def factor(p):
            return ntk_factor(p, self._parametrization_of(p, parametrization), self._variance(p),
                              self._fan_in(p))

        contributions = {}
        if method == "structured":
            for p in self._params:
                if isinstance(p, Weight):
                    c = _weight_gram(t1.uses[p], t2.uses[p], symmetric=t2 is t1)
                else:
                    c = t1.biases[p] @ t2.biases[p].T
                contributions[_param_label(p)] = factor(p) * c
        else:
            blocks2 = None if t2 is t1 else self._jacobian_blocks(t2, factor)
            for p, j1 in self._jacobian_blocks(t1, factor):
                j1 = j1.reshape(t1.n, -1)
                if blocks2 is None:
                    contributions[_param_label(p)] = j1 @ j1.T  # numpy uses syrk for a @ a.T
                else:
                    _, j2 = next(blocks2)
                    contributions[_param_label(p)] = j1 @ j2.reshape(t2.n, -1).T
                    del j2
                del j1
        ntk = sum(contributions.values())
        return EmpiricalNTK(ntk=ntk, outputs1=t1.outputs, outputs2=t2.outputs,
                            contributions=contributions, dims=self.dims, seed=self.seed,
                            parametrization=parametrization or self.parametrization, method=method)

    def __repr__(self):
        return f"FiniteNetwork({self.source.name!r}, dims={self.dims}, seed={self.seed})"


def _weight_gram(uses1, uses2, symmetric: bool) -> np.ndarray:
    """sum_{k,k'} <A_k B_k^T, A'_k' B'_k'^T>_F per example pair = sum (A_k A'_k'^T) * (B_k B'_k'^T).

    (TP2 Eq. 10, theory §3.1.)  For a use y = W z the factors are (A, B) = (dy, z), giving
    (G G'^T) * (Z Z'^T); for y = W^T z they are (z, dy), so a W / W^T pair gives
    (G_k Z'_k'^T) * (Z_k G'_k'^T): <g z^T, z' g'^T>_F = sum_ij g_i z_j z'_i g'_j = (g.z')(z.g').
    With ``symmetric`` (X2 is X1) the (k', k) term is the transpose of the (k, k') term.
    """
    n1, n2 = uses1[0][0].shape[0] if uses1 else 0, uses2[0][0].shape[0] if uses2 else 0
    total = np.zeros((n1, n2))
    for k, (a1, b1) in enumerate(uses1):
        for k2, (a2, b2) in enumerate(uses2):
            if symmetric and k2 < k:
                continue
            term = (a1 @ a2.T) * (b1 @ b2.T)
            total += term if not symmetric or k2 == k else term + term.T
    return total


# ----------------------------------------------------------------------------- public verbs
def sample(program: Program, width, seed=0, parametrization=None, input_dim=None,
           values=None) -> FiniteNetwork:
    """Draw a finite network from ``program`` (theory §1.4).

    ``width``: an int bound to every width symbol, or a dict symbol-or-name -> int (it may also bind
    input dimensions).  ``input_dim``: int or dict input-name -> int, for inputs of symbolic
    dimension.  ``values``: numbers for any other symbol (variances like sigma_w^2, Nonlin
    parameters).  ``parametrization`` (None: each parameter's own) only affects the NTK.

    Every parameter is drawn from ``numpy.random.default_rng(seed)`` in program order: a weight
    W : A(fan_out, fan_in) as sqrt(variance / fan_in) * N(0, 1), a bias and the output bias as
    sqrt(variance) * N(0, 1); the readout v ~ N(0, variance) is stored as V = v^T / sqrt(n).
    """
    unrolled = _unroll(program)
    binding = _bind(unrolled, width, input_dim, values)
    if isinstance(parametrization, str) and parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; expected one of {PARAMETRIZATIONS}")
    rng = np.random.default_rng(seed)
    params = {}
    for node in unrolled.nodes:
        if isinstance(node, Weight):
            shape = (_int_dim(node.fan_out, binding, f"fan_out of {node.label()}"),
                     _int_dim(node.fan_in, binding, f"fan_in of {node.label()}"))
            var = _number(node.variance, binding, f"variance of {node.label()}")
            W = rng.standard_normal(shape)
            W *= np.sqrt(var / shape[1])
            params[node] = W
        elif isinstance(node, (Bias, OutputBias)):
            shape = (_int_dim(node.dim, binding, f"dimension of {node.label()}"),) \
                if isinstance(node, Bias) else ()
            var = _number(node.variance, binding, f"variance of {_param_label(node)}")
            params[node] = np.asarray(rng.standard_normal(shape) * np.sqrt(var))
    return FiniteNetwork(unrolled, params, binding, parametrization, seed, program)


def _infer_input_dim(program: Program, X):
    """Input dimensions from the data, for inputs whose dimension is a symbol."""
    inputs = _unroll(program).inputs
    arrays = X if isinstance(X, Mapping) else ({inputs[0].name: X} if len(inputs) == 1 else {})
    dims = {}
    for inp in inputs:
        x = arrays.get(inp.name)
        if x is not None and not inp.dim.is_Integer and np.ndim(x) == 2:
            dims[inp.name] = int(np.shape(x)[1])
    return dims or None


@dataclass(frozen=True)
class EmpiricalNTK:
    """The empirical NTK of one finite network (theory §3.1, §6.4).

    ``ntk[i, j] = sum_params contributions[label][i, j]``; ``outputs1``/``outputs2`` are f(X1), f(X2).
    """
    ntk: np.ndarray
    outputs1: np.ndarray
    outputs2: np.ndarray
    contributions: dict[str, np.ndarray]
    dims: dict[str, int]
    seed: object
    parametrization: object
    method: str


def empirical_ntk(program, X1, X2=None, width=None, seed=0, parametrization=None,
                  method: str = "structured", values=None) -> EmpiricalNTK:
    """Theta_n(x_i, x'_j) = sum_theta <dF(x_i)/d theta, dF(x'_j)/d theta> at initialization.

    ``program`` is a Program (sampled here with ``width``/``seed``) or a :class:`FiniteNetwork`.

    ``method="structured"`` contracts without per-example Jacobians (TP2 Eq. 10, theory §3.1):
    for a weight with uses y_k = W z_k, ``factor * sum_{k,k'} (G_k G'_k'^T) * (Z_k Z'_k'^T)``
    (``*`` elementwise, G_k = dF/dy_k, rows = examples); a use y = W^T z swaps the roles of G and
    Z; an embedding U xi has Z = xi; a bias gives ``factor * G_b G_b'^T`` with G_b the sum of its
    uses' gradients; the readout V gives H H'^T; the output bias 1.  ``factor`` is
    :func:`ntk_factor`.  Cost O(K^2 N1 N2 n) for K uses, memory O(N n).

    ``method="jacobian"`` materialises the per-example trained-parameter Jacobian J (one parameter
    block at a time) and returns J1 J2^T: memory O(N * #params).  It is the test oracle.
    """
    if isinstance(program, FiniteNetwork):
        net = program
    else:
        if width is None:
            raise ValueError("empirical_ntk needs width=... to sample the program")
        net = sample(program, width, seed, parametrization, _infer_input_dim(program, X1), values)
    return net.ntk(X1, X2, method=method, parametrization=parametrization)


@dataclass(frozen=True)
class MonteCarloKernel:
    """Mean and standard error over seeds of the empirical NTK and NNGP (theory §6.4).

    ``nngp_mean`` estimates E f(X1) f(X2)^T, which is the NNGP only for a zero-mean (trained)
    readout (``readout_zero_mean``); with a FixedReadout the outputs have a nonzero mean.
    """
    ntk_mean: np.ndarray
    ntk_sem: np.ndarray
    nngp_mean: np.ndarray
    nngp_sem: np.ndarray
    seeds: tuple
    dims: dict[str, int]
    readout_zero_mean: bool
    ntk_samples: np.ndarray = field(repr=False)


def monte_carlo(program: Program, X1, X2=None, width=None, n_samples: int = 10, seed: int = 0,
                parametrization=None, values=None) -> MonteCarloKernel:
    """Average the empirical NTK and the NNGP estimate f(X1) f(X2)^T over networks sampled with
    seeds ``seed, seed + 1, ..., seed + n_samples - 1`` (so any one sample can be reproduced with
    :func:`sample`).  Standard error = sample standard deviation / sqrt(n_samples)."""
    if width is None:
        raise ValueError("monte_carlo needs width=...")
    n_samples = _positive_int(n_samples, "n_samples")
    if n_samples < 2:
        raise ValueError("monte_carlo needs n_samples >= 2 to estimate a standard error")
    input_dim = _infer_input_dim(program, X1)
    ntks, nngps, zero_mean, dims = [], [], True, {}
    seeds = tuple(seed + i for i in range(n_samples))
    for s in seeds:
        net = sample(program, width, s, parametrization, input_dim, values)
        r = net.ntk(X1, X2)
        ntks.append(r.ntk)
        nngps.append(np.outer(r.outputs1, r.outputs2))
        zero_mean, dims = net.readout_is_zero_mean, net.dims
    ntks, nngps = np.asarray(ntks), np.asarray(nngps)
    root = np.sqrt(n_samples)
    return MonteCarloKernel(ntks.mean(0), ntks.std(0, ddof=1) / root, nngps.mean(0),
                            nngps.std(0, ddof=1) / root, seeds, dims, zero_mean, ntks)
