"""Tests for symntk.activations: the registry, activation(), parse_formula(), derivative()."""

import pytest
import sympy as sp

from symntk.activations import ACTIVATIONS, X, activation, derivative, jump_points, parse_formula

# Expected expressions, one per registry key.  A new activation without an entry here
# fails test_every_activation_has_an_expected_form.
EXPECTED = {
    "relu": sp.Max(0, X),
    "leaky_relu": sp.Max(0, X) - sp.Rational(1, 100) * sp.Max(0, -X),
    "abs": sp.Max(0, X) + sp.Max(0, -X),
    "step": sp.Heaviside(X),
    "erf": sp.erf(X),
    "tanh": sp.tanh(X),
    "sigmoid": 1 / (1 + sp.exp(-X)),
    "gelu": X * (1 + sp.erf(X / sp.sqrt(2))) / 2,
    "sin": sp.sin(X),
    "cos": sp.cos(X),
    "exp": sp.exp(X),
    "identity": X,
    "softplus": sp.log(1 + sp.exp(X)),
    "swish": X / (1 + sp.exp(-X)),
    "silu": X / (1 + sp.exp(-X)),
    "monomial": X**2,
    "polynomial": None,  # needs coefficients, checked separately
}


def test_every_activation_has_an_expected_form():
    assert set(EXPECTED) == set(ACTIVATIONS)


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        ACTIVATIONS["new"] = lambda: X  # type: ignore[index]


def test_x_is_real():
    assert X == sp.Symbol("x", real=True) and X.is_real


@pytest.mark.parametrize("name", [k for k, v in EXPECTED.items() if v is not None])
def test_registry_expressions(name):
    expr = activation(name)
    assert expr.free_symbols == {X}
    assert sp.simplify(expr - EXPECTED[name]) == 0


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("leaky_relu(0.2)", sp.Max(0, X) - sp.Max(0, -X) / 5),
        ("leaky_relu(alpha=0.2)", sp.Max(0, X) - sp.Max(0, -X) / 5),
        ("monomial(3)", X**3),
        ("monomial(k=4)", X**4),
        ("polynomial([1, 0, 2])", 1 + 2 * X**2),
        ("polynomial(1, -1/2, 3)", 1 - X / 2 + 3 * X**2),
        ("  relu  ", sp.Max(0, X)),
        ("x*tanh(x)", X * sp.tanh(X)),
        ("tanh(x)", sp.tanh(X)),
        ("x", X),
    ],
)
def test_activation_from_strings(spec, expected):
    assert activation(spec) == expected


def test_parametrised_constructors_take_python_and_sympy_values():
    alpha = sp.Symbol("alpha", positive=True)
    assert ACTIVATIONS["leaky_relu"](0.2) == sp.Max(0, X) - sp.Max(0, -X) / 5
    assert ACTIVATIONS["leaky_relu"](alpha=alpha) == sp.Max(0, X) - alpha * sp.Max(0, -X)
    assert ACTIVATIONS["monomial"](5) == X**5
    assert ACTIVATIONS["polynomial"]([0, 1]) == X
    assert ACTIVATIONS["polynomial"]((1, 2, 3)) == 1 + 2 * X + 3 * X**2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("relux", "unknown activation 'relux'"),
        ("foo(0.2)", "unknown activation 'foo'"),
        ("monomial(0)", "integer >= 1"),
        ("monomial(1.5)", "integer >= 1"),
        ("leaky_relu(1, 2)", "bad parameters for activation 'leaky_relu'"),
        ("leaky_relu(beta=1)", "bad parameters"),
        ("polynomial([3])", "constant"),
    ],
)
def test_activation_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        activation(spec)


def test_unknown_activation_lists_known_ones():
    with pytest.raises(ValueError) as info:
        activation("nope")
    for name in ACTIVATIONS:
        assert name in str(info.value)


