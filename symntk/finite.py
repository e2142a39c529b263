"""Finite-width ground truth: sample a program at width n, run it, backpropagate, form the empirical NTK.

This module is the *independent referee* of the derivation engine: it reads the
program, never the derivation, and evaluates it with real Gaussian matrices.

* :func:`sample` draws every parameter with the program's forward law (TP2 Setup A.5): a weight
  ``W : A(fan_out, fan_in)`` has iid N(0, variance / fan_in) entries, a bias and the readout vector v
  have iid N(0, variance) entries (the readout "matrix" V = v^T / sqrt(n) therefore has entries
  N(0, variance / n) and is stored like any weight).
* Reverse mode runs over the unrolled program, batched over the N inputs (every vector is an
  (N, dim) array).  It is *exact*: the same matrix W is used in the forward pass and, as W^T, in
  backprop; a weight used several times (tying, W and W^T in the forward pass) accumulates.  No
  gradient-independence assumption (GIA, TP2 Heuristic 4.1) is made anywhere.
* :func:`empirical_ntk` forms Theta(xi, xi') = sum_params <d f(xi)/d theta, d f(xi')/d theta> in the
  structured form of TP2 Eqs. (10)-(12) without per-example Jacobians, or, with
  ``method="jacobian"``, by materialising the per-example Jacobian (the test oracle).
* :func:`monte_carlo` averages the empirical NTK and NNGP over seeds.
* Sequences (inputs with positions, data (N, T, d); T may differ between X1 and X2): positioned
  vectors are (N, T, dim) arrays, position-free ones (a Bias) broadcast over t; a ``Scan`` runs its
  carry-dependent body position by position and backpropagates through time, ``Pool`` reduces t.
  A weight shared over t keeps one factored use with a position axis, dF/dW = sum_t A^t B^t^T,
  and the NTK contracts sum_{t,r} (A^t . A'^r)(B^t . B'^r) (TP2 §6.2.1, App. E.2).

Parametrization (TP2 §4; Jacot et al. 2018) changes only which variable is trained.  Writing the
forward-law parameter as W = s * omega with omega trained, d f / d omega = s * d f / d W, so every
NTK term is ``s^2 * <dF/dW, dF'/dW>`` with the raw gradient dF/dW.  The factor s^2 is
(:func:`ntk_factor`):

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

from .activations import partial_derivative
from .parametrization import bias_factor, raw_weight_factor
from .program import (PARAMETRIZATIONS, AvgPool, Bias, Carry, Concat, Conv, Dropout, Embedding,
                      FixedReadout, Aggregate,
                      Input, MatMul, Moment, Node, Nonlin, OutputBias, Pool, Program, Readout,
                      READOUTS, Scan, Transpose, VectorReadout, Weight, _children)
from .program import BatchNorm
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

    Derivatives come from :func:`symntk.activations.partial_derivative`, the one convention for
    jumps (the derivative almost everywhere: at finite width a jump is hit with probability 0, so
    it is what reverse mode computes), shared with the derivation.
    """
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
    df = tuple(_numeric_function(partial_derivative(expr, x, "nonlinearity"), real,
                                 f"derivative of {phi.expr}") for x in real)
    return f, df


def _as_vector(value, shape) -> np.ndarray:
    """lambdify returns a scalar for constant expressions (e.g. the derivative of a sum)."""
    return np.broadcast_to(np.asarray(value, dtype=np.float64), shape)


# ----------------------------------------------------------------------------- parametrization
def ntk_factor(param: Param, parametrization: str, variance: float, fan_in: int) -> float:
    """s^2 in NTK term = s^2 <dF/dW, dF'/dW>, where W = s * omega and omega is trained
    (see :mod:`symntk.parametrization`).  ``fan_in`` is ignored for biases and the output bias.
    """
    if isinstance(param, Weight):
        return float(raw_weight_factor(parametrization, variance, fan_in))
    return float(bias_factor(parametrization, variance))


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


def _lifted(args: list[np.ndarray]) -> tuple[list[np.ndarray], tuple]:
    """Broadcast position-free arguments (N, k) over the positions of positioned ones (N, T, k)
    or (N, H, W, k): a Bias or a pooled vector is the same at every position.  Returns the arrays
    and the leading shape, (N,), (N, T) or (N, H, W)."""
    ndim = max(a.ndim for a in args)
    lifted = [a.reshape(a.shape[:1] + (1,) * (ndim - a.ndim) + a.shape[1:]) if a.ndim < ndim
              else a for a in args]
    return lifted, np.broadcast_shapes(*(a.shape[:-1] for a in lifted))


def _fwd_nonlin(net, node: Nonlin, env, n):
    f, _ = net._nonlin(node)
    args, lead = _lifted([env[a] for a in node.inputs])
    return _as_vector(f(*args), lead + (net.dim(node),))


def _fwd_moment(net, node: Moment, env, n):
    # theta = (1/n) sum_alpha psi(h_alpha), one scalar per example (and per position), kept as an
    # (N, 1) or (N, T, 1) column so it broadcasts into the Nonlins that take it as a parameter
    # (NETSOR-T+ Nonlin+, TP2 App. B).
    f, _ = net._moment(node)
    d = next(net.dim(a) for a in node.inputs)
    args, lead = _lifted([env[a] for a in node.inputs])
    return _as_vector(f(*args), lead + (d,)).mean(axis=-1, keepdims=True)


