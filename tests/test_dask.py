"""Blockwise Gram matrices (symntk.dask), the resumable Zarr store, and matrix-free CG regression.

The references are independent of the blockwise code: the in-memory compiled kernel on the whole
matrix (``CompiledKernel.__call__``, one call), NumPy's dense solver, and a pivoted Cholesky
written here from its definition.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import symntk

dask = pytest.importorskip("dask")
pytest.importorskip("zarr")
distributed = pytest.importorskip("distributed")

import symntk.dask as sdask                                  # noqa: E402
from symntk.matfree import (BlockGram, KernelRegression, conjugate_gradients,   # noqa: E402
                            pivoted_cholesky, progress_bar)

PROGRAM = "symntk.mlp(2, 'relu', weight_std=2 ** 0.5, bias_std=0.1)"


@pytest.fixture(scope="module")
def k():
    return symntk.derive(eval(PROGRAM)).compile()         # noqa: S307 - a constant of this file


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(15)
    return rng.standard_normal((600, 50)), rng.standard_normal((300, 50))


@pytest.fixture(scope="module")
def reference(k, data):
    X, X2 = data
    return k(X), k(X, X2)


# ------------------------------------------------------------------------------- blockwise
@pytest.mark.parametrize("chunks", [256, 512])
def test_blockwise_equals_in_memory_bit_for_bit(k, data, reference, chunks):
    X, X2 = data
    ref, refx = reference
    r = sdask.kernel(k, X, chunks=chunks)
    nngp, ntk = dask.compute(r.nngp, r.ntk, scheduler="threads")
    assert np.array_equal(ntk, ref.ntk) and np.array_equal(nngp, ref.nngp)
    rx = sdask.kernel(k, X, X2, chunks=chunks)
    nngp, ntk = dask.compute(rx.nngp, rx.ntk, scheduler="threads")
    assert ntk.shape == (600, 300)
    assert np.array_equal(ntk, refx.ntk) and np.array_equal(nngp, refx.nngp)


def test_symmetric_graph_computes_upper_blocks_and_tables_once(k, data):
    X, _ = data
    r = sdask.kernel(k, X, chunks=256)                  # 3 row chunks: 256, 256, 88
    keys = [key for key in dict(r.ntk.__dask_graph__()) if isinstance(key, tuple)]
    blocks = sorted(key[1:] for key in keys if key[0].startswith("symntk-block-"))
    tables = [key for key in keys if key[0].startswith("symntk-tables")]
    assert blocks == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    assert len(tables) == 3
    assert r.ntk.chunks == ((256, 256, 88), (256, 256, 88))
    # block sizes are rounded up to the 256-row tile of the BLAS product x.x'
    assert sdask.kernel(k, X, chunks=100).ntk.chunks == r.ntk.chunks


def test_dask_input_and_errors(k, data, reference):
    X, _ = data
    da = pytest.importorskip("dask.array")
    r = sdask.kernel(k, da.from_array(X, chunks=(100, 50)), chunks=256)
    assert np.array_equal(r.ntk.compute(scheduler="sync"), reference[0].ntk)
    with pytest.raises(ValueError, match="positive"):
        sdask.kernel(k, X, chunks=0)
    with pytest.raises(ValueError, match="features"):
        sdask.kernel(k, X, X[:, :10])
    with pytest.raises(NotImplementedError, match="sequence"):
        sdask.kernel(symntk.rnn("erf", input_dim=2), np.ones((3, 4, 2)))
    bad = X.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sdask.kernel(k, bad)


def test_numba_threads_inside_a_task():
    import numba
    before = numba.get_num_threads()
    with sdask._numba_threads(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


# --------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_local_cluster_two_processes(k, data, reference, client, tmp_path):
    X, X2 = data
    r = sdask.kernel(k, X, X2, chunks=256)
    ntk = client.compute(r.ntk).result()
    # Worker processes reproduce the in-process Gram to an ulp or two, not bit for bit: one
    # block's entries differ by ~6e-16 relative there (blockwise equals in-memory bit for bit
    # within one process, test_blockwise_equals_in_memory_bit_for_bit).
    np.testing.assert_allclose(ntk, reference[1].ntk, rtol=4e-15, atol=0)
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    store = sdask.to_zarr(k, X, tmp_path / "gram", chunks=256, scheduler=client)
    assert store.complete and len(store.computed) == 6
    np.testing.assert_allclose(store.ntk[...], reference[0].ntk, rtol=4e-15, atol=0)
    np.testing.assert_allclose(store.nngp[...], reference[0].nngp, rtol=4e-15, atol=0)


# ----------------------------------------------------------------------------- Zarr store
_CRASH = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import symntk, symntk.dask
    from dask.callbacks import Callback

    X = np.load(sys.argv[1])
    finished = []

    class Crash(Callback):            # SIGKILL after the 4th finished block: a hard crash
        def _posttask(self, key, result, dsk, state, id):
            if isinstance(key, tuple) and key[0].startswith("symntk-write-"):
                finished.append(key)
                if len(finished) == 4:
                    os.kill(os.getpid(), signal.SIGKILL)

    with Crash():
        symntk.dask.to_zarr({program}, X, sys.argv[2], chunks=256, scheduler="sync")
    """)


