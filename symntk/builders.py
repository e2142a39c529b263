"""Builders for common architectures.  Each returns an ordinary :class:`~symntk.program.Program`.

Conventions follow Neural Tangents' ``stax`` (Jacot et al. 2018) so numbers can be checked against
it: ``Dense(out, W_std=weight_std, b_std=bias_std, parameterization="ntk")`` layers, input kernel
``x.x'/d``, and a ``Dense(1)`` readout with the same ``weight_std``/``bias_std`` and its own bias.
"""
from __future__ import annotations

import sympy as sp

from sympy import Lambda, Symbol

from .program import _expr, _variance as _check_variance

from .program import (POOLINGS, WIDTH, AvgPool, Bias, Carry, Conv, Input, Nonlin,
                      OutputBias, Pool, Program, ProgramError, Readout, Scan, Vector, Weight,
                      nonlin, repeat)

__all__ = ["mlp", "residual_mlp", "tied_mlp", "rnn", "stacked_rnn", "gru", "lstm", "cnn"]

D_IN = sp.Symbol("d", positive=True, integer=True)


def _number(value, what: str) -> sp.Expr:
    """A builder's scalar argument as SymPy: a number or a SymPy expression, never text."""
    if isinstance(value, (str, bool)) or value is None:
        raise ProgramError(f"{what} must be a number or a SymPy expression, got {value!r}")
    return _expr(value, what)


def _exact(value) -> sp.Expr:
    """A number made exact: a rational or the square root of one where the float is one
    (1.4 -> 7/5, 2 ** 0.5 -> sqrt(2)), else the float's own rational value.  (``nsimplify``
    alone finds radicals such as 2**(203/381)*3**(181/381) for an arbitrary float, whose
    integer powers later overflow a float.)"""
    e = sp.nsimplify(value)
    if not e.is_number or e.is_Rational or (e ** 2).is_Rational:
        return e
    return sp.nsimplify(value, rational=True)


def _std(std, what: str) -> sp.Expr:
    """A standard deviation sigma: finite, real and non-negative (a number or a SymPy expression
    not known to be otherwise), made exact where it is a number (1.4 -> 7/5)."""
    _number(std, what)
    return _exact(_check_variance(std, what))


def _variance(std, what: str):
    return _std(std, what) ** 2 if std is not None else None


def _scale(value, what: str) -> sp.Expr:
    """A finite real multiplier (any sign), exact where it is a number."""
    expr = _number(value, what)
    if expr.has(sp.S.NaN, sp.S.Infinity, sp.S.NegativeInfinity, sp.S.ComplexInfinity) \
            or expr.is_finite is False:
        raise ProgramError(f"{what} must be finite, got {value!r}")
    if expr.is_extended_real is False:
        raise ProgramError(f"{what} must be real, got {value!r}")
    return _exact(expr)


def _check_depth(depth):
    if isinstance(depth, bool) or not (isinstance(depth, int) and depth >= 1):
        raise ProgramError(f"depth must be an integer >= 1 (the number of Dense->activation blocks), got {depth!r}")


def _check_arguments(depth, weight_std, bias_std, readout_bias):
    """Refuse bad arguments where they enter, naming the argument: a NaN ``weight_std`` would
    otherwise surface much later as an unrelated numerical error."""
    _check_depth(depth)
    _std(weight_std, "weight_std")
    if bias_std is not None:
        _std(bias_std, "bias_std")
    if not isinstance(readout_bias, bool):
        raise ProgramError(f"readout_bias must be True or False, got {readout_bias!r}")


def _readout(x: Vector, weight_std, bias_std, parametrization, readout_bias=True) -> Readout:
    v = Weight("v", fan_out=1, fan_in=x.dim, variance=_variance(weight_std, "weight_std"),
               parametrization=parametrization)
    b = None
    if bias_std is not None and readout_bias:
        b = OutputBias("b_out", _variance(bias_std, "bias_std"), parametrization)
    return Readout(v, x, b)


def _affine(name, z, weight_std, bias_std, parametrization, index=None, fan_in=None, weight=None):
    W = weight or Weight(f"W{name}" if index is None else "W", fan_out=WIDTH,
                         fan_in=fan_in if fan_in is not None else z.dim,
                         variance=_variance(weight_std, "weight_std"),
                         parametrization=parametrization, index=index)
    h = W @ z
    if bias_std is not None:
        h = h + Bias(f"b{name}" if index is None else "b", variance=_variance(bias_std, "bias_std"),
                     parametrization=parametrization, index=index)
    return h