def _fwd_pool(net, node: Pool, env, n):
    x = env[node.vector]  # (N, T, dim) or (N, H, W, dim) -> (N, dim)
    if node.how == "flatten":
        raise NotImplementedError("the finite-width referee does not flatten yet (its readout's "
                                  "fan-in n P depends on the image size): use Pool(x, 'mean')")
    if node.how == "mean" and _NODE_MASK not in env:
        return x.mean(axis=tuple(range(1, x.ndim - 1)))
    w = _pool_weights(node, x, env)
    if w is not None:       # sum, or mean over the real nodes of a graph
        return np.einsum("np,npc->nc", w, x.reshape(x.shape[0], -1, x.shape[-1]))
    return x[:, -1]


def _pool_weights(node: Pool, x, env):
    """d pool / d x^p per example and position (N, P) for "sum" and "mean" (the real nodes of a
    node mask only, when the input mapping has one), None for "last"."""
    if node.how == "last":
        return None
    P = int(np.prod(x.shape[1:-1]))
    m = env.get(_NODE_MASK)
    w = np.ones((x.shape[0], P)) if m is None else m.astype(np.float64)
    return w / w.sum(axis=1, keepdims=True) if node.how == "mean" else w


def _window_taps(node, spatial: tuple) -> tuple[list, tuple]:
    """For each filter offset k, per axis, the input index s o + k - pad read by every output
    position o and whether it lies inside the image (SAME: zero outside; CIRCULAR: wrapped),
    as Neural Tangents / XLA place the window; and the output shape."""
    taps, outs, pads = [], [], []
    for n_, f, st in zip(spatial, node.filter_shape, node.strides):
        if node.padding == "VALID":
            if n_ < f:
                raise ValueError(f"{node.label()!r}: a VALID window of {f} does not fit {n_} "
                                 "positions")
            o, pad = (n_ - f) // st + 1, 0
        else:
            o = -(-n_ // st)
            pad = max((o - 1) * st + f - n_, 0) // 2
        outs.append(o)
        pads.append(pad)
    for k in np.ndindex(*node.filter_shape):
        per_axis = []
        for kk, n_, st, o, pad in zip(k, spatial, node.strides, outs, pads):
            i = st * np.arange(o) + kk - pad
            if node.padding == "CIRCULAR":
                per_axis.append((i % n_, np.ones(o, dtype=bool)))
            else:
                inside = (i >= 0) & (i < n_)
                per_axis.append((np.where(inside, i, 0), inside))
        taps.append(per_axis)
    return taps, tuple(outs)


def _gather(x: np.ndarray, per_axis) -> np.ndarray:
    """x (N, *spatial, c) read at one filter offset: (N, *out, c), zero outside the image."""
    idx = np.ix_(*[i for i, _ in per_axis])
    return x[(slice(None),) + idx] * _mask(per_axis)[None, ..., None]


def _mask(per_axis) -> np.ndarray:
    """1 where every axis' index lies inside the image, as an outer product over the axes."""
    return functools.reduce(np.multiply, np.ix_(*[m.astype(np.float64) for _, m in per_axis]))


def _scatter(g: np.ndarray, per_axis, shape) -> np.ndarray:
    """The adjoint of :func:`_gather`: g (N, *out, c) added back at the positions read."""
    out = np.zeros(shape)
    idx = np.ix_(*[i for i, _ in per_axis])
    np.add.at(out, (slice(None),) + idx, g * _mask(per_axis)[None, ..., None])
    return out


def _patches(net, node, x):
    taps, outs = _window_taps(node, x.shape[1:-1])
    return np.stack([_gather(x, t) for t in taps], axis=-2), taps   # (N, *out, |F|, c)


def _fwd_conv(net, node: Conv, env, n):
    """y^p = sum_k W_k x^{s p + k - pad}: the patches (N, *out, |F| c) times W^T, W stored as
    (n_out, |F| n_in), offset-major."""
    P, _ = _patches(net, node, env[node.vector])
    return P.reshape(P.shape[:-2] + (-1,)) @ net._params[node.weight].T


def _fwd_avgpool(net, node: AvgPool, env, n):
    P, _ = _patches(net, node, env[node.vector])
    return P.sum(axis=-2) / node.filter_size


#: Node types that read a token mask themselves (input mapping ``{name: X, 'mask': m}``), so
#: ``empirical_ntk(mask1=...)`` passes the padded batch whole (filled by symntk.attention).
TOKEN_MASKED: set = set()

#: Keys of the graph data in a batch's environment (from the input mapping, see _check_inputs).
_ADJACENCY, _NODE_MASK = ("graph", "adjacency"), ("graph", "mask")


def _graph_matrix(node: Aggregate, env) -> np.ndarray:
    """The normalised adjacency c_u A_hat[u, v] of every graph of the batch for ``node``."""
    key = ("graph", node.how, node.self_loops)
    M = env.get(key)
    if M is None:
        from .graphs import normalized_adjacency
        M = env[key] = normalized_adjacency(env[_ADJACENCY], node.how, node.self_loops,
                                            env.get(_NODE_MASK))
    return M


def _fwd_aggregate(net, node: Aggregate, env, n):
    """y_u = sum_v M[u, v] x_v per graph (Du et al. 2019, Eq. 4), M the normalised adjacency."""
    return np.einsum("nuv,nvc->nuc", _graph_matrix(node, env), env[node.vector])


def _bwd_aggregate(net, node: Aggregate, G, env, tape):
    tape.add(node.vector, np.einsum("nuv,nuc->nvc", _graph_matrix(node, env), G))


def _fwd_scan(net, node: Scan, env, n):
    """s^t = body(s^{t-1}, c^{t-1}, inputs at t), t = 1..T (TP2 Eq. 14), one position at a time.

    The body's nodes that do not read a carry (U xi^t, biases) were computed for every position
    at once by the main sweep; only the carry-dependent ones run in this loop.  Every per-position
    value is stored (N, T, dim) for the backward pass, the carries as the shifted sequences
    s^0..s^{T-1}."""
    T = env.lengths[node.positions]
    inner = net._scan_inner(node)
    state = [env[i] if i is not None else np.zeros((n, net.dim(c)))
             for c, i in zip(node.carries, node.inits)]
    store: dict[Node, np.ndarray] = {}
    states = np.empty((n, T, net.dim(node)))
    for t in range(T):
        step = _StepEnv(env, t, node.positions)
        for c, value in zip(node.carries, state):
            step[c] = value
        for m in inner:
            step[m] = _FORWARD[type(m)](net, m, step, n)
        for m, value in step.local.items():
            if m not in store:
                store[m] = np.empty((n, T) + value.shape[1:])
            store[m][:, t] = value
        state = [step[b] for b in node.bodies]
        states[:, t] = state[0]
    env.update(store)
    return states


def _fwd_concat(net, node: Concat, env, n):
    return np.concatenate([env[v] for v in node.vectors], axis=-1)  # FanInConcat, channel axis


def _fwd_dropout(net, node: Dropout, env, n):
    """m x / keep with a fresh Bernoulli(keep) mask per example and coordinate (NT's train mode);
    the mask is kept for the backward pass.  Masks come from the network's own mask stream, so
    two passes (X1, then X2) draw independent masks and one pass (X2 = None) shares them."""
    keep = 1 - _number(node.rate, net._binding, f"rate of {node.label()}")
    x = env[node.vector]
    mask = net._mask_rng.random(x.shape) < keep
    env[("mask", node)] = mask / keep
    return x * env[("mask", node)]


def _batch_statistics(net, node: BatchNorm, h: np.ndarray):
    """x~ = (h - mean_b h) / sigma and sigma per neuron, over the batch (the rows of h)."""
    B = h.shape[0]
    if B < 2:
        raise ValueError(f"BatchNorm {node.label()!r} needs a batch of at least 2 examples (the "
                         f"batch statistics of one example are undefined), got {B}")
    eps = _number(node.epsilon, net._binding, f"epsilon of {node.label()}")
    y = h - h.mean(axis=0, keepdims=True)
    var = (y * y).mean(axis=0) + eps
    if np.any(var <= 0):
        raise ValueError(f"BatchNorm {node.label()!r}: zero variance over the batch (every "
                         "example of the batch has the same pre-activation, e.g. identical "
                         "inputs) and epsilon = 0: the normalisation is undefined")
    sigma = np.sqrt(var)
    return y / sigma, sigma


def _fwd_batchnorm(net, node: BatchNorm, env, n):
    # TP2 App. E.4: per neuron, over the batch members (rows)
    f, _ = net._compiled(node.phi)
    xt, _ = _batch_statistics(net, node, env[node.vector])
    return _as_vector(f(xt), xt.shape)


_FORWARD = {Input: _fwd_input, Embedding: _fwd_embedding, MatMul: _fwd_matmul, Bias: _fwd_bias,
            Nonlin: _fwd_nonlin, Moment: _fwd_moment, Pool: _fwd_pool, Scan: _fwd_scan,
            Concat: _fwd_concat, Dropout: _fwd_dropout, Conv: _fwd_conv, AvgPool: _fwd_avgpool,
            Aggregate: _fwd_aggregate,
            BatchNorm: _fwd_batchnorm}


class _Env(dict):
    """Values of the nodes for one batch: (N, dim) arrays, (N, T, dim) for positioned nodes.
    ``lengths`` maps each position axis to its T (it may differ between X1 and X2)."""

    def __init__(self, lengths: Mapping[str, int]):
        super().__init__()
        self.lengths = dict(lengths)


class _StepEnv:
    """The view of an environment at one position t of a Scan over ``axis``: positioned values
    are read at t ((N, dim) slices), position-free ones as they are; values computed in the step
    (the carries and carry-dependent nodes) live in ``local``."""

    def __init__(self, env, t: int, axis: str):
        self.env, self.t, self.axis, self.local = env, t, axis, {}

    def __getitem__(self, node):
        value = self.local.get(node)
        if value is not None:
            return value
        value = self.env[node]
        return value[:, self.t] if getattr(node, "positions", None) == self.axis else value

    def __setitem__(self, node, value):
        self.local[node] = value



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
        # y = W z: dz += W^T g, and dF/dW = g z^T (one GEMM over all leading axes: W is
        # streamed once)
        tape.add(node.vector, (G.reshape(-1, G.shape[-1]) @ W).reshape(G.shape[:-1] + (-1,)))
        tape.use(node.weight, G, z)


def _bwd_bias(net, node: Bias, G, env, tape):
    tape.bias(node, G)  # the cotangent of the bias node already sums every use


def _unbroadcast(g: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The cotangent of an argument that was broadcast over positions sums over them (a
    position-free Bias gets the sum of its uses at every t)."""
    return g.sum(axis=tuple(range(1, 1 + g.ndim - value.ndim))) if g.ndim > value.ndim else g


def _bwd_nonlin(net, node: Nonlin, G, env, tape):
    _, df = net._nonlin(node)
    values = [env[a] for a in node.inputs]
    args, _ = _lifted(values)
    for a, value, d in zip(node.inputs, values, df):
        g = G * _as_vector(d(*args), G.shape)
        # a Moment argument is one scalar per example: dF/dtheta sums over coordinates
        if isinstance(a, Moment):
            g = g.sum(axis=-1, keepdims=True)
        tape.add(a, _unbroadcast(g, value))


def _bwd_moment(net, node: Moment, G, env, tape):
    # theta = (1/n) sum_alpha psi(h_alpha): dF/dh_alpha += dF/dtheta * psi'(h_alpha) / n
    _, dpsi = net._moment(node)
    values = [env[a] for a in node.inputs]
    args, lead = _lifted(values)
    d = next(net.dim(a) for a in node.inputs)
    for a, value, dp in zip(node.inputs, values, dpsi):
        tape.add(a, _unbroadcast(G * _as_vector(dp(*args), lead + (d,)) / d, value))


def _bwd_pool(net, node: Pool, G, env, tape):
    x = env[node.vector]
    if node.how == "mean" and _NODE_MASK not in env:
        # d/dx^t (1/T) sum_r x^r = 1/T at every t (T: all positions)
        lead = x.shape[1:-1]
        G = G.reshape(G.shape[:1] + (1,) * len(lead) + G.shape[1:])
        tape.add(node.vector, np.broadcast_to(G / int(np.prod(lead)), x.shape))
        return
    w = _pool_weights(node, x, env)
    if w is not None:       # sum (1 at every position), or mean over the real nodes
        tape.add(node.vector, (w[:, :, None] * G[:, None, :]).reshape(x.shape))
    else:                   # only the last position is read
        g = np.zeros(x.shape)
        g[:, -1] = G
        tape.add(node.vector, g)


def _bwd_conv(net, node: Conv, G, env, tape):
    """y = patches(x) W^T: d patches = G W, scattered back to x; dF/dW = sum_p G^p patch^p^T, one
    factored use with a position axis (the filter is shared by every position)."""
    x = env[node.vector]
    P, taps = _patches(net, node, x)
    W = net._params[node.weight]
    n = G.shape[0]
    tape.use(node.weight, G.reshape(n, -1, G.shape[-1]), P.reshape(n, -1, W.shape[1]))
    if isinstance(node.vector, Input):
        return
    dP = (G @ W).reshape(P.shape)
    dx = sum(_scatter(dP[..., k, :], t, x.shape) for k, t in enumerate(taps))
    tape.add(node.vector, dx)


def _bwd_avgpool(net, node: AvgPool, G, env, tape):
    x = env[node.vector]
    taps, _ = _window_taps(node, x.shape[1:-1])
    tape.add(node.vector, sum(_scatter(G, t, x.shape) for t in taps) / node.filter_size)


def _bwd_scan(net, node: Scan, G, env, tape):
    """Backpropagation through time: at t = T..1 the cotangent of s^t is G^t plus what step t+1
    sent back through its carry; the carry-dependent body nodes are swept in reverse at each t.
    A weight used in the body gets ONE factored use (A, B) with a position axis, (N, T, fan_out)
    and (N, T, fan_in): dF/dW = sum_t A^t outer B^t (weights are shared over t)."""
    inner = net._scan_inner(node)
    n, T = G.shape[0], G.shape[1]
    step_tape = _StepTape(tape, node, inner, T)
    dcarry = [np.zeros((n, net.dim(c))) for c in node.carries]
    for t in reversed(range(T)):
        step = _StepEnv(env, t, node.positions)
        for c in node.carries:
            step[c] = env[c][:, t]
        for m in inner:
            step[m] = env[m][:, t]
        step_tape.start(t)
        step_tape.add(node.body, G[:, t])
        for b, g in zip(node.bodies, dcarry):
            step_tape.add(b, g)
        for m in reversed(inner):
            g = step_tape.cot.get(m)
            if g is not None:
                _BACKWARD[type(m)](net, m, g, step, step_tape)
        dcarry = [step_tape.cot.get(c, np.zeros((n, net.dim(c)))) for c in node.carries]
    for i, g in zip(node.inits, dcarry):
        if i is not None:
            tape.add(i, g)
    step_tape.finish()


def _bwd_carry(net, node, G, env, tape):
    pass  # handled by the Scan that binds it


def _bwd_concat(net, node: Concat, G, env, tape):
    start = 0                    # each branch gets the cotangent's slice on its coordinates
    for v in node.vectors:
        stop = start + net.dim(v)
        tape.add(v, G[..., start:stop])
        start = stop


def _bwd_dropout(net, node: Dropout, G, env, tape):
    tape.add(node.vector, G * env[("mask", node)])


def _bwd_batchnorm(net, node: BatchNorm, G, env, tape):
    # TP2 Eq. 28: dh = G (I - x~ x~^T / B) (phi'(x~) * dx) / sigma, per neuron over the batch
    _, (df,) = net._compiled(node.phi)
    xt, sigma = _batch_statistics(net, node, env[node.vector])
    g = G * _as_vector(df(xt), xt.shape)   # G: (B, n), or (outputs, B, n) in a batched sweep
    dh = (g - g.mean(axis=-2, keepdims=True) - xt * (xt * g).mean(axis=-2, keepdims=True)) / sigma
    tape.add(node.vector, dh)


_BACKWARD = {Input: _bwd_input, Embedding: _bwd_embedding, MatMul: _bwd_matmul, Bias: _bwd_bias,
             Nonlin: _bwd_nonlin, Moment: _bwd_moment, Pool: _bwd_pool, Scan: _bwd_scan,
             Concat: _bwd_concat, Dropout: _bwd_dropout, Conv: _bwd_conv, AvgPool: _bwd_avgpool,
             Aggregate: _bwd_aggregate,
             BatchNorm: _bwd_batchnorm}



# ----------------------------------------------------------------------------- readouts
# f(X) (without the output bias) and the seed of reverse mode, per readout kind.
def _fwd_readout(net, out: Readout, env):
    return env[out.vector] @ net._params[out.weight][0]  # V = v^T / sqrt(n), stored (1, n)


def _fwd_vector_readout(net, out: VectorReadout, env):
    h = env[out.vector]  # the readout vector u is computed by the network: f = u . h / sqrt(n)
    return (env[out.weight] * h).sum(axis=1) / np.sqrt(h.shape[1])


def _fwd_fixed_readout(net, out: FixedReadout, env):
    h = env[out.vector]
    return h.sum(axis=1) / np.sqrt(h.shape[1])  # f = sum_alpha h_alpha / sqrt(n)


def _bwd_readout(net, out: Readout, env, tape, n):
    V, ones = net._params[out.weight], np.ones((n, 1))
    tape.add(out.vector, ones @ V)               # df/dh = V
    tape.use(out.weight, ones, env[out.vector])  # f = V h: dF/dV = 1 outer h


def _bwd_vector_readout(net, out: VectorReadout, env, tape, n):
    root = np.sqrt(net.dim(out.vector))
    tape.add(out.vector, env[out.weight] / root)   # f = u . h / sqrt(n)
    tape.add(out.weight, env[out.vector] / root)


def _bwd_fixed_readout(net, out: FixedReadout, env, tape, n):
    d = net.dim(out.vector)
    tape.add(out.vector, np.full((n, d), 1.0 / np.sqrt(d)))


_READOUT_FORWARD = {Readout: _fwd_readout, VectorReadout: _fwd_vector_readout,
                    FixedReadout: _fwd_fixed_readout}
_READOUT_BACKWARD = {Readout: _bwd_readout, VectorReadout: _bwd_vector_readout,
                     FixedReadout: _bwd_fixed_readout}


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


class _StepTape:
    """The tape of one position t inside a Scan's backward sweep.

    Cotangents of the carries and carry-dependent nodes stay local to the step.  Those of
    positioned nodes outside the recurrence (U xi^t) are written at t into an (N, T, dim) buffer,
    those of position-free ones (a Bias, the init) go straight to the outer tape (summing over t).
    The k-th weight use of every step is the same use at another position: ``finish`` stacks
    them into one use with a position axis.
    """

    def __init__(self, tape: _Tape, scan: Scan, inner: tuple, T: int):
        self.outer, self.scan, self.T = tape, scan, T
        self.local_nodes = set(scan.carries) | set(inner)
        self.buffers: dict[Node, np.ndarray] = {}
        self.steps: list[list[tuple]] = []

    def start(self, t: int):
        self.t, self.cot = t, {}
        self.steps.append([])

    def add(self, node, g):
        if node in self.local_nodes:
            prev = self.cot.get(node)
            self.cot[node] = g if prev is None else prev + g
        elif getattr(node, "positions", None) == self.scan.positions:
            buf = self.buffers.get(node)
            if buf is None:
                buf = self.buffers[node] = np.zeros((g.shape[0], self.T) + g.shape[1:])
            buf[:, self.t] += g
        else:
            self.outer.add(node, g)

    def use(self, weight, a, b):
        self.steps[-1].append((weight, a, b))

    def bias(self, node, g):  # pragma: no cover - a Bias never reads a carry
        self.outer.bias(node, g)

    def finish(self):
        for node, buf in self.buffers.items():
            self.outer.add(node, buf)
        steps = self.steps[::-1]  # recorded for t = T..1
        for k, (weight, _, _) in enumerate(steps[0] if steps else ()):
            a = np.stack([s[k][1] for s in steps], axis=1)
            b = np.stack([s[k][2] for s in steps], axis=1)
            self.outer.use(weight, a, b)


@dataclass
class _Pass:
    """Outputs and factored raw gradients of one batch (the result of forward + reverse mode)."""
    outputs: np.ndarray
    uses: dict
    biases: dict
    n: int


# ----------------------------------------------------------------------------- the network
class FiniteNetwork:
    """A program with every width bound to an integer and every parameter drawn (TP2 Setup A.5).

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
        self._inner = _scan_structure(program)
        # dropout masks: a stream of their own, so the parameters do not depend on it
        self._mask_rng = np.random.default_rng(
            [int(seed), 1] if isinstance(seed, (int, np.integer)) else None)

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
        """True for a trained Readout (zero-mean v): then E f f'^T is the NNGP (TP1 Cor. 5.5)."""
        out = self.program.output
        return isinstance(out, Readout)

    def dim(self, node) -> int:
        d = self._dims.get(node)
        if d is None:
            d = self._dims[node] = _int_dim(node.dim, self._binding, f"dimension of {node.label()}")
        return d

    def _scan_inner(self, node: Scan) -> tuple:
        """The body nodes of ``node`` that read one of its carries, in topological order."""
        return self._inner[node]

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
        graph = tokens = None
        if any(isinstance(node, Aggregate) for node in self.program.nodes):
            # a graph network: the input mapping also holds the adjacency (N, P, P) and
            # optionally a node mask (N, P) (symntk.graphs.graph_inputs)
            if not isinstance(X, Mapping) or "adjacency" not in X:
                raise ValueError("the program aggregates over graph nodes: pass a mapping "
                                 "{input name: X, 'adjacency': A (N, P, P)[, 'mask': (N, P)]} "
                                 "(symntk.graphs.graph_inputs)")
            X = dict(X)
            graph = (X.pop("adjacency"), X.pop("mask", None))
        elif isinstance(X, Mapping) and "mask" in X:
            X = dict(X)
            tokens = X.pop("mask")
        if not isinstance(X, Mapping):
            if len(inputs) != 1:
                raise ValueError(f"the program has {len(inputs)} inputs {[i.name for i in inputs]}; "
                                 "pass a dict input-name -> array")
            X = {inputs[0].name: X}
        names = {i.name for i in inputs}
        if set(X) != names:
            raise ValueError(f"inputs given for {sorted(X)} but the program's inputs are {sorted(names)}")
        env, n = _Env({}), None
        for inp in inputs:
            x = np.asarray(X[inp.name])
            d = self.dim(inp)
            if x.dtype.kind not in "biuf":
                raise ValueError(f"input {inp.name!r} must be a real array, got dtype {x.dtype}")
            if inp.positions is not None:
                _check_sequence(inp, x, d, env.lengths)
            elif x.ndim == 3:
                raise ValueError(f"input {inp.name!r} must have shape (N, {d}), got shape {x.shape}: "
                                 "it was declared without positions, so it is one vector per "
                                 "example, not a sequence (use Input(..., positions='t'))")
            elif x.ndim != 2:
                raise ValueError(f"input {inp.name!r} must have shape (N, {d}), got shape {x.shape}"
                                 + (" (use x[None, :] for a single example)" if x.ndim == 1 else ""))
            if x.shape[-1] != d:
                shape = f"(N, T, {d})" if inp.positions is not None else f"(N, {d})"
                raise ValueError(f"input {inp.name!r} must have shape {shape}, got shape {x.shape}: "
                                 f"the network was sampled with input dimension {d}")
            if x.shape[0] == 0:
                raise ValueError(f"input {inp.name!r} has no examples (shape {x.shape})")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"input {inp.name!r} contains NaN or infinite entries")
            if n is not None and x.shape[0] != n:
                raise ValueError(f"inputs have different numbers of examples ({n} and {x.shape[0]})")
            n = x.shape[0]
            env[inp] = x.astype(np.float64, copy=False)
        if graph is not None:
            from .graphs import check_adjacency, node_mask
            P = env[inputs[0]].shape[1]
            env[_ADJACENCY] = check_adjacency(graph[0], n, P)
            if graph[1] is not None:
                env[_NODE_MASK] = node_mask(graph[1], n, P)
        if tokens is not None:
            self._token_mask(env, inputs, tokens, n)
        return env, n

    def _token_mask(self, env, inputs, mask, n):
        """A token mask (N, T) of a padded batch (input mapping ``{name: X, 'mask': m}``):
        attention excludes padded keys, sum/mean pooling padded tokens; padded tokens are filled
        with the sequence's first token so every value stays finite (no real token reads them)."""
        from .masks import token_mask
        if len(inputs) != 1 or inputs[0].positions is None or env[inputs[0]].ndim != 3:
            raise ValueError("a token 'mask' goes with one sequence input (N, T, d)")
        bad = [node.label() for node in self.program.nodes
               if isinstance(node, Pool) and node.how not in ("sum", "mean")
               or isinstance(node, Scan)
               or isinstance(node, (Conv, AvgPool)) and set(node.filter_shape) != {1}]
        if bad:
            raise ValueError(f"a token mask needs sum/mean pooling and no step reading "
                             f"neighbouring tokens; {bad} would read the padding")
        x = env[inputs[0]]
        m = token_mask(mask, n, x.shape[1])
        if not m.all():
            x = x.copy()
            for i in np.flatnonzero(~m.all(axis=1)):
                x[i, ~m[i]] = x[i, int(np.argmax(m[i]))]
            env[inputs[0]] = x
        env[_NODE_MASK] = m

    @property
    def _in_scan(self) -> frozenset:
        return self._inner[None]

    def _forward(self, X) -> tuple[np.ndarray, dict, int]:
        env, n = self._check_inputs(X)
        for node in self.program.nodes:
            if node in self._in_scan:
                continue  # computed position by position by the Scan that binds its carry
            rule = _FORWARD.get(type(node))
            if rule is not None and node not in env:
                env[node] = rule(self, node, env, n)
            elif rule is None and not isinstance(node, (Weight, Transpose, OutputBias, *READOUTS)):
                raise TypeError(f"the finite-width simulator has no rule for {type(node).__name__}")
        out = self.program.output
        f = _READOUT_FORWARD[type(out)](self, out, env)
        if out.bias is not None:
            f = f + self._params[out.bias]
        return f, env, n

    def __call__(self, X) -> np.ndarray:
        """The outputs f(X), shape (N,)."""
        return self._forward(X)[0]

    forward = __call__

    def _backward(self, X) -> _Pass:
        """Forward pass, then one reverse sweep in reverse topological order (TP2 Programs 1-2)."""
        f, env, n = self._forward(X)
        if any(isinstance(node, BatchNorm) for node in self.program.nodes):
            return self._backward_batch_coupled(f, env, n)
        tape = _Tape(self._params)
        out = self.program.output
        _READOUT_BACKWARD[type(out)](self, out, env, tape, n)
        if out.bias is not None:
            tape.bias(out.bias, np.ones((n, 1)))
        for node in reversed(self.program.nodes):
            G = tape.cot.get(node)
            if G is not None and node not in self._in_scan:
                _BACKWARD[type(node)](self, node, G, env, tape)
        biases = {p: (g if g is not None else np.zeros((n, self._params[p].size)))
                  for p, g in tape.biases.items()}
        return _Pass(f, tape.uses, biases, n)

    def _backward_batch_coupled(self, f, env, n) -> _Pass:
        """Reverse mode when examples are coupled through batch statistics (``BatchNorm``): the
        output f(x_i) depends on every member of the batch, so one reverse sweep per output i,
        seeded at row i only; the rows of the sweep are the batch members.  A weight's use then
        has the member axis as a position axis, (N_out, N_batch, k), and the NTK contraction
        sums over member pairs (:func:`_positioned_gram`)."""
        out = self.program.output
        if type(out) is Readout and all(
                isinstance(node, (Input, Embedding, BatchNorm, Weight, OutputBias, Readout))
                or (isinstance(node, MatMul) and not node.transposed) for node in self.program.nodes):
            return self._backward_batched_outputs(f, env, n)
        sweeps = []
        for i in range(n):
            seed = np.zeros((n, 1))
            seed[i] = 1.0
            tape = _Tape(self._params)
            _READOUT_BACKWARD[type(out)](self, out, env, tape, n)
            tape.cot = {node: g * seed for node, g in tape.cot.items()}
            tape.uses = {p: [(a * seed, b) for a, b in uses] for p, uses in tape.uses.items()}
            if out.bias is not None:
                tape.bias(out.bias, seed)
            for node in reversed(self.program.nodes):
                G = tape.cot.get(node)
                if G is not None:
                    _BACKWARD[type(node)](self, node, G, env, tape)
            sweeps.append(tape)
        uses = {p: [(np.stack([t.uses[p][k][0] for t in sweeps]),
                     np.stack([np.broadcast_to(t.uses[p][k][1], t.uses[p][k][0].shape[:1]
                                               + t.uses[p][k][1].shape[1:]) for t in sweeps]))
                    for k in range(len(sweeps[0].uses[p]))] for p in sweeps[0].uses}
        biases = {p: np.stack([np.zeros(self._params[p].size) if t.biases[p] is None
                               else np.asarray(t.biases[p]).reshape(n, -1).sum(axis=0)
                               for t in sweeps]) for p in sweeps[0].biases}
        return _Pass(f, uses, biases, n)

    def _backward_batched_outputs(self, f, env, n) -> _Pass:
        """The sweeps of :meth:`_backward_batch_coupled` all at once, cotangents (N_out, N_batch,
        dim), for chains of matrices and BatchNorms (each weight is streamed once, not once
        per output)."""
        out = self.program.output
        tape = _Tape(self._params)
        seed = np.eye(n)[:, :, None]                           # output i seeds member i
        h = env[out.vector]
        tape.add(out.vector, seed * self._params[out.weight][0])
        tape.use(out.weight, seed, np.broadcast_to(h, (n,) + h.shape))
        if out.bias is not None:
            tape.bias(out.bias, np.ones((n, 1)))
        for node in reversed(self.program.nodes):
            G = tape.cot.get(node)
            if G is not None:
                _BACKWARD[type(node)](self, node, G, env, tape)
        uses = {p: [(a, b if b.ndim == 3 else np.broadcast_to(b, (n,) + b.shape))
                    for a, b in us] for p, us in tape.uses.items()}
        biases = {p: (np.zeros((n, self._params[p].size)) if g is None else
                      np.asarray(g).reshape(n, -1)) for p, g in tape.biases.items()}
        return _Pass(f, uses, biases, n)

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
                if a.ndim == 3:  # a use with a position axis: sum_t A^t outer B^t
                    if k == 0:
                        g[...] = 0.0
                    for i in range(0, tape.n, chunk):
                        g[i:i + chunk] += np.einsum("ita,itb->iab", a[i:i + chunk], b[i:i + chunk])
                    continue
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

    (TP2 Eqs. 10-11.)  For a use y = W z the factors are (A, B) = (dy, z), giving
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
            if a1.ndim == 2 and a2.ndim == 2:
                term = (a1 @ a2.T) * (b1 @ b2.T)
            else:
                term = _positioned_gram(a1, b1, a2, b2)
            total += term if not symmetric or k2 == k else term + term.T
    return total


def _positioned_gram(a1, b1, a2, b2, max_elements: int = 2 ** 22) -> np.ndarray:
    """<sum_t a1^t b1^t^T, sum_r a2^r b2^r^T>_F = sum_{t,r} (a1^t . a2^r)(b1^t . b2^r) per example
    pair, for factors with a position axis (N, T, k) (a position-free factor is T = 1).

    Computed in blocks of examples of the first batch so the (rows, T1, N2, T2) intermediate stays
    below ``max_elements``: memory O(N n T) for the factors, never per-example Jacobians."""
    a1, b1, a2, b2 = (x[:, None, :] if x.ndim == 2 else x for x in (a1, b1, a2, b2))
    (n1, t1), (n2, t2) = a1.shape[:2], a2.shape[:2]
    a2f, b2f = a2.reshape(n2 * t2, -1), b2.reshape(n2 * t2, -1)
    out = np.empty((n1, n2))
    rows = max(1, max_elements // (t1 * n2 * t2))
    for i in range(0, n1, rows):
        a, b = a1[i:i + rows], b1[i:i + rows]
        m = a.shape[0]
        prod = (a.reshape(m * t1, -1) @ a2f.T) * (b.reshape(m * t1, -1) @ b2f.T)
        out[i:i + rows] = prod.reshape(m, t1, n2, t2).sum(axis=(1, 3))
    return out


def _check_sequence(inp: Input, x: np.ndarray, d: int, lengths: dict) -> None:
    """A sequence input is (N, T, d) with T >= 1, an image (N, H, W, d); inputs on one axis
    share T."""
    rank = len(inp.position_axes)
    if rank > 1:
        if x.ndim != rank + 2 or 0 in x.shape:
            raise ValueError(f"input {inp.name!r} has positions {inp.position_axes}: it must have "
                             f"shape (N, {', '.join(a.upper() for a in inp.position_axes)}, {d}), "
                             f"got shape {x.shape}")
        return
    if x.ndim != 3:
        raise ValueError(f"input {inp.name!r} is a sequence (positions {inp.positions!r}): it must "
                         f"have shape (N, T, {d}), got shape {x.shape}"
                         + (" (use x[:, None, :] for sequences of one token)" if x.ndim == 2 else ""))
    if x.shape[1] == 0:
        raise ValueError(f"input {inp.name!r} has sequences of length T = 0 (shape {x.shape}); "
                         "a recurrence needs at least one position")
    T = lengths.setdefault(inp.positions, x.shape[1])
    if T != x.shape[1]:
        raise ValueError(f"inputs on positions {inp.positions!r} have different lengths "
                         f"({T} and {x.shape[1]}) within one batch")


def _scan_structure(program: Program) -> dict:
    """For each Scan, its carry-dependent body nodes in topological order; under the key None,
    every node that reads a carry (the main sweep skips those: their Scan evaluates them).

    A node's free carries are those of its children, minus the carries a Scan binds."""
    free: dict[Node, frozenset] = {}
    for node in program.nodes:
        f = frozenset({node}) if isinstance(node, Carry) else frozenset()
        for c in _children(node):
            f |= free.get(c, frozenset())
        if isinstance(node, Scan):
            own = frozenset(node.carries)
            f -= own
            if f:
                raise ValueError(f"Scan {node.label()!r} reads the carry of an enclosing Scan; "
                                 "nested recurrences are not supported by the finite-width referee")
        free[node] = f
    structure: dict = {None: frozenset(n for n, f in free.items() if f)}
    binder: dict[Carry, Scan] = {}
    for node in program.nodes:
        if isinstance(node, Scan):
            for c in node.carries:
                other = binder.setdefault(c, node)
                if other != node:
                    raise ValueError(f"the Carry {c.name!r} is bound by two different Scans "
                                     f"({other.label()!r} and {node.label()!r}); give each "
                                     "recurrence its own carry name")
            own = set(node.carries)
            structure[node] = tuple(n for n in program.nodes
                                    if free[n] & own and not isinstance(n, Carry))
    return structure


# ----------------------------------------------------------------------------- public verbs
def sample(program: Program, width, seed=0, parametrization=None, input_dim=None,
           values=None) -> FiniteNetwork:
    """Draw a finite network from ``program`` (TP2 Setup A.5).

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
        if x is not None and not inp.dim.is_Integer and np.ndim(x) == 2 + len(inp.position_axes):
            dims[inp.name] = int(np.shape(x)[-1])
    return dims or None


@dataclass(frozen=True)
class EmpiricalNTK:
    """The empirical NTK of one finite network (TP2 Eq. 10; TP2 Fig. 1).

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
                  method: str = "structured", values=None, mask1=None,
                  mask2=None) -> "EmpiricalNTK":
    """Theta_n(x_i, x'_j) = sum_theta <dF(x_i)/d theta, dF(x'_j)/d theta> at initialization.

    ``program`` is a Program (sampled here with ``width``/``seed``) or a :class:`FiniteNetwork`.

    ``method="structured"`` contracts without per-example Jacobians (TP2 Eqs. 10-11):
    for a weight with uses y_k = W z_k, ``factor * sum_{k,k'} (G_k G'_k'^T) * (Z_k Z'_k'^T)``
    (``*`` elementwise, G_k = dF/dy_k, rows = examples); a use y = W^T z swaps the roles of G and
    Z; an embedding U xi has Z = xi; a bias gives ``factor * G_b G_b'^T`` with G_b the sum of its
    uses' gradients; the readout V gives H H'^T; the output bias 1.  ``factor`` is
    :func:`ntk_factor`.  Cost O(K^2 N1 N2 n) for K uses, memory O(N n).  For sequence inputs a
    use carries a position axis (a weight shared over t): the term is sum_{t,r} of the same
    products, cost O(K^2 N1 T1 N2 T2 n), memory O(N n T); X1 and X2 may have different lengths.

    ``method="jacobian"`` materialises the per-example trained-parameter Jacobian J (one parameter
    block at a time) and returns J1 J2^T: memory O(N * #params).  It is the test oracle.

    ``mask1``/``mask2`` (N, T): padded batches of sequences of different lengths (1 on tokens, 0
    on the padding after them); the same network runs on each sequence cut to its length
    (:mod:`symntk.masks`), so the padding takes no part in pooling or the recurrence.
    """
    if isinstance(program, FiniteNetwork):
        net = program
    else:
        if width is None:
            raise ValueError("empirical_ntk needs width=... to sample the program")
        net = sample(program, width, seed, parametrization, _infer_input_dim(program, X1), values)
    if mask1 is None and mask2 is None:
        return net.ntk(X1, X2, method=method, parametrization=parametrization)
    if any(type(node) in TOKEN_MASKED for node in net.program.nodes):
        # the network reads the masks itself (any 0/1 pattern, X1 and X2 of mixed lengths)
        name = net.program.inputs[0].name
        A = X1 if mask1 is None else {name: X1, "mask": mask1}
        B = X2 if mask2 is None else {name: X2, "mask": mask2}
        if X2 is None and mask2 is not None:
            raise ValueError("mask2 given without X2")
        return net.ntk(A, B, method=method, parametrization=parametrization)
    from .masks import masked_gram, masked_outputs
    from .result import KernelResult

    def block(A, B):
        e = net.ntk(A, B, method=method, parametrization=parametrization)
        return KernelResult(None, e.ntk, e.contributions)
    r = masked_gram(block, X1, X2, mask1, mask2)
    X1 = np.asarray(X1, dtype=np.float64)
    out1 = masked_outputs(net, X1, mask1)
    out2 = out1 if X2 is None else masked_outputs(net, np.asarray(X2, dtype=np.float64), mask2)
    return EmpiricalNTK(ntk=r.ntk, outputs1=out1, outputs2=out2, contributions=r.ntk_terms,
                        dims=net.dims, seed=net.seed,
                        parametrization=parametrization or net.parametrization, method=method)


@dataclass(frozen=True)
class MonteCarloKernel:
    """Mean and standard error over seeds of the empirical NTK and NNGP (as in TP2 Fig. 1).

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
    from .batchnorm import check_monte_carlo
    check_monte_carlo(program, X1, X2)
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
