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
from symntk.gaussian import DualActivation, expect
from symntk.latex import expand_duals, paper_form

GOLDEN = Path(__file__).parent / "golden"


def _golden(name):
    return (GOLDEN / name).read_text().rstrip("\n")


# ------------------------------------------------ golden LaTeX: the paper form (default)
def test_golden_latex_relu_mlp_depth3():
    d = symntk.derive(symntk.mlp(3, "relu", input_dim=3))
    text = d.latex()
    assert text == _golden("mlp3_relu.tex")
    # Named, defined once, used in the recursion.
    assert text.count(r"V_{\mathrm{relu}}(q,q',\rho) &=") == 1
    assert r"\rho^{x^{l - 1}}(\xi,\xi')" in text and r"\Sigma^{0}(\xi,\xi') &= \frac{\xi^{\top}\xi'}{d}" in text
    assert r"\arccos" not in text.split(r"\textbf{where}")[0]


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
    assert r"V_{\mathrm{erf}}\left(\Sigma^{h^{l}}(\xi,\xi), \Sigma^{h^{l}}(\xi',\xi'), \rho^{h^{l}}(\xi,\xi')\right)" in text


# ------------------------------------------------ golden LaTeX: expand=True (every closed form in place)
def test_golden_latex_expanded():
    d = symntk.derive(symntk.mlp(2, "relu", input_dim=3))
    assert d.latex(expand=True) == _golden("mlp2_relu_expanded.tex")
    assert d.latex(notation="cd", closed_forms=False, expand=True) == _golden(
        "mlp2_relu_cd_expectations_expanded.tex")
    sw, sb = sp.Symbol("sigma_w"), sp.Symbol("sigma_b")
    d = symntk.derive(symntk.mlp(3, "erf", weight_std=sw, bias_std=sb))
    assert d.latex(expand=True) == _golden("mlp3_erf_symbolic_expanded.tex")


# ------------------------------------------------ the paper form says the same as the derivation
def _substitute(expr, definitions):
    """Replace placeholders by their definitions until none is left."""
    for _ in range(10):
        if not expr.free_symbols & definitions.keys():
            return expr
        expr = expr.xreplace(definitions)
    raise AssertionError(f"placeholders left in {expr}")


PAPER_CASES = {
    "relu_depth3": lambda: symntk.derive(symntk.mlp(3, "relu")),
    "relu_bias": lambda: symntk.derive(symntk.mlp(2, "relu", bias_std=0.1, weight_std=1.5)),
    "erf_symbolic": lambda: symntk.derive(symntk.mlp(3, "erf", weight_std=sp.Symbol("sigma_w"),
                                                     bias_std=sp.Symbol("sigma_b"))),
    "gelu": lambda: symntk.derive(symntk.mlp(2, "gelu")),
    "tanh_quadrature": lambda: symntk.derive(symntk.mlp(2, "tanh")),
    "exact_tied_readout": lambda: symntk.derive(symntk.examples.tied_readout_embedding(), mode="exact"),
    "exact_mean_pooled_erf": lambda: symntk.derive(symntk.examples.mean_pooled_readout("erf"), mode="exact"),
}


@pytest.mark.parametrize("case", sorted(PAPER_CASES))
def test_paper_form_substitutes_back_to_the_derivation(case):
    """Every printed line, with the where-block definitions (rho, Sigma^0 and the dual activations
    in their (q, q', rho) form) substituted back, equals the derivation's closed-form equation."""
    d = PAPER_CASES[case]()
    rows, definitions = paper_form(d)
    red = d.reduced()
    expected = [(e.lhs, e.rhs) for e in red.equations] + \
        ([(sp.Symbol("K"), red.nngp)] if red.nngp is not None else []) + [(sp.Symbol("Theta"), red.ntk)]
    assert [lhs for lhs, _ in rows] == [lhs for lhs, _ in expected]
    named = 0
    for (lhs, printed), (_, rhs) in zip(rows, expected):
        back = _substitute(printed, definitions)
        assert back == rhs or sp.simplify(back - rhs) == 0, (lhs, printed)
        named += printed != rhs
    assert named > 0


def test_paper_form_names_the_table_duals():
    """A named dual is introduced once per derivation, whichever layer uses it."""
    rows, definitions = paper_form(symntk.derive(symntk.mlp(3, "relu")))
    texts = symntk.derive(symntk.mlp(3, "relu")).latex()
    for name in (r"V_{\mathrm{relu}}", r"V_{\mathrm{step}}"):
        assert texts.count(name + "(") == 1 and texts.count(name + r"\left(") >= 2


def test_named_expect_is_the_table_value():
    u, v = sp.symbols("u v", real=True)
    a, b, c = sp.symbols("a b c", positive=True)
    for integrand in (sp.Max(0, u) * sp.Max(0, v), sp.Heaviside(u) * sp.Max(0, v) + sp.erf(u) * sp.erf(v),
                      3 * sp.erf(u) * sp.Heaviside(v), sp.Max(0, u) * sp.Max(0, -u)):
        named = expect(integrand, (u, v), [[a, c], [c, b]], named=True)
        assert expand_duals(named) == expect(integrand, (u, v), [[a, c], [c, b]])
    assert expect(sp.Max(0, u) * sp.Max(0, v), (u, v), [[a, c], [c, b]], named=True).atoms(DualActivation)
    # Proportional forms (c = -1 exactly) are not dressed up as a dual.
    assert not expect(sp.Max(0, u) * sp.Max(0, -u), (u, v), [[a, c], [c, b]], named=True).atoms(DualActivation)


def test_paper_form_is_deterministic():
    """Same text in a fresh interpreter (placeholders are named, not Dummies; no hash order)."""
    code = ("import symntk, sympy as sp; print(symntk.derive(symntk.examples.tied_readout_embedding(),"
            " mode='exact').latex())")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**env, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and r"\textbf{where}" in outs.pop()


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
    lambda: symntk.derive(symntk.mlp(3, "relu")).latex(standalone=True),
    lambda: symntk.derive(symntk.mlp(3, "relu", bias_std=0.1)).latex(standalone=True),
    lambda: symntk.derive(symntk.examples.tied_readout_embedding(), mode="exact").latex(
        standalone=True, highlight_zdot=True),
    lambda: symntk.derive(symntk.mlp(3, "relu")).latex(standalone=True, expand=True),
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