def mlp(depth: int, activation="relu", weight_std=1.0, bias_std=None, parametrization="ntk",
        input_dim=D_IN, readout_bias=True) -> Program:
    """``depth`` Dense->activation blocks then a Dense(1) readout (Neural Tangents' ``stax.serial``).

    h^1 = W^1 xi + b^1,  x^l = phi(h^l),  h^l = W^l x^{l-1} + b^l (l = 2..depth),
    f = v^T x^depth / sqrt(n) + b_out.  ``bias_std=None`` means no bias parameters at all.
    Layers 2..depth are one ``Repeat`` over ``l``, so the derivation is a recursion in ``l``.
    ``readout_bias=False`` drops b_out (TP2 App. E.1's network has none).
    """
    _check_arguments(depth, weight_std, bias_std, readout_bias)
    xi = Input("xi", input_dim)
    h1 = _affine("1", xi, weight_std, bias_std, parametrization, fan_in=input_dim).named("h1")
    x = nonlin(activation, h1, name="x1")
    if depth > 1:
        def block(carry, l):
            h = _affine("", carry, weight_std, bias_std, parametrization, index=l).named("h")
            return nonlin(activation, h, name="x")
        x = repeat(block, x, 2, depth, name="x")
    return Program(_readout(x, weight_std, bias_std, parametrization, readout_bias), name=f"mlp{depth}")


def residual_mlp(depth: int, activation="relu", weight_std=1.0, bias_std=None,
                 branch_scale=1, parametrization="ntk", input_dim=D_IN,
                 readout_bias=True) -> Program:
    """A residual MLP: x^1 = W^1 xi (+ b^1), x^l = x^{l-1} + a phi(W^l x^{l-1} + b^l), readout on x^depth.

    The skip connection makes Z^{x^l} non-Gaussian with a nonzero mean (for ReLU), so the kernel
    picks up the cross terms E[x^{l-1}] E[phi(h^l)] that a branch-independence shortcut would drop.
    """
    _check_arguments(depth, weight_std, bias_std, readout_bias)
    xi = Input("xi", input_dim)
    a = _scale(branch_scale, "branch_scale")
    x = _affine("1", xi, weight_std, bias_std, parametrization, fan_in=input_dim).named("x1")
    if depth > 1:
        def block(carry, l):
            h = _affine("", carry, weight_std, bias_std, parametrization, index=l).named("h")
            return (carry + a * nonlin(activation, h, name="y")).named("x")
        x = repeat(block, x, 2, depth, name="x")
    return Program(_readout(x, weight_std, bias_std, parametrization, readout_bias), name=f"residual_mlp{depth}")


def tied_mlp(depth: int, activation="relu", weight_std=1.0, bias_std=None, parametrization="ntk",
             input_dim=D_IN, readout_bias=True) -> Program:
    """An MLP whose hidden layers 2..depth all reuse ONE matrix W (weight tying across depth).

    Biases stay per layer.  Its NNGP equals the untied MLP's (TP0 App. D.6), but its NTK sums
    D C over every pair of uses of W, so cross-layer kernels enter (TP2 Eqs. 11-12).
    """
    _check_arguments(depth, weight_std, bias_std, readout_bias)
    xi = Input("xi", input_dim)
    h1 = _affine("1", xi, weight_std, bias_std, parametrization, fan_in=input_dim).named("h1")
    x = nonlin(activation, h1, name="x1")
    if depth > 1:
        W = Weight("W", variance=_variance(weight_std, "weight_std"), parametrization=parametrization)

        def block(carry, l):
            h = _affine("", carry, weight_std, bias_std, parametrization, index=l, weight=W).named("h")
            return nonlin(activation, h, name="x")
        x = repeat(block, x, 2, depth, name="x")
    return Program(_readout(x, weight_std, bias_std, parametrization, readout_bias), name=f"tied_mlp{depth}")