def _chunk_files(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


def test_killed_midway_resumes_without_recomputing(k, data, reference, tmp_path):
    X, _ = data
    np.save(tmp_path / "X.npy", X)
    script = tmp_path / "crash.py"
    script.write_text(_CRASH.format(program=PROGRAM))
    store_path = tmp_path / "gram"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "X.npy"),
                           str(store_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr           # killed, not finished
    before = sdask.open_zarr(store_path)
    assert not before.complete
    flags = np.asarray(sdask._open(store_path / "done", "r")[...]).astype(bool)
    done_before = {tuple(int(v) for v in ij) for ij in np.argwhere(flags)}
    assert len(done_before) == 4
    files_before = _chunk_files(store_path / "ntk")
    store = sdask.to_zarr(k, X, store_path, chunks=256)
    assert store.resumed and set(store.skipped) == done_before
    assert not set(store.computed) & done_before
    assert len(store.computed) + len(store.skipped) == 6
    files_after = _chunk_files(store_path / "ntk")
    for i, j in done_before:                               # finished blocks were not rewritten
        for a, b in ((i, j), (j, i)):
            ends = (os.path.join("c", str(a), str(b)), f"{os.sep}{a}.{b}")   # zarr 3, zarr 2
            name = [p for p in files_before if p.endswith(ends)]
            assert name and files_after[name[0]] == files_before[name[0]]
    assert store.complete
    assert np.array_equal(store.ntk[...], reference[0].ntk)
    assert np.array_equal(store.nngp[...], reference[0].nngp)
    again = sdask.to_zarr(k, X, store_path, chunks=256)
    assert again.computed == [] and len(again.skipped) == 6


def test_store_of_other_data_is_not_resumed(k, data, tmp_path):
    X, X2 = data
    path = tmp_path / "g"
    s1 = sdask.to_zarr(k, X[:300], path, chunks=256, kinds=("ntk",), scheduler="threads")
    assert not s1.resumed and len(s1.computed) == 3
    s2 = sdask.to_zarr(k, X[:300] * 2, path, chunks=256, kinds=("ntk",), scheduler="threads")
    assert not s2.resumed and len(s2.computed) == 3
    assert np.array_equal(s2.ntk[...], k(X[:300] * 2).ntk)
    # in this process (a cluster started by another test would otherwise be the default)
    s3 = sdask.to_zarr(k, X[:300], path, X2=X2, chunks=256, kinds=("ntk",), scheduler="threads")
    assert s3.ntk.shape == (300, 300) and len(s3.computed) == 4
    assert np.array_equal(s3.dask("ntk").compute(scheduler="sync"), k(X[:300], X2).ntk)
    with pytest.raises(AttributeError, match="no 'nngp'"):
        s3.nngp
    with pytest.raises(ValueError, match="unknown kind"):
        sdask.to_zarr(k, X, path, kinds=("cov",))


# ------------------------------------------------------------------------------------- CG
def test_pivoted_cholesky_definition(k):
    """Against the textbook algorithm on the dense matrix: same pivots, L L^T -> K."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 3))
    K = k(X).ntk
    op = BlockGram(k, X, block=256)
    L = pivoted_cholesky(op, 40, tol=0.0)
    R = K.copy()
    for m in range(6):                                     # dense greedy Cholesky, by hand
        p = int(np.argmax(np.diag(R)))
        ell = R[:, p] / np.sqrt(R[p, p])
        assert np.allclose(L[:, m], ell, rtol=1e-9, atol=1e-12)
        R = R - np.outer(ell, ell)
    assert np.abs(L @ L.T - K).max() < 1e-8 * np.abs(K).max()


def test_cg_equals_direct_solve_n2000(k):
    rng = np.random.default_rng(2)
    N = 2000
    X = rng.standard_normal((N, 20))
    Y = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2]], axis=1)
    Xt = rng.standard_normal((300, 20))
    ridge = 1.0                                           # ~40 CG iterations
    m = KernelRegression(k, X, Y, ridge=ridge, block=1024, preconditioner="cholesky",
                         rank=200, tol=1e-10)
    K = k(X).ntk
    alpha = np.linalg.solve(K + ridge * np.eye(N), Y)
    assert np.linalg.norm(m.alpha - alpha) <= 1e-8 * np.linalg.norm(alpha)
    mean = k(Xt, X).ntk @ alpha
    pred = m.predict(Xt, block=256)                       # two test blocks, streamed
    assert np.abs(pred - mean).max() <= 1e-8 * np.abs(mean).max()
    assert m.products >= m.iterations and m.residuals[-1] <= 1e-10


def test_cg_matches_predictor_at_infinite_time(k):
    rng = np.random.default_rng(3)
    X, Xt = rng.standard_normal((300, 5)), rng.standard_normal((40, 5))
    y = np.cos(X @ np.arange(1.0, 6.0) / 5)
    for kind in ("ntk", "nngp"):
        m = KernelRegression(k, X, y, ridge=0.1, kind=kind, block=256, rank=100, tol=1e-12)
        p = symntk.Predictor(k, X, y, ridge=0.1)
        ref = p.gradient_descent(t=np.inf, X_test=Xt, training=kind, covariance=None).mean
        assert np.allclose(m.predict(Xt), ref, rtol=1e-8, atol=1e-10)


def test_cg_plain_and_progress_line(monkeypatch, capsys):
    rng = np.random.default_rng(4)
    A = rng.standard_normal((30, 30))
    A = A @ A.T + 30 * np.eye(30)
    b = rng.standard_normal(30)
    monkeypatch.setitem(sys.modules, "tqdm", None)         # the fallback line, not tqdm
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    x, it, hist = conjugate_gradients(lambda v: A @ v, b, tol=1e-12, progress=True)
    assert np.allclose(A @ x, b, atol=1e-10) and it <= 30 and hist[-1] <= 1e-12
    assert "CG:" in capsys.readouterr().err
    bar = progress_bar(3, "x", enabled=False)
    bar.update(1)
    bar.close()


def test_jacobi_preconditioner(k):
    rng = np.random.default_rng(6)
    X = rng.standard_normal((200, 4))
    y = X[:, 0] - X[:, 1] ** 2
    m = KernelRegression(k, X, y, ridge=0.5, preconditioner="jacobi", tol=1e-11)
    alpha = np.linalg.solve(k(X).ntk + 0.5 * np.eye(200), y)
    assert np.linalg.norm(m.alpha - alpha) <= 1e-9 * np.linalg.norm(alpha)


def test_regression_errors(k):
    X = np.random.default_rng(5).standard_normal((20, 3))
    with pytest.raises(TypeError):
        KernelRegression(k, X, np.ones(20))                # ridge is required
    with pytest.raises(ValueError, match="ridge"):
        KernelRegression(k, X, np.ones(20), ridge=-1.0)
    with pytest.raises(ValueError, match="shape"):
        KernelRegression(k, X, np.ones(19), ridge=1.0)
    with pytest.raises(ValueError, match="preconditioner"):
        KernelRegression(k, X, np.ones(20), ridge=1.0, preconditioner="ilu")
    with pytest.raises(ValueError, match="ridge > 0"):
        KernelRegression(k, X, np.ones(20), ridge=0.0, preconditioner="cholesky")
