"""Fixtures shared by every test file.

The kernel cache
----------------
Compiled kernels are written to ``symntk.codegen.cache_dir()``: ``$SYMNTK_CACHE_DIR``, else the
user's cache directory (``platformdirs.user_cache_dir("symntk")``).  No test may write there, so
for the whole session ``$SYMNTK_CACHE_DIR`` names a fresh directory under pytest's ``tmp_path``,
set in ``os.environ`` so that the subprocesses the tests start (scripts, the CLI, a second process
reading the cache) inherit it too.

A ``$SYMNTK_CACHE_DIR`` already set when pytest starts is deliberately *overridden*, not honoured:

* it cannot be told apart from the user's own setting in a shell profile, which points at the
  cache they use for real work; honouring it would write test kernels into that cache;
* the tests exercise the cold-cache path (first compile, first manifest, a second process that
  then hits the cache); a warm cache from an earlier run would silently skip those paths, and
  some assertions (``from_manifest`` false on a first generation) would fail for reasons that have
  nothing to do with the code under test.

The price is that every session compiles its kernels once, which is what the suite measures
anyway.  Tests that need their own cache directory (an unwritable one, a second process) still set
``SYMNTK_CACHE_DIR`` with ``monkeypatch`` or a subprocess environment; that stays inside their own
``tmp_path``.
"""
from __future__ import annotations

import pytest

CACHE_ENV = "SYMNTK_CACHE_DIR"


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The session's private ``$SYMNTK_CACHE_DIR`` (a fresh, empty directory: a cold cache)."""
    path = tmp_path_factory.mktemp("symntk-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path