# ----------------------------------------------------------------------------------- recurrent
# Conventions shared by the recurrent builders: a sequence input xi^1..xi^T (Input with positions
# "t", data (N, T, d)); every hidden-to-hidden matrix W : A(n, n) has variance weight_std^2, every
# input matrix U (fan_in d, or n for a stacked layer reading the layer below) input_std^2, every
# bias (position-free, the same vector at every t) bias_std^2; weights are shared over t (TP2
# §6.2.1, Eq. 14).  The readout is f = v . Pool(h) / sqrt(n) with v ~ N(0, readout_std^2), plus an
# output bias b_out ~ N(0, bias_std^2) when ``bias_std`` is given and ``readout_bias`` is True --
# the convention of :func:`mlp` (NTK4A's RNN, TP2 App. E.2, has no readout bias: readout_bias=False).
POSITIONS = "t"
_A, _B, _C, _D = (Symbol(s, real=True) for s in "abcd")


def _check_recurrent(readout, readout_bias, weight_std, input_std, bias_std, readout_std):
    """Refuse bad arguments of a recurrent builder where they enter, naming them."""
    for what, std in (("weight_std", weight_std), ("input_std", input_std),
                      ("readout_std", readout_std)):
        _std(std, what)
    if bias_std is not None:
        _std(bias_std, "bias_std")
    if not isinstance(readout_bias, bool):
        raise ProgramError(f"readout_bias must be True or False, got {readout_bias!r}")
    if readout not in POOLINGS:
        raise ProgramError(f"readout must be one of {POOLINGS} (pooling of the states over t), "
                           f"got {readout!r}")


def _gate_pre(tag, h_prev, x, weight_std, input_std, bias_std, parametrization):
    """W_tag h^{t-1} + U_tag x^t (+ b_tag): one gate's preactivation, its own W, U, b."""
    W = Weight(f"W{tag}", WIDTH, h_prev.dim, _variance(weight_std, "weight_std"), parametrization)
    U = Weight(f"U{tag}", WIDTH, x.dim, _variance(input_std, "input_std"), parametrization)
    pre = W @ h_prev + U @ x
    if bias_std is not None:
        pre = pre + Bias(f"b{tag}", WIDTH, _variance(bias_std, "bias_std"), parametrization)
    return pre


def _recurrent_program(states: Vector, readout, readout_std, bias_std, parametrization,
                       readout_bias, name) -> Program:
    pooled = Pool(states, readout, name=f"{readout}_{states.name or 'h'}")
    return Program(_readout(pooled, readout_std, bias_std, parametrization, readout_bias), name=name)


def _rnn_layer(tag, x, activation, weight_std, input_std, bias_std, parametrization) -> Scan:
    carry = Carry(f"s{tag}_prev", WIDTH, POSITIONS)
    pre = _gate_pre(tag, carry, x, weight_std, input_std, bias_std, parametrization)
    return Scan(carry, nonlin(activation, pre, name=f"s{tag}"), None, f"s{tag}")


def rnn(activation="erf", weight_std=1.0, input_std=1.0, bias_std=None, readout="last",
        parametrization="ntk", readout_std=1.0, input_dim=D_IN, readout_bias=True) -> Program:
    """The simple (Elman) RNN of TP2 §6.2.1 (Eq. 14) and App. E.2:

    s^t = phi(W s^{t-1} + U xi^t + b),  t = 1..T,  s^0 = 0,
    f = v . s^T / sqrt(n)  (``readout="last"``)  or  f = v . (1/T) sum_t s^t / sqrt(n)  (``"mean"``),

    plus b_out if ``bias_std`` is given and ``readout_bias`` (see the module's recurrent
    conventions).  W ~ weight_std^2 / n, U ~ input_std^2 / d, b ~ bias_std^2 (no b if None).
    NTK4A's network is ``rnn("erf", 1, sqrt(2), sqrt(0.2), "mean", "tp", 1, readout_bias=False)``.
    """
    _check_recurrent(readout, readout_bias, weight_std, input_std, bias_std, readout_std)
    xi = Input("xi", input_dim, positions=POSITIONS)
    s = _rnn_layer("", xi, activation, weight_std, input_std, bias_std, parametrization)
    return _recurrent_program(s, readout, readout_std, bias_std, parametrization, readout_bias,
                              f"rnn_{readout}")


