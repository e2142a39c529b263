"""Blockwise Gram matrices on Dask: in-memory ratio, 1 vs 2 workers, and a large run to Zarr.

    python benchmarks/bench_dask.py --quick                 # N = 2000 / 4000 (no big run), a smoke run
    python benchmarks/bench_dask.py                         # the figures of benchmarks/README.md
    python benchmarks/bench_dask.py --big 50000 --store /tmp/gram50k   # + the 50k run (20 GB)

Network: ``symntk.mlp(3, "relu", weight_std=sqrt(2), bias_std=0.1)``, d = 100, X ~ N(0, 1).

1. ``--small`` N: the in-memory compiled kernel ``k(X)`` (Numba on all cores) against
   ``symntk.dask.kernel(k, X)`` computed into memory on the threaded scheduler (one Numba thread
   per Dask thread, as many threads as cores), both matrices; the ratio is the cost of blocking.
2. ``--mid`` N: ``symntk.dask.to_zarr`` (NTK only) on a ``LocalCluster`` of 1 and then 2 worker
   processes of one thread each: wall time and speed-up.
3. ``--big`` N (only if given): ``to_zarr`` on 2 workers, NTK only; wall time, the peak RSS of
   every process (client, workers), pairs per second.  The store is deleted afterwards unless
   ``--keep``.

Timings exclude cluster start-up and the workers' first load of the kernel (a tiny warm-up
computation).  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

import numpy as np

import symntk
import symntk.dask as sdask


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class RSSSampler:
    """Largest summed RSS of this process and its children (workers, nannies), and of each
    process, sampled every ``every`` seconds.  (``getrusage``'s ru_maxrss is no use here: a
    spawned worker inherits its parent's maximum.)"""

    def __init__(self, every=0.5):
        import psutil
        self.psutil, self.every, self.peak, self.stop_ = psutil, every, 0.0, False
        self.each = {}
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        me = self.psutil.Process()
        while not self.stop_:
            try:
                procs = [me] + me.children(recursive=True)
                rss = {f"{p.pid} {' '.join(p.cmdline()[-2:])[-40:]}": p.memory_info().rss / 2 ** 20
                       for p in procs}
                self.peak = max(self.peak, sum(rss.values()))
                for name, v in rss.items():
                    self.each[name] = max(self.each.get(name, 0.0), v)
            except self.psutil.Error:
                pass
            time.sleep(self.every)

    def stop(self):
        self.stop_ = True
        self.t.join()
        return self.peak


def cluster(n_workers):
    import distributed
    c = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                 dashboard_address=None)
    return c, distributed.Client(c)


def warm(client, k):
    X = np.random.default_rng(1).standard_normal((300, 100))
    client.compute(sdask.kernel(k, X, chunks=256).ntk).result()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=10000)
    ap.add_argument("--mid", type=int, default=20000)
    ap.add_argument("--big", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=2048)
    ap.add_argument("--store", default="/tmp/symntk-bench-gram")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.small, a.mid, a.chunks = 2000, 4000, 1024
    import dask
    import numba
    rng = np.random.default_rng(0)
    d = 100
    k = symntk.derive(symntk.mlp(3, "relu", weight_std=2 ** 0.5, bias_std=0.1)).compile()
    print(f"# cores {os.cpu_count()}, numba threads {numba.get_num_threads()}, "
          f"load {load()}", flush=True)

    # 1. in memory vs blockwise threaded
    X = rng.standard_normal((a.small, d))
    k(X[:500])
    t = time.perf_counter()
    ref = k(X)
    t_mem = time.perf_counter() - t
    r = sdask.kernel(k, X, chunks=a.chunks)
    t = time.perf_counter()
    nngp, ntk = dask.compute(r.nngp, r.ntk, scheduler="threads")
    t_dask = time.perf_counter() - t
    same = bool(np.array_equal(ntk, ref.ntk) and np.array_equal(nngp, ref.nngp))
    del ref, nngp, ntk
    print(json.dumps({"case": "in-memory vs dask threads", "N": a.small, "chunks": a.chunks,
                      "in_memory_s": round(t_mem, 3), "dask_threads_s": round(t_dask, 3),
                      "ratio": round(t_dask / t_mem, 2), "bit_for_bit": same,
                      "load": load()}), flush=True)

    # 2. 1 vs 2 workers, to Zarr (NTK only)
    X = rng.standard_normal((a.mid, d))
    times = {}
    for nw in (1, 2):
        c, client = cluster(nw)
        try:
            warm(client, k)
            shutil.rmtree(a.store, ignore_errors=True)
            t = time.perf_counter()
            sdask.to_zarr(k, X, a.store, chunks=a.chunks, kinds=("ntk",), scheduler=client)
            times[nw] = time.perf_counter() - t
        finally:
            client.close()
            c.close()
        print(json.dumps({"case": "to_zarr", "N": a.mid, "workers": nw, "chunks": a.chunks,
                          "wall_s": round(times[nw], 2),
                          "pairs_per_s": round(a.mid * (a.mid + 1) / 2 / times[nw]),
                          "load": load()}), flush=True)
    print(json.dumps({"case": "speed-up 1 -> 2 workers", "N": a.mid,
                      "speedup": round(times[1] / times[2], 2)}), flush=True)
    shutil.rmtree(a.store, ignore_errors=True)

    # 3. the big run
    if a.big:
        import distributed
        X = rng.standard_normal((a.big, d))
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(a.store))).free
        need = 8 * a.big * a.big
        if need > 0.9 * free:
            sys.exit(f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free at {a.store}")
        c, client = cluster(2)
        try:
            warm(client, k)
            shutil.rmtree(a.store, ignore_errors=True)
            sampler = RSSSampler()
            t = time.perf_counter()
            store = sdask.to_zarr(k, X, a.store, chunks=a.chunks, kinds=("ntk",),
                                  scheduler=client, progress=True)
            wall = time.perf_counter() - t
            peak_sum = sampler.stop()
            peaks = sampler.each
            # spot check against the in-memory kernel on 300 x 300 random entries: off the
            # diagonal against k(X[rows], X[cols]); on it against the exact diagonal (a cross
            # call evaluates k(x, x) by the pair formulas, which lose digits at c = 1)
            rows = np.sort(rng.choice(a.big, 300, replace=False))
            cols = np.sort(rng.choice(a.big, 300, replace=False))
            got = store.ntk.get_orthogonal_selection((rows, cols))
            ref = k(X[rows], X[cols]).ntk
            same = rows[:, None] == cols[None, :]
            err = float(np.abs(got - ref)[~same].max())
            diag = k(X[rows], diagonal=True).ntk
            derr = float(np.abs(np.diag(store.ntk.get_orthogonal_selection((rows, rows)))
                                - diag).max())
        finally:
            client.close()
            c.close()
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.store)
                   for f in fs)
        print(json.dumps({"case": "to_zarr big", "N": a.big, "workers": 2, "chunks": a.chunks,
                          "wall_s": round(wall, 1),
                          "pairs_per_s": round(a.big * (a.big + 1) / 2 / wall),
                          "store_GB": round(size / 1e9, 2),
                          "peak_rss_MB": {name: round(v) for name, v in peaks.items()},
                          "peak_rss_all_processes_MB": round(peak_sum),
                          "spot_check_off_diagonal_max_abs_diff": err,
                          "spot_check_diagonal_max_abs_diff": derr, "load": load()}),
              flush=True)
        if not a.keep:
            shutil.rmtree(a.store, ignore_errors=True)
        del distributed


if __name__ == "__main__":
    main()
