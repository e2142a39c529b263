"""The kernel cache: generated modules content-addressed in ``$SYMNTK_CACHE_DIR``, loaded so that
Numba's on-disk cache can find them, and manifests that let a warm start skip generation."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import types
import warnings

import numba
import platformdirs
import sympy as sp

from ..equations import Derivation, Loop
from .module import CODEGEN_VERSION, MODULE_PREFIX, GeneratedKernel

__all__ = ["CacheWarning", "cache_dir", "load_module", "drop_numba_cache", "cache_info",
           "clear_cache", "source_hash", "read_manifest", "write_manifest", "fingerprint"]


class CacheWarning(UserWarning):
    """The kernel cache could not be used; the kernel was compiled without it."""


def cache_dir() -> str:
    """``$SYMNTK_CACHE_DIR``, else ``platformdirs.user_cache_dir("symntk")``."""
    env = os.environ.get("SYMNTK_CACHE_DIR")
    if env:
        return env
    return platformdirs.user_cache_dir("symntk")


def load_module(gen: GeneratedKernel, use_cache: bool = True):
    """Import the generated module, from the cache directory if possible.

    Returns ``(module, cached)``.  Any failure to write or read the cache (unwritable
    directory, a foreign file in the way) warns (:class:`CacheWarning`) and falls back to an
    in-memory module with ``CACHE = False``.
    """
    name = gen.module_name
    if use_cache:
        try:
            path = _write_source(gen)
            mod = sys.modules.get(name)
            if mod is not None and getattr(mod, "__file__", None) == path:
                return mod, True
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod                 # before exec_module: Numba's cache needs it
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return mod, True
        except (OSError, SyntaxError, ValueError, ImportError) as exc:
            warnings.warn(f"symntk kernel cache unusable ({type(exc).__name__}: {exc}); "
                          "compiling without it", CacheWarning, stacklevel=3)
    return _memory_module(gen), False


def _memory_module(gen: GeneratedKernel):
    name = gen.module_name + "_nocache"
    src = gen.source.replace("CACHE = True", "CACHE = False", 1)
    mod = types.ModuleType(name)
    mod.__file__ = f"<symntk generated {gen.key}>"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)   # noqa: S102 - our own generated text
    return mod


def _write_source(gen: GeneratedKernel) -> str:
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, gen.module_name + ".py")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            if fh.read() == gen.source:
                return path
        # a corrupted or foreign file under our name: replace it, and drop Numba's stale index
        warnings.warn(f"replacing a damaged kernel module in the cache: {path}", CacheWarning,
                      stacklevel=4)
        _drop_numba_cache(root, gen.module_name)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp_", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(gen.source)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def drop_numba_cache(gen: GeneratedKernel):
    """Remove Numba's cache files of one generated module (after they failed to load)."""
    try:
        _drop_numba_cache(cache_dir(), gen.module_name)
    except OSError:
        pass


def _drop_numba_cache(root: str, module_name: str):
    pyc = os.path.join(root, "__pycache__")
    if not os.path.isdir(pyc):
        return
    for f in os.listdir(pyc):
        if f.startswith(module_name + "."):
            try:
                os.unlink(os.path.join(pyc, f))
            except OSError:
                pass


def cache_info(root: str | None = None) -> dict:
    """Modules and Numba cache files in the cache directory: counts and bytes."""
    root = root or cache_dir()
    out = {"path": root, "modules": 0, "numba_files": 0, "bytes": 0}
    if not os.path.isdir(root):
        return out
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                out["bytes"] += os.path.getsize(p)
            except OSError:
                continue
            if f.startswith(MODULE_PREFIX) and f.endswith(".py") and dirpath == root:
                out["modules"] += 1
            elif f.endswith((".nbi", ".nbc")):
                out["numba_files"] += 1
    return out


def clear_cache(root: str | None = None) -> int:
    """Delete generated modules and their Numba cache files; returns the number of files."""
    root = root or cache_dir()
    n = 0
    if not os.path.isdir(root):
        return 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            manifest = os.path.basename(dirpath) == "manifests" and f.endswith(".json")
            if f.startswith((MODULE_PREFIX, ".tmp_")) or f.endswith((".nbi", ".nbc")) or manifest:
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except OSError:
                    pass
    return n


def _package_hash() -> str:
    """The generator's own text (every module of this package): any change to it invalidates
    every manifest."""
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()


_SELF = _package_hash()


def source_hash(source: str) -> str:
    """The module key: a hash of the generated text, Numba's version and Python's."""
    digest = hashlib.sha256(source.encode())
    digest.update(numba.__version__.encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:24]


def fingerprint(derivation: Derivation, rule: str, structural: dict) -> str:
    """A hash of everything the generated text depends on: the *numeric* equations (the closed-
    form table lives elsewhere and may change), what each symbol is (copies decide the classes),
    the options, and this package.  ``srepr`` keeps the assumptions of every symbol."""
    h = hashlib.sha256()
    for part in (CODEGEN_VERSION, _SELF, rule, repr(sorted(map(str, structural.items())))):
        h.update(part.encode())
    for d in (derivation.numeric(), derivation.numeric().diagonal):
        items = [d.mode, d.nngp, d.ntk, sorted(d.ntk_terms.items(), key=lambda kv: kv[0]),
                 [inp.dim for inp in d.program.inputs]]
        for st in d.steps:
            if isinstance(st, Loop):
                items.append((st.index, st.start, st.stop, st.direction,
                              [(q.lhs, q.rhs) for q in st.equations]))
            else:
                items.append((st.lhs, st.rhs))
        for table in (d.info, d.inputs):
            for key in sorted(table, key=sp.default_sort_key):
                i = table[key]
                items.append((key, i.kind, tuple(i.copies), tuple(map(str, i.nodes))))
        h.update(sp.srepr(items).encode())
    return h.hexdigest()[:32]


def _manifest_path(fingerprint: str) -> str:
    return os.path.join(cache_dir(), "manifests", fingerprint + ".json")


def read_manifest(fingerprint: str):
    """The GeneratedKernel of an earlier run (skips generation on a warm start), or None."""
    try:
        with open(_manifest_path(fingerprint), encoding="utf-8") as fh:
            m = json.load(fh)
        with open(os.path.join(cache_dir(), MODULE_PREFIX + m["key"] + ".py"),
                  encoding="utf-8") as fh:
            source = fh.read()
        if source_hash(source) != m["key"]:
            return None                           # damaged or foreign: generate afresh
        params = [sp.Symbol(name, **assumptions) for name, assumptions in m["params"]]
        return GeneratedKernel(source, m["key"], params, m["table_width"], m["has_nngp"],
                               m["term_names"], m["pair_inputs"], m["rule"], from_manifest=True,
                               distance_inputs=m["distance_inputs"],
                               mehler_slots=int(m.get("mehler_slots", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(fingerprint: str, gen: GeneratedKernel):
    """Record ``gen`` under ``fingerprint`` (best effort: the manifest only saves time)."""
    m = {"key": gen.key, "params": [[p.name, p.assumptions0] for p in gen.params],
         "table_width": gen.table_width, "has_nngp": gen.has_nngp, "term_names": gen.term_names,
         "pair_inputs": gen.pair_inputs, "rule": gen.rule, "distance_inputs": gen.distance_inputs,
         "mehler_slots": gen.mehler_slots}
    try:
        path = _manifest_path(fingerprint)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(m, fh)
        os.replace(tmp, path)
    except OSError:
        pass                                      # the manifest only saves time