def stacked_rnn(depth: int, activation="erf", weight_std=1.0, input_std=1.0, bias_std=None,
                readout="last", parametrization="ntk", readout_std=1.0, input_dim=D_IN,
                readout_bias=True) -> Program:
    """``depth`` simple RNN layers, layer k reading the sequence of states of layer k-1:

    s_1^t = phi(W1 s_1^{t-1} + U1 xi^t + b1),  s_k^t = phi(Wk s_k^{t-1} + Uk s_{k-1}^t + bk),
    f = v . Pool(s_depth) / sqrt(n).  Uk (k >= 2, fan_in n) also has variance input_std^2.
    """
    _check_depth(depth)
    _check_recurrent(readout, readout_bias, weight_std, input_std, bias_std, readout_std)
    x = Input("xi", input_dim, positions=POSITIONS)
    for k in range(1, depth + 1):
        x = _rnn_layer(str(k), x, activation, weight_std, input_std, bias_std, parametrization)
    return _recurrent_program(x, readout, readout_std, bias_std, parametrization, readout_bias,
                              f"stacked_rnn{depth}_{readout}")


def gru(weight_std=1.0, input_std=1.0, bias_std=None, readout="last", parametrization="ntk",
        readout_std=1.0, input_dim=D_IN, readout_bias=True) -> Program:
    """A gated recurrent unit (Cho et al. 2014, Eqs. 5-8), sigma the logistic sigmoid:

    z^t = sigma(W_z h^{t-1} + U_z xi^t + b_z)             (update gate)
    r^t = sigma(W_r h^{t-1} + U_r xi^t + b_r)             (reset gate)
    c^t = tanh(W_h (r^t * h^{t-1}) + U_h xi^t + b_h)      (candidate)
    h^t = z^t * h^{t-1} + (1 - z^t) * c^t,   h^0 = 0,

    products coordinatewise (Nonlins of several vectors); f = v . Pool(h) / sqrt(n).  (Cho et al.
    let z keep the old state; some libraries swap z and 1 - z, which has the same law.)
    """
    _check_recurrent(readout, readout_bias, weight_std, input_std, bias_std, readout_std)
    xi = Input("xi", input_dim, positions=POSITIONS)
    h = Carry("h_prev", WIDTH, POSITIONS)
    args = (weight_std, input_std, bias_std, parametrization)
    z = nonlin("sigmoid", _gate_pre("_z", h, xi, *args), name="z")
    r = nonlin("sigmoid", _gate_pre("_r", h, xi, *args), name="r")
    reset = Nonlin(Lambda((_A, _B), _A * _B), (r, h), name="r*h")
    c = nonlin("tanh", _gate_pre("_h", reset, xi, *args), name="c")
    h_new = Nonlin(Lambda((_A, _B, _C), _A * _B + (1 - _A) * _C), (z, h, c), name="h")
    states = Scan(h, h_new, None, "h")
    return _recurrent_program(states, readout, readout_std, bias_std, parametrization,
                              readout_bias, f"gru_{readout}")


def lstm(weight_std=1.0, input_std=1.0, bias_std=None, readout="last", parametrization="ntk",
         readout_std=1.0, input_dim=D_IN, readout_bias=True) -> Program:
    """A long short-term memory cell (Hochreiter & Schmidhuber 1997), in the common form with a
    forget gate (Gers, Schmidhuber & Cummins 2000), sigma the logistic sigmoid:

    i^t = sigma(W_i h^{t-1} + U_i xi^t + b_i),   f^t = sigma(W_f h^{t-1} + U_f xi^t + b_f),
    o^t = sigma(W_o h^{t-1} + U_o xi^t + b_o),   g^t = tanh(W_g h^{t-1} + U_g xi^t + b_g),
    c^t = f^t * c^{t-1} + i^t * g^t,   h^t = o^t * tanh(c^t),   h^0 = c^0 = 0,

    f = v . Pool(h) / sqrt(n).  The two states are one ``Scan`` over h with the cell c as a
    coupled carry; h^t reads the node c^t itself.
    """
    _check_recurrent(readout, readout_bias, weight_std, input_std, bias_std, readout_std)
    xi = Input("xi", input_dim, positions=POSITIONS)
    h, c = Carry("h_prev", WIDTH, POSITIONS), Carry("c_prev", WIDTH, POSITIONS)
    args = (weight_std, input_std, bias_std, parametrization)
    i = nonlin("sigmoid", _gate_pre("_i", h, xi, *args), name="i")
    f = nonlin("sigmoid", _gate_pre("_f", h, xi, *args), name="f")
    o = nonlin("sigmoid", _gate_pre("_o", h, xi, *args), name="o")
    g = nonlin("tanh", _gate_pre("_g", h, xi, *args), name="g")
    c_new = Nonlin(Lambda((_A, _B, _C, _D), _A * _B + _C * _D), (f, c, i, g), name="c")
    h_new = Nonlin(Lambda((_A, _B), _A * sp.tanh(_B)), (o, c_new), name="h")
    states = Scan(h, h_new, None, "h", coupled=[(c, c_new, None)])
    return _recurrent_program(states, readout, readout_std, bias_std, parametrization,
                              readout_bias, f"lstm_{readout}")


