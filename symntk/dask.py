"""Gram matrices beyond one machine: blockwise on Dask, stored in Zarr, resumable.

A Gram matrix K[i, j] = k(x_i, x_j) of a compiled kernel (:mod:`symntk.kernels`) splits into
blocks of rows and columns.  Each entry depends on the two inputs only, through their per-input
tables (the one-input recursions, e.g. the variances Sigma^l(x, x) of TP2 Eq. 6, and the exact
diagonal k(x, x)) and the pair recursion (Sigma^l(x, x'), Theta^l(x, x'): Jacot et al. 2018;
TP2 Eq. 6).  So:

* the per-input pass runs once per row chunk (one task per chunk), and every block of that
  chunk's row and column reads it;
* block (i, j) is the pair pass over rows of chunk i and columns of chunk j; with ``X2=None``
  (symmetric) only the blocks j >= i are computed, block (j, i) is the transpose of block (i, j),
  and the diagonal blocks use the exact diagonal of the tables;
* the blocks equal the corresponding entries of the in-memory ``symntk.kernel`` bit for bit
  (the same compiled functions on the same numbers).

:func:`kernel` returns ``dask.array`` s (lazy: any Dask scheduler, including ``dask.distributed``);
:func:`to_zarr` writes the Gram matrices to a Zarr store block by block, records each finished
block, and, run again on the same store, computes only the missing blocks (a crash loses at most
the blocks in flight).  Memory is a few blocks per worker thread plus the tables, O(N width).

Threads: inside a Dask task the compiled kernel runs on ``numba_threads`` threads (default 1), so
Numba threads x Dask threads = Dask threads, which Dask keeps at or below the cores.

Needs the ``dask`` extra: ``pip install "symntk[dask]"`` (dask[array], distributed, zarr).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading

import numpy as np

from symntk.kernels import as_compiled, block_size
from symntk.result import KernelResult, check_inputs

__all__ = ["kernel", "to_zarr", "open_zarr", "KINDS"]

#: The Gram matrices a call can produce.
KINDS = ("nngp", "ntk")

_EXTRA = ('symntk.dask needs the "dask" extra: pip install "symntk[dask]" '
          "(dask[array], distributed, zarr)")


def _dask():
    try:
        import dask
        import dask.array as da
        from dask.highlevelgraph import HighLevelGraph
    except ImportError as exc:          # pragma: no cover - exercised without the extra
        raise ImportError(f"{_EXTRA}; import failed: {exc}") from exc
    return dask, da, HighLevelGraph


def _zarr():
    try:
        import zarr
    except ImportError as exc:          # pragma: no cover
        raise ImportError(f"{_EXTRA}; import failed: {exc}") from exc
    return zarr


# ============================================================================== the kernel
_PAIRS_LOCK = threading.Lock()


def _serialized():
    """Numba's workqueue threading layer aborts on concurrent parallel calls from several
    threads: then (or before the layer is known) one block at a time per process."""
    import numba
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:
        return True


@contextlib.contextmanager
def _numba_threads(n: int | None):
    """Run the compiled kernel on ``n`` Numba threads in this (Dask worker) thread; Numba's
    setting is per calling thread."""
    import numba
    if n is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        with (_PAIRS_LOCK if _serialized() else contextlib.nullcontext()):
            yield
    finally:
        numba.set_num_threads(old)


def _tables(k, X, theta, numba_threads):
    X = check_inputs(X, "X")
    with _numba_threads(numba_threads):
        return k.tables(X, theta)


def _block(k, t1, t2, theta, numba_threads):
    """Block of the Gram matrices; ``t2=None``: the symmetric diagonal block of ``t1``."""
    with _numba_threads(numba_threads):
        res, bad = k.block(t1, t2, theta)
    if bad:
        import warnings
        warnings.warn(f"{bad} NTK entries are not finite (the recursion overflows float64)",
                      RuntimeWarning, stacklevel=2)
    return res


def _pick(res, kind, transpose):
    M = getattr(res, kind)
    return np.ascontiguousarray(M.T) if transpose else M


def _bounds(n: int, c: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + c)) for i in range(0, n, c)]


def _as_rows(X, name, dim):
    """Check a data matrix (NumPy: fully; Dask: shape, finiteness inside the tasks)."""
    if hasattr(X, "dask") and hasattr(X, "chunks"):
        if X.ndim != 2:
            raise ValueError(f"{name} must have shape (N, d), got a dask array of shape {X.shape}")
        return X
    return check_inputs(X, name, dim)


class _Plan:
    """The blocks of a Gram matrix: row and column chunks, the per-input tasks, and which blocks
    are computed (upper triangle when symmetric)."""

    def __init__(self, k, X1, X2, chunks, params, numba_threads):
        dask, da, _ = _dask()
        self.k = k
        self.sym = X2 is None
        X1 = _as_rows(X1, "X1", k._dim)
        X2 = X1 if self.sym else _as_rows(X2, "X2", k._dim)
        if X1.shape[1] != X2.shape[1]:
            raise ValueError(f"X1 has {X1.shape[1]} features but X2 has {X2.shape[1]}")
        c = block_size(chunks)
        self.theta = k.theta(params, X1.shape[1])
        self.numba_threads = numba_threads
        self.shape = (X1.shape[0], X2.shape[0])
        self.rows = _bounds(X1.shape[0], c)
        self.cols = self.rows if self.sym else _bounds(X2.shape[0], c)
        self.chunk = c
        self.X1 = da.asarray(X1).rechunk((c, -1))
        self.X2 = self.X1 if self.sym else da.asarray(X2).rechunk((c, -1))
        self.token = dask.base.tokenize(k.generated.key, k.options, self.theta, self.X1,
                                        self.X2, self.sym, c, numba_threads)
        self.kname = "symntk-compiled-" + self.token
        self.t1 = "symntk-tables1-" + self.token
        self.t2 = self.t1 if self.sym else "symntk-tables2-" + self.token
        self.bname = "symntk-block-" + self.token

    def blocks(self):
        """(i, j) of the computed blocks."""
        for i in range(len(self.rows)):
            for j in range(i if self.sym else 0, len(self.cols)):
                yield i, j

    def graph(self, blocks=None):
        """The task dict: the kernel object, the per-input tables the blocks need, the blocks."""
        blocks = list(self.blocks() if blocks is None else blocks)
        dsk = {self.kname: self.k}
        need1 = sorted({i for i, _ in blocks} | ({j for _, j in blocks} if self.sym else set()))
        for i in need1:
            dsk[(self.t1, i)] = (_tables, self.kname, (self.X1.name, i, 0), self.theta,
                                 self.numba_threads)
        if not self.sym:
            for j in sorted({j for _, j in blocks}):
                dsk[(self.t2, j)] = (_tables, self.kname, (self.X2.name, j, 0), self.theta,
                                     self.numba_threads)
        for i, j in blocks:
            t2 = None if (self.sym and i == j) else (self.t2, j)
            dsk[(self.bname, i, j)] = (_block, self.kname, (self.t1, i), t2, self.theta,
                                       self.numba_threads)
        return dsk

    def dependencies(self):
        return [self.X1] if self.sym else [self.X1, self.X2]


def kernel(kernel, X1, X2=None, *, chunks: int = 2048, params=None, mode: str = "gia",
           numba_threads: int | None = 1, **compile_options) -> KernelResult:
    """The NNGP and NTK Gram matrices of ``kernel`` as lazy ``dask.array`` s, built blockwise.

    ``kernel``: a Program (derived and compiled, cached), a Derivation, or a compiled kernel
    (``symntk.derive(program).compile()``); ``X1`` (N1, d), ``X2`` (N2, d) or None (symmetric:
    only the blocks on and above the diagonal are computed, the others are their transposes);
    NumPy or Dask arrays.  ``chunks``: rows (and columns) per block, rounded up to a multiple of
    256 (the tile of the BLAS product x.x', so that blocks equal the in-memory matrix).
    ``params``: values of free variances, as for a compiled kernel.  ``numba_threads``: Numba
    threads per Dask task.

    Returns a :class:`~symntk.result.KernelResult` whose ``nngp`` (None when the program has no
    NNGP) and ``ntk`` are dask arrays of shape (N1, N2) sharing their block tasks: compute them
    together (``dask.compute(r.nngp, r.ntk)``) to run each block once.  Any scheduler works:
    the threaded one, or ``dask.distributed`` (the compiled kernel is pickled without its module
    and reloaded from the kernel cache on each worker).
    """
    dask, da, HighLevelGraph = _dask()
    k = as_compiled(kernel, mode=mode, **compile_options)
    plan = _Plan(k, X1, X2, chunks, params, numba_threads)
    base = plan.graph()
    chunks_out = (tuple(b - a for a, b in plan.rows), tuple(b - a for a, b in plan.cols))
    out = {}
    for kind in KINDS:
        if kind == "nngp" and not k.generated.has_nngp:
            out[kind] = None
            continue
        name = f"symntk-{kind}-{plan.token}"
        dsk = dict(base)
        for i in range(len(plan.rows)):
            for j in range(len(plan.cols)):
                if plan.sym and j < i:
                    dsk[(name, i, j)] = (_pick, (plan.bname, j, i), kind, True)
                else:
                    dsk[(name, i, j)] = (_pick, (plan.bname, i, j), kind, False)
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=plan.dependencies())
        out[kind] = da.Array(graph, name, chunks_out, dtype=np.float64,
                             meta=np.empty((0, 0), dtype=np.float64))
    return KernelResult(out["nngp"], out["ntk"], {})


# ================================================================================= storage
def _zarr_major() -> int:
    return int(_zarr().__version__.split(".")[0])


def _create(path, shape, chunks, dtype, fill_value):
    """A Zarr array at ``path`` (overwritten), uncompressed: Gram entries are float64 noise to a
    compressor, and the blocks are written once and read in full."""
    zarr = _zarr()
    if _zarr_major() >= 3:
        return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype,
                                 fill_value=fill_value, compressors=None, overwrite=True)
    return zarr.open_array(store=str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype,
                           fill_value=fill_value, compressor=None)


def _open(path, mode="r+"):
    return _zarr().open_array(store=str(path), mode=mode)


def _fingerprint(k, plan, X1, X2, kinds) -> str:
    """What the stored matrices are a function of: the kernel module, quadrature options,
    parameters, the data (hashed) and the blocking.  A resumed run must match it."""
    h = hashlib.sha256()
    for part in (k.generated.key, repr(sorted(k.options.items())), plan.theta.tobytes(),
                 repr(plan.shape), repr(plan.chunk), repr(plan.sym), repr(tuple(kinds))):
        h.update(part.encode() if isinstance(part, str) else part)
    for X in (X1,) if X2 is None else (X1, X2):
        X = np.ascontiguousarray(np.asarray(X, dtype=np.float64))
        h.update(repr(X.shape).encode())
        h.update(X.tobytes())
    return h.hexdigest()


def _write_block(res, paths, done_path, rows, cols, i, j, sym):
    """Write block (i, j) (and its transpose at (j, i) when symmetric), then mark it done: the
    marker is written after the data, so a marked block is complete."""
    (r0, r1), (c0, c1) = rows[i], cols[j]
    for kind, path in paths.items():
        arr = _open(path)
        M = getattr(res, kind)
        arr[r0:r1, c0:c1] = M
        if sym and i != j:
            arr[c0:c1, r0:r1] = M.T
    done = _open(done_path)
    done[i, j] = 1
    return (i, j)


def _is_local(scheduler) -> bool:
    if scheduler is not None and not isinstance(scheduler, str):
        return False                      # a distributed Client
    if scheduler in ("threads", "threading", "sync", "synchronous", "single-threaded",
                     "processes", "multiprocessing"):
        return True
    try:
        from distributed import default_client
        default_client()
        return scheduler is not None
    except (ImportError, ValueError):
        return True


def to_zarr(kernel, X1, path, X2=None, *, chunks: int = 2048, kinds=KINDS, params=None,
            mode: str = "gia", numba_threads: int | None = 1, scheduler=None,
            progress: bool = False, **compile_options):
    """Compute the Gram matrices blockwise into a Zarr store at ``path``; resumable.

    Arrays ``<path>/<kind>`` (float64, chunks of ``chunks`` x ``chunks`` aligned with the
    blocks, uncompressed) for each kind in ``kinds`` (``"nngp"``, ``"ntk"``), and ``<path>/done``
    (one flag per computed block, written after its data).  If ``path`` already holds a store of
    the same kernel, parameters, data and blocking (a fingerprint in its attributes), only the
    blocks not flagged are computed: run the same call again after a crash.  Otherwise the store
    is (re)created.  Each task holds one block: memory is a few blocks per Dask thread plus
    the per-input tables.

    ``scheduler``: a Dask scheduler name (``"threads"``, ...), a ``distributed.Client``, or None
    (Dask's default: the current Client if there is one).  ``progress``: a progress bar of
    blocks on stderr.  Returns a :class:`GramStore`.
    """
    dask, da, HighLevelGraph = _dask()
    k = as_compiled(kernel, mode=mode, **compile_options)
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected some of {KINDS}")
        if kind == "nngp" and not k.generated.has_nngp:
            raise ValueError("this program has no NNGP kernel (no readout to a GP); "
                             "ask kinds=('ntk',)")
    if not kinds:
        raise ValueError("kinds is empty")
    if any(hasattr(X, "dask") for X in (X1, X2)):
        raise TypeError("to_zarr takes NumPy inputs (their hash identifies the store to resume)")
    plan = _Plan(k, X1, X2, chunks, params, numba_threads)
    X1 = check_inputs(X1, "X1")
    fp = _fingerprint(k, plan, X1, X2, kinds)
    path = os.fspath(path)
    done_path = os.path.join(path, "done")
    nb = (len(plan.rows), len(plan.cols))
    resumed = False
    if os.path.exists(os.path.join(path, "done")):
        try:
            done = _open(done_path)
            resumed = done.attrs.get("fingerprint") == fp
        except Exception:                 # an unreadable or foreign store: start again
            resumed = False
    zchunks = (plan.chunk, plan.chunk)
    paths = {kind: os.path.join(path, kind) for kind in kinds}
    if resumed:
        flags = _read_flags(done_path, nb)
    else:
        os.makedirs(path, exist_ok=True)
        for kind in kinds:
            _create(paths[kind], plan.shape, zchunks, "f8", np.nan)
        done = _create(done_path, nb, (1, 1), "u1", 0)
        done.attrs.update({"fingerprint": fp, "shape": list(plan.shape), "chunks": plan.chunk,
                           "symmetric": plan.sym, "kinds": list(kinds),
                           "program": k.derivation.program.name})
        flags = np.zeros(nb, dtype=bool)
    todo = [(i, j) for i, j in plan.blocks() if not flags[i, j]]
    skipped = [(i, j) for i, j in plan.blocks() if flags[i, j]]
    if todo:
        dsk = plan.graph(todo)
        wname = "symntk-write-" + plan.token
        keys = []
        for i, j in todo:
            key = (wname, i, j)
            dsk[key] = (_write_block, (plan.bname, i, j), paths, done_path, plan.rows,
                        plan.cols, i, j, plan.sym)
            keys.append(key)
        graph = HighLevelGraph.from_collections(wname, dsk, dependencies=plan.dependencies())
        _run(dask, graph, keys, scheduler, progress, wname)
    return GramStore(path, kinds, computed=todo, skipped=skipped, resumed=resumed)


def _read_flags(done_path, nb) -> np.ndarray:
    """The done flags; a flag chunk that cannot be read (a crash while writing it) is unset."""
    done = _open(done_path)
    try:
        return np.asarray(done[...]).astype(bool)
    except Exception:
        flags = np.zeros(nb, dtype=bool)
        for i in range(nb[0]):
            for j in range(nb[1]):
                try:
                    flags[i, j] = bool(done[i, j])
                except Exception:
                    flags[i, j] = False
        return flags


def _run(dask, graph, keys, scheduler, progress, wname):
    """Compute ``keys`` of ``graph``; a progress bar counts finished blocks."""
    from symntk.matfree import progress_bar
    bar = progress_bar(len(keys), "blocks", enabled=progress)
    try:
        if _is_local(scheduler):
            from dask.callbacks import Callback

            class _Count(Callback):
                def _posttask(self, key, result, dsk, state, id):
                    if isinstance(key, tuple) and key[0] == wname:
                        bar.update(1)
            get = dask.base.get_scheduler(scheduler=scheduler or "threads")
            with _Count():
                get(graph, keys)
        else:
            from distributed import as_completed, default_client
            client = scheduler if scheduler is not None else default_client()
            futures = client.get(graph, keys, sync=False)
            for _ in as_completed(futures):
                bar.update(1)
            client.gather(futures)
    finally:
        bar.close()


class GramStore:
    """Gram matrices stored by :func:`to_zarr`: ``store.ntk``, ``store.nngp`` (Zarr arrays),
    ``store.dask(kind)`` (a dask array over them), ``computed``/``skipped`` (blocks (i, j)
    computed by the call that returned this, and found done in the store)."""

    def __init__(self, path, kinds, computed=(), skipped=(), resumed=False):
        self.path = os.fspath(path)
        self.kinds = tuple(kinds)
        self.computed = list(computed)
        self.skipped = list(skipped)
        self.resumed = resumed

    def __getattr__(self, kind):
        if kind in KINDS:
            if kind not in self.kinds:
                raise AttributeError(f"the store at {self.path} has no {kind!r} matrix")
            return _open(os.path.join(self.path, kind), mode="r")
        raise AttributeError(kind)

    @property
    def complete(self) -> bool:
        done = _open(os.path.join(self.path, "done"), mode="r")
        flags = np.asarray(done[...]).astype(bool)
        if done.attrs.get("symmetric"):
            return bool(np.all(flags[np.triu_indices(flags.shape[0])]))
        return bool(np.all(flags))

    def dask(self, kind: str = "ntk"):
        _, da, _ = _dask()
        return da.from_zarr(getattr(self, kind))

    def __repr__(self):
        return (f"<GramStore {self.path} kinds={self.kinds} computed={len(self.computed)} "
                f"skipped={len(self.skipped)} complete={self.complete}>")


def open_zarr(path) -> GramStore:
    """A store written by :func:`to_zarr` (complete or not: see ``.complete``)."""
    done = _open(os.path.join(os.fspath(path), "done"), mode="r")
    return GramStore(path, done.attrs["kinds"])
