"""The ``symntk`` command line.

    symntk derive mlp --depth 3 --activation relu [--bias-std 0.1] [--latex] [--out file.tex]
    symntk derive path/to/arch.py            # a Python file that defines ``program``
    symntk derive mlp --depth 2 --activation "x*tanh(x)" --eval "1,2,0; 0.5,-1,1.5"
    symntk cache info | clear                # the compiled-kernel cache ($SYMNTK_CACHE_DIR)

Formula strings (activations, ``--eval`` data) are parsed with a whitelist, never ``eval``-ed.
Errors are one clear line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

__all__ = ["main", "build_parser"]

ARCHITECTURES = {"mlp": "mlp", "residual_mlp": "residual_mlp", "resmlp": "residual_mlp",
                 "tied_mlp": "tied_mlp"}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _float(text: str, what: str) -> float:
    if not re.fullmatch(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*", text):
        raise CLIError(f"{what}: {text!r} is not a number")
    return float(text)


def parse_matrix(text: str):
    """'1,2,0; 0.5,-1,1.5' -> a (2, 3) float array (rows separated by ';')."""
    import numpy as np
    rows = [r for r in text.split(";") if r.strip()]
    data = [[_float(v, "--eval") for v in r.split(",")] for r in rows]
    if not data or len({len(r) for r in data}) != 1:
        raise CLIError("--eval: rows must be non-empty and of equal length, e.g. '1,2,0; 0.5,-1,1.5'")
    return np.array(data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="symntk", description="Symbolic infinite-width NTK / NNGP "
                                "of tensor programs (Tensor Programs II).")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("derive", help="derive and print the NNGP/NTK recursion of an architecture")
    d.add_argument("architecture", help=f"one of {sorted(ARCHITECTURES)} or a path to a .py file "
                   "defining `program`")
    d.add_argument("--depth", type=int, default=2, help="number of Dense->activation blocks")
    d.add_argument("--activation", default="relu",
                   help="a name (relu, erf, leaky_relu(0.2), ...) or a formula in x")
    d.add_argument("--weight-std", default="1.0")
    d.add_argument("--bias-std", default=None, help="omit for no biases")
    d.add_argument("--parametrization", default="ntk", choices=["ntk", "tp", "standard"])
    d.add_argument("--mode", default="gia", choices=["gia", "exact"])
    d.add_argument("--latex", action="store_true", help="print LaTeX instead of plain text")
    d.add_argument("--notation", default="sigma", choices=["sigma", "cd"])
    d.add_argument("--no-closed-forms", action="store_true",
                   help="print Gaussian expectations instead of their closed forms")
    d.add_argument("--out", help="write a standalone .tex document to this file")
    d.add_argument("--eval", dest="data", help="evaluate the kernels on these inputs, rows "
                   "separated by ';', e.g. '1,2,0; 0.5,-1,1.5'")
    d.set_defaults(run=_derive)

    c = sub.add_parser("compare", help="GIA vs exact derivation, the Simple GIA Check, and "
                       "optionally the finite-width truth")
    c.add_argument("architecture", help="a .py file defining `program`, a builder name, or one of "
                   "the examples: " + ", ".join(_EXAMPLES))
    c.add_argument("--depth", type=int, default=2)
    c.add_argument("--activation", default="relu")
    c.add_argument("--weight-std", default="1.0")
    c.add_argument("--bias-std", default=None)
    c.add_argument("--parametrization", default="ntk", choices=["ntk", "tp", "standard"])
    c.add_argument("--eval", dest="data", help="inputs, rows separated by ';' (default: two "
                   "random inputs of the program's dimension)")
    c.add_argument("--width", type=int, help="also simulate networks of this width")
    c.add_argument("--seeds", type=int, default=8, help="number of networks with --width")
    c.add_argument("--latex", action="store_true", help="print both recursions in LaTeX")
    c.add_argument("--out", help="write a standalone .tex comparison to this file")
    c.set_defaults(run=_compare)

    v = sub.add_parser("converge", help="finite-width empirical NTK vs the derived limit: "
                       "relative deviation per width (the NTK4A deviation study)")
    v.add_argument("architecture", help=f"one of {sorted(ARCHITECTURES)}, an example, or a .py file")
    v.add_argument("--depth", type=int, default=2)
    v.add_argument("--activation", default="relu")
    v.add_argument("--weight-std", default="1.0")
    v.add_argument("--bias-std", default=None)
    v.add_argument("--parametrization", default="ntk", choices=["ntk", "tp", "standard"])
    v.add_argument("--widths", default="64,128,256,512,1024,2048,4096",
                   help="comma-separated widths")
    v.add_argument("--seeds", type=int, default=10, help="networks per width")
    v.add_argument("--inputs", type=int, default=16, help="random inputs (d = --input-dim)")
    v.add_argument("--input-dim", type=int, default=8)
    v.add_argument("--plot", help="write the log-log figure here (needs matplotlib)")
    v.set_defaults(run=_converge)
    k = sub.add_parser("cache", help="the compiled-kernel cache ($SYMNTK_CACHE_DIR)")
    k.add_argument("action", choices=["info", "clear"],
                   help="info: where it is and what it holds; clear: delete the kernels")
    k.set_defaults(run=_cache)
    return p


def _cache(args) -> int:
    from . import codegen
    if args.action == "info":
        info = codegen.cache_info()
        print(f"path:        {info['path']}")
        print(f"modules:     {info['modules']}")
        print(f"numba files: {info['numba_files']}")
        print(f"size:        {info['bytes'] / 1e6:.2f} MB")
    else:
        n = codegen.clear_cache()
        print(f"removed {n} files from {codegen.cache_dir()}")
    return 0


def _converge(args) -> int:
    import numpy as np
    from . import examples
    from .convergence import convergence, plot_convergence
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise CLIError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    if not widths or min(widths) < 1 or args.seeds < 2:
        raise CLIError("need positive widths and --seeds >= 2")
    if args.architecture in _EXAMPLES:
        program = getattr(examples, args.architecture)()
    else:
        program = _load_program(args, input_dim=args.input_dim)
    dims = {inp.dim for inp in program.inputs}
    dim = next(iter(dims))
    d = int(dim) if getattr(dim, "is_Integer", False) else args.input_dim
    X = np.random.default_rng(0).normal(size=(args.inputs, d))
    record = convergence(program, X, widths, args.seeds)
    print(record.table())
    if args.plot:
        plot_convergence(record, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


_EXAMPLES = ("tp2_section_6_3", "square_readout", "trained_readout_square", "ata_v",
             "tied_readout_embedding", "mean_pooled_readout")


def _compare(args) -> int:
    import numpy as np
    from . import examples
    from .compare import compare
    if args.architecture in _EXAMPLES:
        program = getattr(examples, args.architecture)()
    else:
        program = _load_program(args)
    if args.data:
        X = parse_matrix(args.data)
    else:
        dims = {inp.dim for inp in program.inputs}
        dim = next(iter(dims)) if len(dims) == 1 else None
        if dim is None or not getattr(dim, "is_Integer", False):
            raise CLIError("give --eval data: the program's input dimension is not a fixed integer")
        X = np.random.default_rng(0).normal(size=(2, int(dim)))
    if args.width is not None and args.width < 1:
        raise CLIError("--width must be a positive integer")
    result = compare(program, X, width=args.width, seeds=args.seeds if args.width else 0)
    print(result.report())
    if args.latex:
        print(result.latex())
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(result.latex(standalone=True))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _load_program(args, input_dim=None):
    import symntk
    target = args.architecture
    if target in ARCHITECTURES:
        builder = getattr(symntk, ARCHITECTURES[target])
        from .activations import activation
        act = activation(args.activation)
        bias = None if args.bias_std is None else _float(args.bias_std, "--bias-std")
        extra = {} if input_dim is None else {"input_dim": input_dim}
        return builder(args.depth, act, weight_std=_float(args.weight_std, "--weight-std"),
                       bias_std=bias, parametrization=args.parametrization, **extra)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise CLIError(f"no such file: {target}")
        import runpy
        namespace = runpy.run_path(target)       # the user's own architecture file, like a script
        program = namespace.get("program")
        if not isinstance(program, symntk.Program):
            raise CLIError(f"{target} must define `program`, a symntk.Program "
                           f"(found {type(program).__name__})")
        return program
    raise CLIError(f"unknown architecture {target!r}; expected one of {sorted(ARCHITECTURES)} "
                   "or a .py file")


def _derive(args) -> int:
    import symntk
    program = _load_program(args)
    d = symntk.derive(program, mode=args.mode)
    closed = not args.no_closed_forms
    if args.latex:
        print(d.latex(notation=args.notation, closed_forms=closed))
    else:
        print(str(d.reduced() if closed else d))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(d.latex(notation=args.notation, closed_forms=closed, standalone=True))
        print(f"wrote {args.out}", file=sys.stderr)
    if args.data:
        X = parse_matrix(args.data)
        r = d.gram(X)
        import numpy as np
        with np.printoptions(precision=6, suppress=True):
            if r.nngp is not None:
                print("NNGP =\n" + str(r.nngp))
            print("NTK =\n" + str(r.ntk))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CLIError as exc:
        print(f"symntk: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
        print(f"symntk: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
