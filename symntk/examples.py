"""Programs from the papers where the gradient independence assumption is (or is not) exact.

Each function returns an ordinary :class:`~symntk.program.Program`; the derivation scripts, the
tests and ``symntk compare`` share these definitions (exact calculus: TP3 Box 1; the Simple GIA
Check: TP2 §5 Condition 1, TP3 App. C).
"""
from __future__ import annotations

import sympy as sp

from .program import (Bias, FixedReadout, Input, Nonlin, Program, Readout, Weight, nonlin)

__all__ = ["tp2_section_6_3", "square_readout", "ata_v", "semicircle", "tied_readout_embedding",
           "mean_pooled_readout", "trained_readout_square", "bias_reuse"]

_a = sp.Symbol("a", real=True)


def tp2_section_6_3() -> Program:
    """TP2 §6.3 / TP3 App. C: x^1 = W^1 xi + 1 (at xi = 0, x^1 = 1), h^2 = W^2 x^1,
    x^2 = (h^2)^2, y = 1^T x^2 / n.  The gradient dx^1 = 2 W^2T W^2 1 has mean 2 and second moment
    8; GIA says 0 and 4.  (Our FixedReadout scales by 1/sqrt(n): same cotangent dx^2 = 1.)"""
    xi = Input("xi", 1)
    x1 = (Weight("W1", fan_in=1) @ xi + 1).named("x1")
    h2 = (Weight("W2") @ x1).named("h2")
    return Program(FixedReadout(Nonlin(sp.Lambda(_a, _a ** 2), (h2,), "x2")), name="tp2_sec6_3")


def square_readout(d: int = 1) -> Program:
    """A minimal O(1) NTK counterexample to the Simple GIA Check (TP2 Condition 1; the fixed
    all-ones readout has nonzero mean): x^1 = U xi, h = W x^1, f = sum_a h_a^2 / (2 sqrt n).
    Exact Theta = 3 c^2, GIA 2 c^2, c = xi.xi'/d."""
    xi = Input("xi", d)
    x1 = (Weight("U", fan_in=d) @ xi).named("x1")
    h = (Weight("W") @ x1).named("h")
    return Program(FixedReadout(Nonlin(sp.Lambda(_a, _a ** 2 / 2), (h,), "y")), name="square_readout")


def trained_readout_square(d: int = 1) -> Program:
    """The ``square_readout`` network with a trained zero-mean readout f = v^T h^2/(2 sqrt n):
    the Simple GIA Check holds and exact = GIA."""
    xi = Input("xi", d)
    x1 = (Weight("U", fan_in=d) @ xi).named("x1")
    h = (Weight("W") @ x1).named("h")
    y = Nonlin(sp.Lambda(_a, _a ** 2 / 2), (h,), "y")
    return Program(Readout(Weight("v", fan_out=1), y), name="trained_readout_square")


def ata_v() -> Program:
    """TP3 Examples 2.5, 2.8: y = A v, x = A^T y with v ~ N(0, 1):
    E Z^v Z^x = 1 and E (Z^x)^2 = 2 (GIA: 0 and 1)."""
    v = Bias("v")
    A = Weight("A")
    y = (A @ v).named("y")
    x = (A.T @ y).named("x")
    return Program(Readout(Weight("r", fan_out=1), x), name="ata_v", require_input=False)


def semicircle(steps: int = 8) -> tuple[Program, list]:
    """TP3 §3: A = W + W^T with W ~ N(0, 1/(2n)); z^t = W z^{t-1} + W^T z^{t-1}, z^0 ~ N(0, 1).
    E Z^{z^0} Z^{z^t} is the t-th moment of the semicircle law: Catalan numbers at even t, 0 at odd.
    Returns the program and the list [z^0, ..., z^steps]."""
    W = Weight("W", variance=sp.Rational(1, 2))
    z = [Bias("z0")]
    for t in range(1, steps + 1):
        z.append((W @ z[-1] + W.T @ z[-1]).named(f"z{t}"))
    return Program(Readout(Weight("r", fan_out=1), z[-1]), name="semicircle",
                   require_input=False), z


def tied_readout_embedding(act="relu", d: int = 3) -> Program:
    """A readout tied to the (activated) input embedding: e = U xi, x = phi(e), h = W x,
    f = x^T phi(h) / sqrt(n).  The readout vector x is computed by the network, so the Simple GIA
    Check fails; exact mode adds Zdot^{W^T dh} = sigma^2 Z^x E[phi''(h)] E[phi(e)]."""
    xi = Input("xi", d)
    e = (Weight("U", fan_in=d) @ xi).named("e")
    x = nonlin(act, e, name="x")
    h = (Weight("W") @ x).named("h")
    return Program(Readout(x, nonlin(act, h, name="y")), name="tied_readout_embedding")


def mean_pooled_readout(act="relu", d: int = 3) -> Program:
    """A two-layer network read out by an all-ones (mean-pooling, nonzero-mean) readout:
    x^1 = phi(U xi), h = W x^1, f = sum_a phi(h_a) / sqrt(n).  dh = phi'(h) has nonzero mean, so
    Zdot^{W^T dh} = sigma^2 Z^{x^1} E[phi''(h)] differs from GIA's zero."""
    xi = Input("xi", d)
    x1 = nonlin(act, (Weight("U", fan_in=d) @ xi).named("e"), name="x1")
    h = (Weight("W") @ x1).named("h")
    return Program(FixedReadout(nonlin(act, h, name="y")), name="mean_pooled_readout")


def bias_reuse(act="tanh", d: int = 2) -> Program:
    """A readout vector reused as a hidden bias, every parameter trained:
    h = W U xi / sqrt(n) + v, f = v^T phi(h) / sqrt(n).  The readout v is also a preactivation's
    summand, so the Simple GIA Check fails, and the NTK's expectations contain Z^v both linearly
    (as the readout) and inside phi: E[(Z^v)^2 phi'(h) phi'(h')] over three correlated Gaussians,
    which Stein's lemma reduces to expectations over (h, h') (TP2 Lemma F.4)."""
    xi = Input("xi", d)
    e = (Weight("U", fan_in=d) @ xi).named("e")
    v = Bias("v")
    h = (Weight("W") @ e + v).named("h")
    return Program(Readout(v, nonlin(act, h, name="y")), name="bias_reuse")