def test_activation_from_sympy_expression_and_lambda():
    t = sp.Symbol("t")
    assert activation(sp.tanh(t)) == sp.tanh(X)
    assert activation(sp.Lambda(t, t**2 + 1)) == X**2 + 1
    a = sp.Symbol("a")
    assert activation(sp.Lambda(t, a * sp.Max(0, t))) == a * sp.Max(0, X)
    assert activation(X**3) == X**3


@pytest.mark.parametrize("bad", [sp.Integer(3), sp.Symbol("a") * sp.Symbol("b")])
def test_activation_rejects_wrong_number_of_free_symbols(bad):
    with pytest.raises(ValueError, match="exactly one free symbol"):
        activation(bad)


def test_activation_rejects_lambda_of_two_variables_and_non_expressions():
    a, b = sp.symbols("a b")
    with pytest.raises(ValueError, match="one variable"):
        activation(sp.Lambda((a, b), a * b))
    with pytest.raises(TypeError):
        activation(3.0)


# ----------------------------------------------------------------------------- parser
@pytest.mark.parametrize(
    "text, expected",
    [
        ("x*tanh(x)", X * sp.tanh(X)),
        ("relu(x)**2 - 0.5*x", sp.Max(0, X) ** 2 - X / 2),
        ("exp(-x^2)", sp.exp(-(X**2))),
        ("-x**2", -(X**2)),  # unary minus binds looser than power, as in Python
        ("2**-1 * x", X / 2),
        ("x^2^3", X**8),  # right-associative
        ("1e-3*x + .5 + 2.", X / 1000 + sp.Rational(5, 2)),
        ("sigmoid(x)", 1 / (1 + sp.exp(-X))),
        ("step(x) + Heaviside(-x)", sp.Heaviside(X) + sp.Heaviside(-X)),
        ("max(x, 0) - Min(x, 1) + abs(x) + sign(x)", sp.Max(X, 0) - sp.Min(X, 1) + sp.Abs(X) + sp.sign(X)),
        ("pi*E*sqrt(x)*log(x)", sp.pi * sp.E * sp.sqrt(X) * sp.log(X)),
        ("erf(x) + erfc(x) + sin(x)*cos(x)*tan(x) + sinh(x) + cosh(x)",
         sp.erf(X) + sp.erfc(X) + sp.sin(X) * sp.cos(X) * sp.tan(X) + sp.sinh(X) + sp.cosh(X)),
        ("(x + 1) / (x - 1)", (X + 1) / (X - 1)),
    ],
)
def test_parse_formula_accepts(text, expected):
    assert parse_formula(text) == expected


def test_parse_formula_variables_are_real_symbols():
    expr = parse_formula("u*v + w", variables=("u", "v", "w"))
    assert all(s.is_real for s in expr.free_symbols)
    assert {s.name for s in expr.free_symbols} == {"u", "v", "w"}


@pytest.mark.parametrize(
    "text, token, position",
    [
        ("__import__('os')", "'__import__'", 0),
        ("x.real", "'.'", 1),
        ("lambda", "'lambda'", 0),
        ("y", "'y'", 0),
        ("open(1)", "'open'", 0),
        ("x + eval(x)", "'eval'", 4),
        ("x $ 2", "'$'", 2),
        ("2x", "'x'", 1),
        ("x +", "end of input", 3),
        ("(x", "end of input", 2),
        ("x)", "')'", 1),
        ("exp(x, 1)", "'exp'", 0),
        ("x/0", "'/'", 1),
        ("[x]", "'['", 0),
    ],
)
def test_parse_formula_rejects_with_token_and_position(text, token, position):
    with pytest.raises(ValueError) as info:
        parse_formula(text)
    assert token in str(info.value)
    assert f"position {position}" in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "9**9**9", "1e99999", "(" * 500 + "x" + ")" * 500])
def test_parse_formula_rejects_degenerate_inputs(text):
    with pytest.raises(ValueError):
        parse_formula(text)


