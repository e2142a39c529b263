"""Every worked derivation in derivations/ runs as a user would run it and reports agreement."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "derivations").glob("*.py")
                 if not p.name.startswith("_") and p.name != "mlp_convergence.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_derivation_script_runs_and_agrees(script, tmp_path):
    """Exit code 0 means every check the script makes passed (golden values, or the finite-width
    simulation agreeing with the exact derivation)."""
    r = subprocess.run([sys.executable, str(ROOT / "derivations" / script)]
                       + (["--out", str(tmp_path)] if script == "mlp.py" else [])
                       + (["--quick", "--out", str(tmp_path)] if script == "transformer.py"
                          else []),
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "AGREES" in r.stdout or "all checks passed" in r.stdout
