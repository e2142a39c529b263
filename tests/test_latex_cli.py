"""Printing (golden LaTeX, pdflatex) and the command line."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symntk
from symntk.cli import main

GOLDEN = Path(__file__).parent / "golden"


def _golden(name):
    return (GOLDEN / name).read_text().rstrip("\n")


def test_golden_latex_relu_mlp_depth2():
    d = symntk.derive(symntk.mlp(2, "relu", input_dim=3))
    assert d.latex() == _golden("mlp2_relu.tex")


def test_golden_latex_expectations_in_cd_notation():
    d = symntk.derive(symntk.mlp(2, "relu", input_dim=3))
    assert d.latex(notation="cd", closed_forms=False) == _golden("mlp2_relu_cd_expectations.tex")


def test_golden_latex_symbolic_erf_recursion_in_l():
    sw, sb = sp.Symbol("sigma_w"), sp.Symbol("sigma_b")
    d = symntk.derive(symntk.mlp(3, "erf", weight_std=sw, bias_std=sb))
    text = d.latex()
    assert text == _golden("mlp3_erf_symbolic.tex")
    assert r"\text{for } l = 2, \dots, 3" in text
    assert r"\Sigma^{h^{l}}(\xi,\xi') &= \sigma_{b}^{2} + \sigma_{w}^{2} C^{x^{l - 1}}(\xi,\xi')" in text


def test_repr_latex_for_notebooks():
    d = symntk.derive(symntk.mlp(2, "erf"))
    out = d._repr_latex_()
    assert out.startswith("$\\displaystyle \\begin{aligned}") and out.endswith("$")


def test_bad_notation():
    with pytest.raises(ValueError, match="unknown notation"):
        symntk.derive(symntk.mlp(1, "relu")).latex(notation="bogus")


needs_pdflatex = pytest.mark.skipif(shutil.which("pdflatex") is None,
                                    reason="pdflatex not installed (.ci/run installs it)")


@needs_pdflatex
@pytest.mark.parametrize("build", [
    lambda: symntk.derive(symntk.mlp(3, "relu", bias_std=0.1)).latex(standalone=True),
    lambda: symntk.derive(symntk.mlp(2, "tanh"), mode="gia").latex(standalone=True, closed_forms=False),
    lambda: symntk.compare(symntk.examples.square_readout()).latex(standalone=True),
])
def test_standalone_document_compiles(tmp_path, build):
    tex = tmp_path / "doc.tex"
    tex.write_text(build())
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


# ---------------------------------------------------------------- CLI
def test_cli_derive_latex_and_eval(capsys, tmp_path):
    out = tmp_path / "mlp.tex"
    rc = main(["derive", "mlp", "--depth", "3", "--activation", "relu", "--bias-std", "0.1",
               "--latex", "--out", str(out), "--eval", "1,2,0; 0.5,-1,1.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert r"\begin{aligned}" in text and "NTK =" in text
    assert out.read_text().startswith(r"\documentclass")
    K = symntk.derive(symntk.mlp(3, "relu", bias_std=0.1)).gram(np.array([[1.0, 2, 0], [0.5, -1, 1.5]]))
    assert f"{K.ntk[0, 1]:.6f}" in text


def test_cli_formula_activation_is_parsed_not_evaluated(capsys):
    assert main(["derive", "mlp", "--depth", "1", "--activation", "x*tanh(x)"]) == 0
    assert "E[u_1*u_2*tanh(u_1)*tanh(u_2) | (u_1, u_2) ~ N(0" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["derive", "mlp", "--activation", "bogus"], "unknown activation"),
    (["derive", "mlp", "--activation", "__import__('os').system('true')"], "error"),
    (["derive", "mlp", "--activation", "step"], "not differentiable"),
    (["derive", "nosuch.py"], "no such file"),
    (["derive", "mlp", "--eval", "1,2; 3"], "equal length"),
    (["derive", "mlp", "--weight-std", "1e"], "not a number"),
])
def test_cli_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_derive_python_file(tmp_path, capsys):
    arch = tmp_path / "arch.py"
    arch.write_text("import symntk\nprogram = symntk.residual_mlp(3, 'erf', bias_std=0.2)\n")
    assert main(["derive", str(arch)]) == 0
    assert "residual_mlp3" in capsys.readouterr().out
    bad = tmp_path / "bad.py"
    bad.write_text("program = 3\n")
    assert main(["derive", str(bad)]) == 2


def test_cli_compare_example(capsys):
    assert main(["compare", "square_readout", "--eval", "1; 0.5"]) == 0
    out = capsys.readouterr().out
    assert "Simple GIA Check FAILS" in out and "c**2" in out


def test_console_script_entry_point():
    """`symntk` and `python -m symntk.cli` run the same main."""
    r = subprocess.run([sys.executable, "-m", "symntk.cli", "derive", "mlp", "--depth", "1"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0 and "ntk =" in r.stdout


def test_cli_converge(capsys, tmp_path):
    rc = main(["converge", "mlp", "--depth", "2", "--activation", "erf", "--widths", "32,64,128",
               "--seeds", "3", "--inputs", "4", "--input-dim", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fitted log-log slope" in out and "    128" in out
    assert main(["converge", "mlp", "--widths", "32,abc"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
