"""The ``multidrop`` command: a thin front end over the library.

Example:
    $ multidrop plan model.keras --rate 0.2
    $ multidrop insert model.keras -o rewired.keras --rate 0.2 --where activations --kind auto
    $ multidrop insert model.keras -o rewired.keras --rate fc1=0.5,fc2=0.3 --where fc1,fc2
    $ multidrop verify model.keras --rate 0.2 --backends torch,jax,tensorflow --json report.json
    $ multidrop set bert.keras -o bert_02.keras --rate 0.2      # the layers' own dropout rates
    $ multidrop verify bert.keras --edit set --rate 0.2         # ... proven on every backend
    $ multidrop demo                     # the whole job on the bundled digits CNN

Bad input (a missing or unreadable file, a bad option) prints one line to
stderr and exits with status 2; no traceback. ``multidrop verify`` exits 1
when the models disagree.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import zipfile

import rich.console

import multidrop
from multidrop import select
from multidrop.options import Options, SetOptions


class UsageError(Exception):
    """A problem with the command line or its files; printed as one line."""


def load_model(path: str):
    """Load a ``.keras`` file, or raise `UsageError` saying what is wrong with it."""
    import keras

    file = pathlib.Path(path)
    if not file.is_file():
        raise UsageError(f"no such model file: {path}")
    if file.suffix != ".keras":
        raise UsageError(f"{path} is not a .keras file; save the model with model.save('model.keras')")
    if not zipfile.is_zipfile(file):
        raise UsageError(f"{path} is not a .keras archive (not a zip file): it is corrupt or truncated")
    try:
        return keras.saving.load_model(file)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load {path} as a Keras model: {first}") from error


def parse_rate(text: str):
    """``0.2`` -> 0.2; ``fc1=0.5,fc2=0.3`` -> {"fc1": 0.5, "fc2": 0.3}."""
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.split("=", 1) for item in text.split(","))
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise UsageError(f"--rate {text!r} is neither a number nor name=rate pairs like fc1=0.5,fc2=0.3")


def parse_where(text: str):
    """``activations``, ``re:PATTERN``, or comma-separated layer names."""
    if text == "activations":
        return select.activations()
    if text.startswith("re:"):
        return select.regex(text[3:])
    return [name.strip() for name in text.split(",") if name.strip()]


def add_insert_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``insert_dropout`` that every subcommand shares."""
    parser.add_argument("--rate", default="0.1", help="a float in [0, 1) or name=rate pairs (default 0.1)")
    parser.add_argument("--where",
                        help="'activations' (default), 're:PATTERN', or comma-separated layer names")
    parser.add_argument("--kind", default="dropout", help="dropout, spatial, gaussian, alpha or auto")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible masks")
    parser.add_argument("--include-outputs", action="store_true", help="also after model outputs")
    parser.add_argument("--mc", action="store_true", help="keep dropout on at inference (Monte Carlo)")


def insert_options(args: argparse.Namespace) -> Options:
    """The command line's insert options, validated once as an `Options` record."""
    return Options(
        rate=parse_rate(args.rate), where=parse_where(args.where or "activations"), kind=args.kind,
        seed=args.seed, include_outputs=args.include_outputs, mc=args.mc,
    )


def cmd_plan(args) -> int:
    print(multidrop.plan(load_model(args.model), **insert_options(args).changed()))
    return 0


def cmd_insert(args) -> int:
    model, options = load_model(args.model), insert_options(args).changed()
    added = len(multidrop.plan(model, **options))
    _save(multidrop.insert_dropout(model, **options), args.output)
    print(f"wrote {args.output}: '{model.name}' with {added} dropout layers inserted")
    return 0


def set_options(args: argparse.Namespace) -> SetOptions:
    """The command line's options of ``set_dropout``, validated once."""
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    where = None if args.where is None else parse_where(args.where)
    return SetOptions(rate=parse_rate(args.rate), where=where, fields=fields)


def cmd_set(args) -> int:
    model, options = load_model(args.model), set_options(args).changed()
    print(multidrop.set_plan(model, **options))
    _save(multidrop.set_dropout(model, **options), args.output)
    print(f"wrote {args.output}: '{model.name}' with its own dropout rates set")
    return 0


def _save(model, path: str) -> None:
    try:
        model.save(path)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from error


