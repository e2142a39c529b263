"""Compiled NNGP/NTK kernels: the object returned by ``Derivation.compile()`` and its Gram drivers.

``k = symntk.compile(derivation)`` generates and loads the module of :mod:`symntk.codegen`
(compiling it once, or loading Numba's cache), then ``k(X1, X2=None)`` returns a
:class:`~symntk.result.KernelResult` of float64 (N1, N2) matrices:

1. ``per_input`` runs once over the rows of X1 (and of X2): the per-input table and the exact
   diagonal from ``derivation.diagonal``;
2. the input kernel x.x' is computed by BLAS *into the NTK output*, in fixed 256 x 256 tiles (so
   that a block of the matrix computed alone rounds exactly as the whole; on one BLAS thread:
   OpenBLAS's idle workers would spin against Numba's threads); ``pairs`` (a ``prange`` over rows,
   vectorised over chunks of columns) reads each entry and overwrites it with the kernel.  The working memory beyond
   the output matrices is the per-input tables, O((N1 + N2) x table width), and a few hundred
   bytes of scratch per thread: never an (N1, N2, n_symbols) array, and no staging buffer.
   Rows can be processed in blocks (``block_rows``); memory does not depend on it, and one
   block is fastest (every block hands the cores from BLAS's threads to Numba's and back);
3. with ``X2 = None`` only j > i is computed, the lower triangle is mirrored and the diagonal is
   the diagonal system's.  The pair formulas agree with it to rounding at identical inputs: they
   read ``1 - c`` from squared distances (``||xi - xi'||^2/d``, staged in the NNGP output by
   :func:`symntk.result.squared_distances`), not from ``c`` (:mod:`symntk.numerics`).

The two passes are also entry points of their own, for blockwise drivers (:mod:`symntk.dask`,
:mod:`symntk.matfree`): ``k.tables(X, theta)`` (step 1 for some rows, an :class:`InputTables`)
and ``k.block(t1, t2, theta)`` (steps 2-3 for two row ranges).  A compiled kernel pickles without
its module and reloads it from the kernel cache (worker processes).

Quadrature (expectations without closed forms, the V-transforms of TP2 Def. E.1): the node and
weight arrays of :mod:`symntk.quadrature` are *arguments* of the jitted functions (never
callables), so the orders are options of :func:`compile` that need no recompilation.

* 2-D, ``rule="polar"`` (default): polar coordinates in the whitened plane.  The kinks of
  activations at 0 (``u1 = 0``, ``u2 = 0``) are rays, so the angle is split there and each arc
  gets Gauss-Legendre (``angular_order`` nodes); the radius a Gauss rule for the weight
  ``rho exp(-rho^2/2)`` (``radial_order`` nodes).  ReLU-like kinks are integrated to rounding
  error, smooth integrands converge exponentially: with the default (32, 24) the error is
  ~1e-13 for tanh at variance <= 2 and ~1e-10 at variance 6 (see ``tests/test_codegen.py``).
* 2-D, ``rule="hermite"``: tensor Gauss-Hermite (``hermite_order`` per axis) on the whitened
  Gaussian, the textbook rule; exponential for entire integrands, slow for tanh at large variance
  and only ~1/n for kinks.
* 1-D: a Gauss rule for ``exp(-z^2/2)`` on [0, inf) on each side of the kink at 0
  (``half_order`` nodes).
* k >= 3: tensor Gauss-Hermite of order ``kd_order`` after a semidefinite Cholesky factor.
"""
from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from . import codegen
from .binding import bind, bind_parameters
from .quadrature import QUADRATURE, rule_arrays
from .result import KernelResult, check_pair, squared_distances

__all__ = ["CompiledKernel", "InputTables", "compile", "as_compiled", "block_size", "STAGE_TILE"]


