"""symntk: infinite-width NNGP and NTK of any tensor program, derived symbolically.

Pipeline (one idea per module, data flowing one way)::

    program (IR)  ->  derive (Z calculus)  ->  Derivation  ->  latex / evaluate / compile
    program (IR)  ->  sample (finite width)  ->  empirical_ntk, monte_carlo, convergence

The two meet only in tests, benchmarks, ``compare`` and ``convergence``.

Quick start::

    import symntk
    d = symntk.derive(symntk.mlp(depth=3, activation="relu", bias_std=0.1))
    print(d.latex())
    k = d.gram(X)          # k.nngp, k.ntk
"""
from .program import (AvgPool, BatchNorm, Bias, Carry, Concat, Conv, Dropout, Embedding, FixedReadout, Input,
                      MatMul, Moment, Nonlin, OutputBias, Pool, Program, ProgramError, Readout,
                      Repeat, Scan, Transpose, Vector, VectorReadout, Weight, WIDTH, concat, dropout,
                      nonlin, repeat, scan)
from .builders import cnn, gru, lstm, mlp, residual_mlp, rnn, stacked_rnn, tied_mlp
from .program import Aggregate
from .graphs import gnn
from .activations import JumpWarning
from .derivation import derive
from .equations import Derivation, Equation, Loop
from .evaluate import gram
from .result import KernelResult
from .gia import GIACheck, gia_check
from .limits import expectation
from .compare import Comparison, compare
from .finite import FiniteNetwork, empirical_ntk, monte_carlo, sample
from .convergence import convergence, plot_convergence
from .predict import Prediction, Predictor, gp_posterior, gradient_descent_mse
from . import examples
from .attention import Attention, LayerNorm, nt_attention_network, transformer
from .batchnorm import batchnorm_mlp

__version__ = "0.1.0"

__all__ = [
    "AvgPool", "BatchNorm", "batchnorm_mlp", "Bias", "Carry", "Concat", "Conv", "Dropout", "Embedding", "FixedReadout", "Input",
    "MatMul", "Moment", "Nonlin", "OutputBias", "Pool", "Program", "ProgramError", "Readout",
    "Repeat", "Scan", "Transpose", "Vector", "VectorReadout", "Weight", "WIDTH", "concat",
    "dropout", "nonlin", "repeat", "scan", "mlp", "cnn", "residual_mlp", "tied_mlp", "rnn",
    "stacked_rnn", "gru", "Aggregate", "gnn",
    "lstm", "Derivation", "Equation",
    "Loop", "derive", "JumpWarning", "KernelResult", "gram", "kernel", "compile", "activation", "GIACheck",
    "gia_check", "expectation", "Comparison", "compare", "examples", "FiniteNetwork", "empirical_ntk",
    "monte_carlo", "sample", "convergence", "plot_convergence",
    "Prediction", "Predictor", "gradient_descent_mse", "gp_posterior",
    "Attention", "LayerNorm", "transformer", "nt_attention_network",
]


def activation(spec):
    """A nonlinearity as a SymPy expression in x: a name, ``"leaky_relu(0.2)"``, or a formula."""
    from .activations import activation as _activation
    return _activation(spec)


def compile(derivation, **options):
    """Compile a derivation to a cached Numba kernel: ``k = symntk.compile(d); k(X1, X2)``.

    Options: see :func:`symntk.kernels.compile` (quadrature rule and orders, ``cache``).
    """
    from .kernels import compile as _compile
    return _compile(derivation, **options)


def kernel(program, X1, X2=None, mode: str = "gia", params=None, jumps: str = "warn",
           mask1=None, mask2=None, adjacency1=None, adjacency2=None) -> KernelResult:
    """One call: derive ``program``, compile it (cached) and return its NNGP/NTK Gram matrices.

    Derivations the code generator does not handle yet fall back to the NumPy evaluator.
    ``jumps``: see :func:`symntk.derive`.  ``mask1``/``mask2`` (N, T): sequences of different
    lengths padded into one batch, 1 on tokens and 0 on the padding after them
    (:mod:`symntk.masks`): the kernels of the unpadded sequences.  A graph program (with
    ``Aggregate`` steps, :mod:`symntk.graphs`) takes X (N, P, d), the adjacency matrices
    ``adjacency1``/``adjacency2`` (N, P, P), and node masks (N, P) for graphs of different node
    counts padded to P (padded nodes contribute nothing).
    """
    k = derive(program, mode=mode, jumps=jumps).kernel_function(stacklevel=2)
    if getattr(k, "takes_graphs", False) or getattr(k, "takes_masks", False):
        return k(X1, X2, params=params, adjacency1=adjacency1, adjacency2=adjacency2,
                 mask1=mask1, mask2=mask2)
    if adjacency1 is not None or adjacency2 is not None:
        raise ValueError("adjacency matrices given but the program has no Aggregate step")
    if mask1 is None and mask2 is None:
        return k(X1, X2, params=params)
    from .masks import masked_gram
    return masked_gram(k, X1, X2, mask1, mask2, params=params)