def cmd_verify(args) -> int:
    model = load_model(args.model)
    if args.edit == "set":
        options = set_options(args).changed()
    else:
        options = insert_options(args).changed()
    # Selectors hold closures, which cannot be sent to the backend subprocesses: send
    # 'activations' as the string, and a regex as the names of the sites it picks.
    if args.edit == "insert" and args.where in (None, "activations"):
        options["where"] = "activations"
    elif args.where and args.where.startswith("re:"):
        dry_run = multidrop.set_plan if args.edit == "set" else multidrop.plan
        options["where"] = sorted({row.qualname for row in dry_run(model, **options)})
    tolerances = {name: value for name, value in (("atol", args.atol), ("rtol", args.rtol))
                  if value is not None}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    status = rich.console.Console(stderr=True).status(f"verifying on {', '.join(backends)}")
    with status:
        report = multidrop.cross_backend(
            args.model, backends, tolerances=tolerances, edit=args.edit, **options
        )
    print(report)
    if args.json:
        try:
            pathlib.Path(args.json).write_text(report.to_json())
        except OSError as error:
            raise UsageError(f"cannot write --json {args.json}: {error.strerror}") from error
    return 0 if report.ok else 1


def cmd_demo(args) -> int:
    from multidrop import demo

    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the demo needs {' and '.join(missing)}: pip install 'multidrop[demo]'")
    if args.mc:
        raise UsageError("demo draws Monte Carlo samples with mc_predict itself; drop --mc")
    if args.epochs < 1 or args.samples < 1:
        raise UsageError("--epochs and --samples must be at least 1")
    model = load_model(args.model) if args.model else None
    demo.run(model, options=insert_options(args), epochs=args.epochs, samples=args.samples,
             out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multidrop", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="print where dropout would go (a dry run)")
    plan.add_argument("model", help="a .keras file")
    add_insert_options(plan)
    plan.set_defaults(run=cmd_plan)

    insert = commands.add_parser("insert", help="write a copy of the model with dropout inserted")
    insert.add_argument("model", help="a .keras file")
    insert.add_argument("-o", "--output", required=True, help="where to write the rewired .keras file")
    add_insert_options(insert)
    insert.set_defaults(run=cmd_insert)

    verify = commands.add_parser(
        "verify", help="prove the rewired model answers like the original on every backend")
    verify.add_argument("model", help="a .keras file")
    verify.add_argument("--backends", default="torch,jax,tensorflow",
                        help="comma-separated backends to run (default torch,jax,tensorflow)")
    add_insert_options(verify)
    for name, what in (("--atol", "absolute"), ("--rtol", "relative")):
        verify.add_argument(name, type=float, help=f"{what} tolerance between backends (default: by dtype)")
    verify.add_argument("--json", metavar="FILE", help="also write the report to FILE as JSON")
    verify.add_argument("--edit", choices=("insert", "set"), default="insert",
                        help="insert dropout (default) or set the layers' own rates (as `set`)")
    verify.add_argument("--fields", help="with --edit set: only these fields, comma-separated")
    verify.set_defaults(run=cmd_verify)

    set_ = commands.add_parser(
        "set", help="write a copy of the model with its layers' own dropout rates set")
    set_.add_argument("model", help="a .keras file")
    set_.add_argument("-o", "--output", required=True, help="where to write the .keras file")
    set_.add_argument("--rate", required=True, help="a float in [0, 1) or name=rate pairs")
    set_.add_argument("--where", help="'re:PATTERN' or comma-separated layer names "
                      "(default: every layer with a dropout-rate field)")
    set_.add_argument("--fields", help="only these fields, e.g. recurrent_dropout (default: all)")
    set_.set_defaults(run=cmd_set)

    demo = commands.add_parser(
        "demo", help="plan, insert, verify, fine-tune and MC dropout on a digits CNN (or --model)")
    demo.add_argument("--model", help="your own .keras file instead of the bundled digits CNN")
    demo.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    demo.add_argument("--samples", type=int, default=30, help="Monte Carlo samples (default 30)")
    demo.add_argument("--out", default=".", help="folder for the PNG (default: the current one)")
    add_insert_options(demo)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, TypeError) as error:
        message = " ".join(str(error).split())  # one line, even for Keras' multi-line errors
        print(f"multidrop {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
