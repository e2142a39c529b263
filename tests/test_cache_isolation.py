"""The suite never touches the user's kernel cache (conftest.py's ``kernel_cache``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import platformdirs

import symntk
from symntk import codegen


def test_cache_dir_is_the_session_tmp_dir(kernel_cache):
    real = Path(platformdirs.user_cache_dir("symntk")).resolve()
    here = Path(codegen.cache_dir()).resolve()
    assert here == Path(kernel_cache).resolve()
    assert real != here and real not in here.parents


def test_subprocesses_inherit_the_session_cache(kernel_cache):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(symntk.__file__).parents[1]),
                                        env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", "from symntk.codegen import cache_dir; "
                          "print(cache_dir())"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == Path(kernel_cache).resolve()