def cnn(channels=(WIDTH, WIDTH), filter_shape=(3, 3), activation="relu", padding="SAME",
        strides=None, pool=None, readout="gap", weight_std=1.0, bias_std=None,
        parametrization="ntk", input_channels=D_IN, readout_bias=True) -> Program:
    """A convolutional network as a ``stax.serial`` of Conv -> activation blocks, then global
    average pooling (``readout="gap"``) or ``"flatten"``, then a Dense(1) readout:

        h^l = W^l * x^{l-1} + b^l,  x^l = phi(h^l)  [-> AvgPool],  f = v . pool(x^L) + b_out

    One block per entry of ``channels`` (numbers, or the width symbol n: the kernel does not
    depend on them in NTK parametrization).  ``filter_shape`` is one shape (a tuple, or an int
    for 1-D) for every layer, or a *list* with one shape per layer; its length (1 or 2) sets 1-D
    signals (N, T, C) or 2-D images (N, H, W, C).  ``padding`` (``"SAME"``, ``"VALID"``,
    ``"CIRCULAR"``), ``strides`` and ``pool`` likewise: one value, or a list per layer.  ``pool=(window, strides, padding)`` (or a list per layer, None to skip) adds
    an AvgPool after the activation.  Neural Tangents' conventions: ``Conv(c, filter_shape,
    strides, padding, W_std=weight_std, b_std=bias_std, parameterization=...)`` with fan-in
    C_in * prod(filter), input kernel x.x'/C per pixel pair; ``bias_std=None``: no biases.
    """
    if isinstance(channels, (int, sp.Expr)):
        channels = (channels,)
    channels = tuple(channels)
    if not channels:
        raise ProgramError("cnn needs at least one convolutional layer (channels=(...))")
    L = len(channels)
    _check_arguments(L, weight_std, bias_std, readout_bias)
    if readout not in ("gap", "flatten"):
        raise ProgramError(f"readout must be 'gap' (global average pooling) or 'flatten', "
                           f"got {readout!r}")

    def per_layer(value, what):
        """A list gives one entry per layer; anything else is one value for every layer."""
        if not isinstance(value, list):
            return [value] * L
        if len(value) != L:
            raise ProgramError(f"{what} has {len(value)} entries for {L} layers")
        return value

    filters = per_layer(filter_shape, "filter_shape")
    first = filters[0]
    rank = 1 if isinstance(first, int) else len(first)
    if rank not in (1, 2):
        raise ProgramError(f"filter_shape {first!r}: 1-D or 2-D convolutions only")
    paddings = per_layer(padding, "padding")
    stride_list = per_layer(strides, "strides")
    pools = per_layer(pool, "pool")
    axes = ("t",) if rank == 1 else ("h", "w")
    x = Input("x", input_channels, positions=axes)
    wvar = _variance(weight_std, "weight_std")
    for l, (c, f, pad, st, pl) in enumerate(zip(channels, filters, paddings, stride_list, pools),
                                            start=1):
        f = (f,) * rank if isinstance(f, int) else tuple(f)
        size = int(sp.prod(f))
        W = Weight(f"W{l}", fan_out=c, fan_in=x.dim * size, variance=wvar,
                   parametrization=parametrization)
        h = Conv(W, x, f, st, pad, name=f"conv{l}")
        if bias_std is not None:
            h = h + Bias(f"b{l}", dim=c, variance=_variance(bias_std, "bias_std"),
                         parametrization=parametrization)
        x = nonlin(activation, h.named(f"h{l}"), name=f"x{l}")
        if pl is not None:
            window, pst, ppad = pl
            x = AvgPool(x, window, pst, ppad, name=f"pool{l}")
    pooled = Pool(x, "mean" if readout == "gap" else "flatten", name="gap" if readout == "gap"
                  else "flat")
    return Program(_readout(pooled, weight_std, bias_std, parametrization, readout_bias),
                   name=f"cnn{L}")
