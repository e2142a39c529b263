"""Builders for common architectures.  Each returns an ordinary :class:`~symntk.program.Program`.

Conventions follow Neural Tangents' ``stax`` (theory §1.5, §2.5) so numbers can be checked against
it: ``Dense(out, W_std=weight_std, b_std=bias_std, parameterization="ntk")`` layers, input kernel
``x.x'/d``, and a ``Dense(1)`` readout with the same ``weight_std``/``bias_std`` and its own bias.
"""
from __future__ import annotations

import sympy as sp

from .program import (WIDTH, Bias, Input, OutputBias, Program, ProgramError, Readout, Vector,
                      Weight, nonlin, repeat)
from .program import _variance as _check_variance

__all__ = ["mlp", "residual_mlp", "tied_mlp"]

D_IN = sp.Symbol("d", positive=True, integer=True)


def _number(value, what: str) -> sp.Expr:
    """A builder's scalar argument as SymPy: a number or a SymPy expression, never text."""
    if isinstance(value, (str, bool)) or value is None:
        raise ProgramError(f"{what} must be a number or a SymPy expression, got {value!r}")
    try:
        expr = sp.sympify(value, strict=True)
    except (sp.SympifyError, TypeError) as exc:
        raise ProgramError(f"{what} must be a number or a SymPy expression, got {value!r}") from exc
    if not isinstance(expr, sp.Expr):
        raise ProgramError(f"{what} must be a scalar expression, got {value!r}")
    return expr


def _std(std, what: str) -> sp.Expr:
    """A standard deviation sigma: finite, real and non-negative (a number or a SymPy expression
    not known to be otherwise), made exact where it is a number (1.4 -> 7/5)."""
    _number(std, what)
    return sp.nsimplify(_check_variance(std, what))


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
    return sp.nsimplify(expr)


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
    D C over every pair of uses of W, so cross-layer kernels enter (theory §3.1).
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