def test_parse_formula_never_evaluates_text(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec/sympify used on text")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(sp, "sympify", forbidden)
    monkeypatch.setattr(sp, "parse_expr", forbidden)
    assert parse_formula("x*tanh(x) + 0.5") == X * sp.tanh(X) + sp.Rational(1, 2)


@pytest.mark.parametrize("bad", [("1x",), ("pi",), ("exp",), ("a b",)])
def test_parse_formula_rejects_bad_variable_names(bad):
    with pytest.raises(ValueError):
        parse_formula("1", variables=bad)


# ------------------------------------------------------------------------- derivative
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("relu", sp.Heaviside(X)),
        ("leaky_relu(0.2)", sp.Heaviside(X) + sp.Heaviside(-X) / 5),
        ("abs", sp.Heaviside(X) - sp.Heaviside(-X)),
        ("erf", 2 * sp.exp(-(X**2)) / sp.sqrt(sp.pi)),
        ("identity", sp.Integer(1)),
        ("monomial(3)", 3 * X**2),
        ("sin", sp.cos(X)),
        (sp.Abs(X), sp.sign(X)),
    ],
)
def test_derivative(spec, expected):
    assert sp.simplify(derivative(spec) - expected) == 0


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_of_every_registered_activation(name):
    """Every activation has a DiracDelta-free derivative (almost everywhere: step's is 0) that
    matches a central difference away from the kink or jump at 0."""
    expr = activation(name if name != "polynomial" else "polynomial([0, 1, 1])")
    d = derivative(expr)
    assert not d.has(sp.DiracDelta, sp.Derivative, sp.Subs)
    assert d.free_symbols <= {X}
    # Matches a central difference away from the kink at 0.
    for x0 in (-1.3, 0.7, 2.1):
        h = 1e-6
        fd = (expr.subs(X, x0 + h) - expr.subs(X, x0 - h)) / (2 * h)
        assert abs(float(d.subs(X, x0)) - float(fd)) < 1e-6


@pytest.mark.parametrize("spec, expected", [
    ("step", 0), (sp.sign(X), 0), (sp.Heaviside(X) * X**2 + sp.Heaviside(X), 2 * X * sp.Heaviside(X)),
    (sp.floor(2 * X) + X, 1), (sp.frac(X), 1), (sp.ceiling(X) * X, sp.ceiling(X)),
    (sp.Piecewise((X + 1, X >= 0), (X, True)), 1)])
def test_derivative_almost_everywhere(spec, expected):
    """Jumps: the Dirac part of the weak derivative is dropped (autodiff's and Neural Tangents'
    convention), floor/ceiling differentiate to 0."""
    assert sp.simplify(derivative(spec) - expected) == 0


@pytest.mark.parametrize("spec, points", [
    ("step", [sp.Eq(X, 0)]), ("sign(x)", [sp.Eq(X, 0)]), ("sign(2*x + 1)", [sp.Eq(X, -sp.Rational(1, 2))]),
    ("x + step(x - 1)", [sp.Eq(X, 1)]), ("floor(2*x)", [sp.Contains(2 * X, sp.Integers)]),
    (sp.Piecewise((1, X >= 0), (0, True)), [sp.Eq(X, 0)]),
    (sp.Piecewise((X + 1, X >= 0), (X, True)), [sp.Eq(X, 0)]),
    (sp.Piecewise((X**2, X > 2), (X, True)), [sp.Eq(X, 2)]),
    # continuous, with kinks or removable edges: no jump
    ("relu", []), ("abs", []), ("x*sign(x)", []), ("(x - 1)*step(x - 1)", []), ("erf", []),
    (sp.Piecewise((X, X >= 0), (0, True)), []), (sp.Piecewise((X**2, X > 1), (X, True)), []),
])
def test_jump_points(spec, points):
    assert set(jump_points(activation(spec), X)) == set(points)


def test_jump_points_in_one_argument_of_two():
    a, b = sp.symbols("a b", real=True)
    expr = sp.sign(a) * b + sp.Abs(b)
    assert jump_points(expr, a) == (sp.Eq(a, 0),) and jump_points(expr, b) == ()


def test_derivative_still_refuses_what_it_cannot_differentiate():
    f = sp.Function("f")
    with pytest.raises(ValueError, match="not differentiable"):
        derivative(f(X))
