"""NTK parametrizations: how a parameter's variance enters its NTK term.

A weight ``W`` (fan-in ``m``, variance ``sigma^2``) contributes ``factor * sum D[y, y'] C[z, z']``
to the NTK, TP2 Eq. (12), and a bias ``factor_b * D[b, b']``.  The factor depends on which
quantity is trained:

================  ==============================  ==============  ===================
parametrization   W                               weight factor   bias factor
================  ==============================  ==============  ===================
``"ntk"``         ``sigma/sqrt(m) * omega``,      ``sigma^2``     ``sigma_b^2``
                  omega ~ N(0, 1) trained         (Jacot et al. 2018; Neural Tangents)
``"tp"``          ``omega/sqrt(m)``,              ``1``           ``1``
                  omega ~ N(0, sigma^2) trained   (TP2 Cor. 7.3, TP2b Setup 5.2)
``"standard"``    W ~ N(0, sigma^2/m) trained     ``m``           ``1``
================  ==============================  ==============  ===================

The forward pass (and so the NNGP) is the same in all three; only the gradient's scale differs.
For a finite network the raw gradient dF/dW is ``1/m`` times the limit's scale, so the factor on
``<dF/dW, dF'/dW>`` is ``weight_factor / m`` (:func:`raw_weight_factor`).
"""
from __future__ import annotations

from sympy import S

__all__ = ["PARAMETRIZATIONS", "weight_factor", "bias_factor", "raw_weight_factor"]

#: parametrization -> (weight factor (variance, fan_in), bias factor (variance))
_FACTORS = {
    "ntk": (lambda variance, fan_in: variance, lambda variance: variance),
    "tp": (lambda variance, fan_in: S.One, lambda variance: S.One),
    "standard": (lambda variance, fan_in: fan_in, lambda variance: S.One),
}

PARAMETRIZATIONS = tuple(_FACTORS)


def _rules(parametrization: str):
    try:
        return _FACTORS[parametrization]
    except KeyError:
        raise ValueError(f"unknown parametrization {parametrization!r}; expected one of "
                         f"{PARAMETRIZATIONS}") from None


def weight_factor(parametrization: str, variance, fan_in):
    """Multiplier of a weight's ``sum_{uses} D C`` in the NTK (TP2 Eq. 12)."""
    return _rules(parametrization)[0](variance, fan_in)


def raw_weight_factor(parametrization: str, variance, fan_in):
    """Multiplier of ``<dF/dW, dF'/dW>`` (the raw matrix gradient of a finite network)."""
    return weight_factor(parametrization, variance, fan_in) / fan_in


def bias_factor(parametrization: str, variance):
    """Multiplier of a bias's ``D[b, b']`` in the NTK."""
    return _rules(parametrization)[1](variance)
