"""Numba code generation: a :class:`~symntk.derivation.Derivation` becomes a Python module on disk.

Stage 4 of the pipeline (program, derivation, printers and code generators): plain data in (the
derivation's equations), plain text out (a module of two ``numba.njit(cache=True)`` functions),
nothing calls back up.

``per_input(q, ...)``
    everything that depends on one input only, for every row: the "copy 0" half of the
    derivation (the diagonal kernels ``C_h_00[l]`` of the MLP recursion, TP2 Eq. 6), the
    per-input factors the pair code needs (``1/sqrt(Sigma_00)``, ...), and the whole
    ``derivation.diagonal`` system, whose NNGP/NTK are the exact k(x, x) (no
    ``sqrt(q q' - K^2)`` cancellation).
``pairs(T1, T2, ...)``
    a ``prange`` over rows computing only the mixed symbols (copies 0 and 1) and the outputs.
    Columns go in chunks of :data:`CHUNK`: every straight segment and every loop body is an
    innermost loop over the chunk, which LLVM vectorises (``acos``/``asin`` are polynomials in
    the module, not libm calls: NumPy's SIMD ``arccos`` would otherwise be ~9x faster per
    element than the compiled kernel's).  Per-input values are read from the two tables ``T1``
    (rows of X1) and ``T2`` (X2, transposed so a chunk reads contiguous memory).

How the text is made:

1. Gaussian-expectation nodes without a closed form become calls ``Q3(s1, s2, rho)`` of their
   whitening parameters (2-D Gauss-Hermite, as in Neural Tangents' ``ElementwiseNumerical``);
   calls that share their arguments are later evaluated in one quadrature loop.
2. The equations are the derivation's numeric form (:mod:`symntk.numerics`, shared with the
   NumPy evaluator): arc-cosine closed forms read ``1 - rho`` from squared distances carried
   through the recursion (``||xi - xi'||^2/d`` is staged by the driver), and variances in negative
   powers are ``SafePow`` (zero when the variance is zero: the closed-form table's limit).
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

Repeated blocks stay loops: arrays are indexed by the layer and sized from the loop
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

from ..equations import Derivation
from .cache import (CacheWarning, cache_dir, cache_info, clear_cache, drop_numba_cache,
                    fingerprint, load_module, read_manifest, source_hash, write_manifest)
from .hoisting import Hoister
from .module import (ASIN_COEFFS, CODEGEN_VERSION, MODULE_PREFIX, GeneratedKernel,
                     asin_coefficients, helpers_source, module_source)
from .plan import Plan, SafePow, class0_twins, structural
from .printer import NumbaPrinter
from .quadrature import QuadCalls

__all__ = ["CODEGEN_VERSION", "MODULE_PREFIX", "ASIN_COEFFS", "NumbaPrinter", "SafePow",
           "GeneratedKernel", "generate", "load_module", "drop_numba_cache", "cache_dir",
           "cache_info", "clear_cache", "CacheWarning", "asin_coefficients", "helpers_source"]


def generate(derivation: Derivation, rule: str = "polar", params: dict | None = None,
             mehler: bool = True) -> GeneratedKernel:
    """Generate the kernel module text for ``derivation`` (see the module docstring).

    ``rule``: the 2-D quadrature for expectations without a closed form, ``"polar"`` (split at
    the kinks, default) or ``"hermite"`` (tensor Gauss-Hermite).  ``params`` binds only
    structural symbols (loop bounds); variances stay arguments.  ``mehler``: separable smooth
    2-D expectations of the pair code by Mehler's formula (:mod:`symntk.codegen.mehler`).
    """
    if rule not in ("polar", "hermite"):
        raise ValueError(f"unknown quadrature rule {rule!r}; expected 'polar' or 'hermite'")
    if derivation.diagonal is None:
        raise ValueError("the derivation has no diagonal system (derive() always makes one)")
    inputs = derivation.program.inputs
    if len(inputs) != 1:
        raise NotImplementedError("programs with several Input nodes are not compiled yet")
    bound = structural(derivation, params)
    key_ = fingerprint(derivation, rule if not mehler else rule + "+mehler", bound)
    known = read_manifest(key_)
    if known is not None:
        return known
    quads = QuadCalls()
    pair = Plan(derivation, bound, quads)
    diag = Plan(derivation.diagonal, bound, quads)
    twins = class0_twins(pair)
    h = Hoister(pair, twins)
    h.forward()
    h.per_input()
    pair_inputs = [s for s, f in pair.families.items() if f.kind == "input" and f.cls == "pair"]
    distances = [s for s in pair_inputs if pair.inputs[s].extra.get("distance")]
    pair_inputs = [s for s in pair_inputs if s not in distances]
    if len(pair_inputs) > 1 or len(distances) > 1:
        raise NotImplementedError("more than one cross-input kernel symbol")
    params_all = sorted(set(pair.params) | set(diag.params), key=str)
    params_all = [p for p in params_all if p not in pair.inputs and p not in diag.inputs]
    src, width, slots = module_source(pair, diag, twins, h, params_all, pair_inputs, rule,
                                      distances, mehler=mehler)
    terms = [n[1] for n, _ in pair.outputs if isinstance(n, tuple)]
    gen = GeneratedKernel(src, source_hash(src), params_all, width, derivation.nngp is not None,
                          terms, [str(s) for s in pair_inputs], rule,
                          distance_inputs=[str(s) for s in distances], mehler_slots=slots)
    write_manifest(key_, gen)
    return gen