@dataclass(frozen=True)
class InputTables:
    """The per-input half of a kernel evaluation for some rows of a data matrix (float64):
    the rows ``X`` (n, d), the table ``T`` (n, width) the pair pass reads, the exact diagonal
    ``nngp``, ``ntk`` (n,) and ``terms`` (n_terms, n) of k(x, x), and ``M`` (n, slots, K + 2)
    the Hermite coefficients of the expectations the pair pass takes by Mehler's formula
    (:mod:`symntk.codegen.mehler`; None if there are none)."""
    X: np.ndarray
    T: np.ndarray
    nngp: np.ndarray
    ntk: np.ndarray
    terms: np.ndarray
    M: np.ndarray | None = None

    def __len__(self) -> int:
        return self.X.shape[0]

    def rows(self, i0: int, i1: int) -> "InputTables":
        """The tables of rows i0..i1-1 (views)."""
        return InputTables(self.X[i0:i1], self.T[i0:i1], self.nngp[i0:i1], self.ntk[i0:i1],
                           self.terms[:, i0:i1], None if self.M is None else self.M[i0:i1])


# =========================================================================== the kernel
class CompiledKernel:
    """A derivation compiled to Numba; call it on data.

    ``k(X1, X2=None, params=None, diagonal=False, max_memory=None, terms=False,
    block_rows=None)``

    * ``X1`` (N1, d), ``X2`` (N2, d) or None (then X2 = X1: symmetric, half the work, exact
      diagonal);
    * ``params``: values of the derivation's free symbols (variances), by symbol or name; the
      input dimension ``d`` comes from the data;
    * ``diagonal=True``: only k(x, x) for the rows of X1 (arrays of shape (N1,));
    * ``max_memory`` (bytes): a cap on the estimated peak of the call (outputs and tables);
      ``MemoryError`` naming the sizes if it cannot be met;
    * ``terms=True``: also ``ntk_terms`` (one (N1, N2) matrix per parameter; extra memory), else
      ``ntk_terms`` is ``{}`` (the compiled path computes the terms anyway, storing is opt-in);
    * ``block_rows``: rows per block of the pair phase (default: all rows in one block).

    Non-finite results (a recursion that overflows float64, e.g. exp(exp(...))) are counted by
    the kernel and reported with a ``RuntimeWarning``; inputs with NaN/inf are rejected.
    """

    def __init__(self, derivation, generated: codegen.GeneratedKernel, module, cached: bool,
                 options: dict):
        self.derivation = derivation
        self.generated = generated
        self.module = module
        self.cached = cached
        self.options = dict(options)
        self._rules = rule_arrays(self.options)
        self._dim = derivation.program.inputs[0].dim

    # ------------------------------------------------------------------ introspection
    @property
    def source(self) -> str:
        """The generated module text."""
        return self.generated.source

    @property
    def path(self) -> str | None:
        """The module file in the cache directory (None when compiled without the cache)."""
        return getattr(self.module, "__file__", None) if self.cached else None

    def cache_stats(self) -> dict:
        """Numba's cache statistics of the two jitted functions (hits and misses)."""
        out = {}
        for name in ("per_input", "pairs"):
            st = getattr(self.module, name).stats
            out[name] = {"cache_hits": sum(st.cache_hits.values()),
                         "cache_misses": sum(st.cache_misses.values())}
        return out

    def __repr__(self):
        where = self.path or "memory (uncached)"
        return (f"<CompiledKernel {self.derivation.program.name!r} rule={self.options['rule']} "
                f"params={[str(p) for p in self.generated.params]} at {where}>")

    # ------------------------------------------------------------------ calls
    def _theta(self, params, dim: int) -> np.ndarray:
        """The parameter vector of the generated functions (the input dimension comes from the
        data; :func:`symntk.binding.bind_parameters` names what is missing)."""
        values, missing = bind(self.generated.params,
                               bind_parameters(self.derivation, params, dim))
        if missing:
            raise ValueError(f"unbound symbols {missing}: pass them in params=")
        vals = [float(values[p]) for p in self.generated.params]
        theta = np.array(vals, dtype=np.float64)
        if not np.all(np.isfinite(theta)):
            raise ValueError("params must be finite, got "
                             f"{dict(zip(map(str, self.generated.params), vals))}")
        return theta

    def theta(self, params=None, dim: int | None = None) -> np.ndarray:
        """The parameter vector ``theta`` of :meth:`tables` and :meth:`block` (``params`` as in
        a call; ``dim`` the input dimension, the program's when it is a number)."""
        if dim is None:
            dim = _dim_or(self._dim, None)
            if dim is None:
                raise ValueError(f"the program's input dimension {self._dim} is symbolic: pass dim")
        return self._theta(params, int(dim))

    def tables(self, X, theta: np.ndarray) -> InputTables:
        """The per-input pass over the rows of ``X`` (checked by the caller): each row's table of
        one-input quantities (the diagonal recursions, e.g. Sigma^l(x, x) of TP2 Eq. 6) and its
        exact diagonal k(x, x).  Rows are independent, so the tables of a row range are the rows
        of the tables: compute them once and share them between all blocks of a Gram matrix."""
        g = self.generated
        X = np.ascontiguousarray(X, dtype=np.float64)
        q = np.ascontiguousarray(np.einsum("ij,ij->i", X, X) / X.shape[1])
        n = X.shape[0]
        T = np.empty((n, g.table_width))
        dn, dk = np.empty(n), np.empty(n)
        dt = np.empty((max(len(g.term_names), 1), n))
        self.module.per_input(q, theta, *self._rules, T, dn, dk, dt)
        return InputTables(X, T, dn, dk, dt, self._mehler_tables(T, theta))

    def _mehler_tables(self, T: np.ndarray, theta: np.ndarray):
        """Hermite coefficients per input of the expectations the pair pass takes by Mehler's
        formula: the generated ``mehler_samples`` samples the integrands (chunks of rows), the
        precompiled :func:`~symntk.codegen.mehler_runtime.hermite_tables` transforms them."""
        slots = self.generated.mehler_slots
        if not slots:
            return None
        from .codegen.mehler import ORDER
        from .codegen.mehler_runtime import grid, hermite_tables
        n, m = T.shape[0], grid().size
        M = np.empty((n, slots, ORDER + 2))
        chunk = max(1, min(n, (32 << 20) // (8 * slots * m)))       # samples: <= 32 MB
        fv = np.empty((chunk, slots, m))
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            self.module.mehler_samples(T, theta, fv[:i1 - i0], i0)
            hermite_tables(fv[:i1 - i0], M[i0:i1])
        return M

    def block(self, t1: InputTables, t2: InputTables | None, theta: np.ndarray, *,
              terms: bool = False, block_rows: int | None = None,
              groups: int | None = None) -> tuple[KernelResult, int]:
        """The pair pass: the (len(t1), len(t2)) block of the Gram matrices from two tables.

        ``t2=None`` is the symmetric block of ``t1`` with itself: only j > i is computed, the
        lower triangle mirrored and the diagonal is the exact one of the tables.  Returns the
        block and the number of non-finite NTK entries.  Every entry depends on its two rows'
        tables and inputs only, so a matrix assembled from blocks equals one call bit for bit.
        """
        g = self.generated
        sym = t2 is None
        t2 = t1 if sym else t2
        X1, X2 = t1.X, t2.X
        n1, n2 = X1.shape[0], X2.shape[0]
        T2 = np.ascontiguousarray(t2.T.T)
        ntk = np.empty((n1, n2))
        # nngp also stages ||xi - xi'||^2/d for the stable correlations (read before written)
        nngp = np.empty((n1, n2)) if (g.has_nngp or g.distance_inputs) else np.empty((1, 1))
        nt = max(len(g.term_names), 1)
        tarr = np.empty((nt, n1, n2)) if (terms and g.term_names) else np.empty((nt, 1, 1))
        rows = n1 if block_rows is None else max(1, int(block_rows))
        groups = 4 * numba.get_num_threads() if groups is None else int(groups)
        bad = np.zeros(n1, dtype=np.int64)
        if g.pair_inputs or g.distance_inputs:   # stage x.x' in the output (BLAS); pairs reads it
            _stage(X1, X2, ntk, sym)
        if g.distance_inputs:        # from the staged x.x': entrywise, so blockwise == one call
            squared_distances(X1, X2, out=nngp, dots=ntk)
        for r0 in range(0, n1, rows):
            r1 = min(n1, r0 + rows)
            self.module.pairs(t1.T, T2, theta, *self._rules, nngp, ntk, tarr, bool(terms), r0,
                              r1, sym, 1.0 / X1.shape[1], bad, groups, *_mehler_args(t1, t2))
        term_arrays = {}
        if terms:
            term_arrays = {name: tarr[k] for k, name in enumerate(g.term_names)}
        nbad = int(bad.sum())
        if sym:
            mats = [ntk] + ([nngp] if g.has_nngp else []) + list(term_arrays.values())
            diags = [t1.ntk] + ([t1.nngp] if g.has_nngp else []) + \
                [t1.terms[k] for k in range(len(term_arrays))]
            for M, dv in zip(mats, diags):
                symmetrize(M, dv)
            nbad += int(np.count_nonzero(~np.isfinite(t1.ntk)))
        return KernelResult(nngp if g.has_nngp else None, ntk, term_arrays), nbad

    def __call__(self, X1, X2=None, params=None, diagonal: bool = False, max_memory=None,
                 terms: bool = False, block_rows: int | None = None) -> KernelResult:
        g = self.generated
        sym = X2 is None
        X1, X2 = check_pair(X1, X2, self._dim)
        theta = self._theta(params, X1.shape[1])
        n1, n2 = X1.shape[0], X2.shape[0]
        if diagonal:
            t = self.tables(X1, theta)
            _check_finite(int(np.count_nonzero(~np.isfinite(t.ntk))))
            return KernelResult(t.nngp if g.has_nngp else None, t.ntk,
                                {name: t.terms[k] for k, name in enumerate(g.term_names)}
                                if terms else {})
        n_out = (2 if g.has_nngp else 1) + (len(g.term_names) if terms else 0)
        out_bytes = 8 * n_out * n1 * n2
        table_bytes = 8 * (n1 + n2) * (g.table_width + 4 + len(g.term_names))
        if max_memory is not None and out_bytes + table_bytes > int(max_memory):
            raise MemoryError(
                f"max_memory={int(max_memory)} bytes is too small: the {n_out} output "
                f"matrices of shape ({n1}, {n2}) alone need {out_bytes} bytes "
                f"(plus {table_bytes} for per-input tables); raise max_memory, split the "
                "inputs, or ask for diagonal=True")
        t1 = self.tables(X1, theta)
        t2 = None if sym else self.tables(X2, theta)
        result, bad = self.block(t1, t2, theta, terms=terms, block_rows=block_rows)
        _check_finite(bad)
        return result

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        """Everything but the loaded module (a worker process reloads it from the generated
        text: the kernel cache and Numba's cache make that a file read, not a compile)."""
        state = dict(self.__dict__)
        state.pop("module")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.module, self.cached = codegen.load_module(self.generated, use_cache=self.cached)

    # ------------------------------------------------------------------ compilation
    def warm_up(self):
        """Compile (or load from Numba's cache) both functions with the call signatures."""
        X = np.array([[1.0] + [0.0] * (_dim_or(self._dim, 1) - 1),
                      [0.5] * _dim_or(self._dim, 1)])
        theta = np.ones(len(self.generated.params))
        t = self.tables(X, theta)
        T = t.T
        g = self.generated
        n = X.shape[0]
        ntk = np.full((n, n), 0.1)
        nngp = np.empty((n, n))
        tarr = np.empty((max(len(g.term_names), 1), 1, 1))
        if g.distance_inputs:
            nngp = squared_distances(X, X)
        self.module.pairs(T, np.ascontiguousarray(T.T), theta, *self._rules, nngp, ntk, tarr,
                          False, 0, n, True, 1.0, np.zeros(n, dtype=np.int64), 2,
                          *_mehler_args(t, t))
        _mirror(ntk)


@functools.lru_cache(maxsize=None)
def _openblas():
    """(get, set) of the OpenBLAS that NumPy's wheel bundles, or None (MKL, conda, ...)."""
    import ctypes
    import glob
    import os
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)                  # already loaded: the same handle
        except OSError:
            continue
        for stem in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{stem}get_num_threads{suffix}", None)
                put = getattr(lib, f"{stem}set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    return get, put
    return None


#: Rows and columns of the tiles in which x.x' is computed (see :func:`_stage`).
STAGE_TILE = 256


def _stage(X1, X2, out, sym):
    """out[i, j] = x_i . x'_j by BLAS, in STAGE_TILE x STAGE_TILE tiles counted from the first
    row and column (only tiles that reach j > i when ``sym``).  A BLAS product's rounding depends
    on the shape of the call (OpenBLAS picks kernels by size and edge), so a fixed tiling makes
    each entry a function of its tile only: a block whose first row and column are multiples of
    STAGE_TILE (and whose last tile ends where the whole matrix's does) stages exactly the
    entries of one call on the whole matrix.  One BLAS thread (:class:`_quiet_blas`)."""
    n1, n2 = X1.shape[0], X2.shape[0]
    S = STAGE_TILE
    with _quiet_blas():
        for a in range(0, n1, S):
            b = min(n1, a + S)
            A = X1[a:b]
            for c in range(a if sym else 0, n2, S):
                e = min(n2, c + S)
                np.matmul(A, X2[c:e].T, out=out[a:b, c:e])


class _quiet_blas:
    """Run the staging matmul on one BLAS thread.  OpenBLAS's worker threads keep spinning for a
    while after a call, competing for the cores with the Numba threads that come next (measured:
    ~1.3x slower and twice as noisy on 2 cores); one thread costs ~20 ms at N = 4000, d = 100.
    The setting is process-wide: concurrent blocks (threads of a Dask worker) share it, the first
    one in saves it and the last one out restores it."""

    _lock = threading.Lock()
    _active = 0
    _saved = None

    def __enter__(self):
        ctl = _openblas()
        if ctl is None:
            return
        cls = type(self)
        with cls._lock:
            if cls._active == 0:
                cls._saved = ctl[0]()
                ctl[1](1)
            cls._active += 1

    def __exit__(self, *exc):
        ctl = _openblas()
        if ctl is None:
            return
        cls = type(self)
        with cls._lock:
            cls._active -= 1
            if cls._active == 0 and cls._saved is not None:
                ctl[1](cls._saved)


def _check_finite(bad: int):
    """Overflow is reported, not hidden: a kernel like exp(exp(...)) can exceed float64.  The
    pair kernel counts the non-finite NTK entries as it writes them (no extra pass)."""
    if bad:
        warnings.warn(f"{bad} NTK entries are not finite (the recursion overflows float64; the "
                      "inputs were finite)", RuntimeWarning, stacklevel=3)


def _dim_or(dim, default):
    try:
        return int(dim)
    except TypeError:
        return default


def symmetrize(M: np.ndarray, diagonal: np.ndarray) -> None:
    """Complete a symmetric Gram matrix whose entries above the diagonal were computed: mirror
    them below it and set the diagonal (the exact one of the per-input pass)."""
    _mirror(M)
    np.fill_diagonal(M, diagonal)


@njit(parallel=True, cache=True)
def _mirror(A):
    """A[i, j] = A[j, i] below the diagonal, in 64 x 64 tiles (the transposed reads stay in
    cache); rows of tiles in parallel."""
    n = A.shape[0]
    nb = (n + 63) // 64
    for bi in prange(nb):
        i0 = bi * 64
        i1 = min(n, i0 + 64)
        for bj in range(bi + 1):
            j0 = bj * 64
            for i in range(i0, i1):
                for j in range(j0, min(i, j0 + 64)):
                    A[i, j] = A[j, i]


_NO_MEHLER = np.zeros((1, 1, 1))


def _mehler_args(t1: InputTables, t2: InputTables) -> tuple:
    """``M1, M2`` of ``pairs``: the rows' and the columns' Hermite coefficients (dummies if the
    kernel has no expectation by Mehler's formula)."""
    if t1.M is None:
        return _NO_MEHLER, _NO_MEHLER
    return t1.M, t2.M


# ========================================================================== compile()
_LOADED: dict = {}


def compile(derivation, *, rule: str | None = None, radial_order: int | None = None,
            angular_order: int | None = None, hermite_order: int | None = None,
            half_order: int | None = None, kd_order: int | None = None, cache: bool = True,
            params: dict | None = None, warm_up: bool = True,
            mehler: bool | None = None) -> CompiledKernel:
    """Compile ``derivation`` to a :class:`CompiledKernel`.

    ``rule``/``*_order``: quadrature for expectations without a closed form (module docstring;
    defaults in :data:`symntk.quadrature.QUADRATURE`).  Only ``rule`` and ``mehler`` change the
    generated code; the orders are arrays passed at call time.  ``mehler`` (default True):
    separable smooth 2-D expectations by Mehler's formula from per-input Hermite coefficients,
    with the 2-D rule where its error bound does not hold (:mod:`symntk.codegen.mehler`).  ``cache=False`` compiles in memory.  ``params`` binds symbols
    that appear in loop bounds (structural); variances stay call-time parameters.
    ``warm_up`` compiles now (or loads Numba's cache) instead of at the first call.
    """
    from .equations import Derivation
    if not isinstance(derivation, Derivation):
        raise TypeError(f"compile needs a Derivation (symntk.derive(program)), got "
                        f"{type(derivation).__name__}")
    options = dict(QUADRATURE)
    for k, v in dict(rule=rule, radial_order=radial_order, angular_order=angular_order,
                     hermite_order=hermite_order, half_order=half_order,
                     kd_order=kd_order, mehler=mehler).items():
        if v is not None:
            options[k] = v
    for k in ("radial_order", "angular_order", "hermite_order", "half_order", "kd_order"):
        if int(options[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {options[k]}")
    gen = codegen.generate(derivation, rule=options["rule"], params=params,
                           mehler=bool(options["mehler"]))
    key = (gen.key, cache and codegen.cache_dir())
    module, cached = _LOADED.get(key, (None, None))
    if module is None:
        module, cached = codegen.load_module(gen, use_cache=cache)
    kernel = CompiledKernel(derivation, gen, module, cached, options)
    if warm_up:
        try:
            kernel.warm_up()
        except Exception as exc:          # a corrupted Numba cache file: recompile without it
            if not cached:
                raise
            warnings.warn(f"symntk kernel cache unusable ({type(exc).__name__}: {exc}); "
                          "compiling without it (the damaged entry is removed)",
                          codegen.CacheWarning, stacklevel=2)
            codegen.drop_numba_cache(gen)
            module, cached = codegen.load_module(gen, use_cache=False)
            kernel = CompiledKernel(derivation, gen, module, cached, options)
            kernel.warm_up()
    _LOADED[key] = (module, cached)
    return kernel


def as_compiled(kernel, mode: str = "gia", **compile_options) -> CompiledKernel:
    """A :class:`CompiledKernel` from a Program (derived in ``mode``), a Derivation, or a
    compiled kernel (returned as is).  Blockwise drivers need the compiled per-input and pair
    passes; derivations over positions, and those the code generator does not handle
    (``NotImplementedError``), are not supported by them."""
    from .equations import Derivation
    from .program import Program
    if isinstance(kernel, CompiledKernel):
        if compile_options:
            raise ValueError(f"compile options {sorted(compile_options)} given with an already "
                             "compiled kernel")
        return kernel
    if isinstance(kernel, Program):
        from .derivation import derive
        kernel = derive(kernel, mode=mode)
    if isinstance(kernel, Derivation):
        if any(inp.positions for inp in kernel.program.inputs):
            raise NotImplementedError("blockwise Gram matrices of sequence programs (inputs "
                                      "with positions) are not supported yet")
        return compile(kernel, **compile_options)
    raise TypeError("expected a Program, a Derivation or a compiled kernel "
                    f"(symntk.derive(program).compile()), got {type(kernel).__name__}")


def block_size(rows) -> int:
    """Rows per block of a blockwise Gram matrix, rounded up to a multiple of
    :data:`STAGE_TILE`: then every block stages x.x' with the same BLAS calls as one call on the
    whole matrix, and the blocks equal its entries bit for bit."""
    c = int(rows)
    if c < 1:
        raise ValueError(f"the block size must be a positive number of rows, got {rows}")
    return -(-c // STAGE_TILE) * STAGE_TILE
