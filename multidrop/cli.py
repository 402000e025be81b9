"""The ``multidrop`` command: a thin front end over the library.

Example:
    $ multidrop plan model.keras --rate 0.2
    $ multidrop insert model.keras -o rewired.keras --rate 0.2 --where activations --kind auto
    $ multidrop insert model.keras -o rewired.keras --rate fc1=0.5,fc2=0.3 --where fc1,fc2
    $ multidrop verify model.keras --rate 0.2 --backends torch,jax,tensorflow --json report.json
    $ multidrop set bert.keras -o bert_02.keras --rate 0.2      # the layers' own dropout rates
    $ multidrop verify bert.keras --edit set --rate 0.2         # ... proven on every backend
    $ multidrop demo                     # the whole job on the bundled digits CNN
    $ multidrop search model.keras --train train.npz --validation val.npz \\
          --where head=fc1,fc2 --where all=activations --rates 0,0.2,0.5 --seeds 3 -d search
    $ multidrop demo search              # does dropout help a small-data fine-tune? measured

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
from multidrop.demo.search import EPOCHS as DEMO_SEARCH_EPOCHS
from multidrop.options import Options, SetOptions
from multidrop.search import STRATEGIES


class UsageError(Exception):
    """A problem with the command line or its files; printed as one line."""


def load_model(path: str):
    """Load a ``.keras`` file, or raise `UsageError` saying what is wrong with it."""
    import keras

    file = pathlib.Path(path)
    if not file.is_file():
        raise UsageError(f"no such model file: {path}")
    if file.suffix != ".keras":
        raise UsageError(
            f"{path} is not a .keras file; save the model with model.save('model.keras')"
        )
    if not zipfile.is_zipfile(file):
        raise UsageError(
            f"{path} is not a .keras archive (not a zip file): it is corrupt or truncated"
        )
    try:
        return keras.saving.load_model(file)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Could not locate class" in first:
            first = first.split(". ")[0] + (
                ". Register your classes with @keras.saving.register_keras_serializable() "
                "and name their module with multidrop --import MODULE"
            )
        raise UsageError(f"cannot load {path} as a Keras model: {first}") from error


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise UsageError(
            f"--import {module}: {error}; give a module on your PYTHONPATH (run multidrop "
            "from the folder that holds it)"
        ) from error


def parse_rate(text: str):
    """``0.2`` -> 0.2; ``fc1=0.5,fc2=0.3`` -> {"fc1": 0.5, "fc2": 0.3}."""
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.split("=", 1) for item in text.split(","))
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError as error:
        raise UsageError(
            f"--rate {text!r} is neither a number nor name=rate pairs like fc1=0.5,fc2=0.3"
        ) from error


def parse_where(text: str):
    """``activations``, ``re:PATTERN``, or comma-separated layer names."""
    if text == "activations":
        return select.activations()
    if text.startswith("re:"):
        return select.regex(text[3:])
    return [name.strip() for name in text.split(",") if name.strip()]


def add_insert_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``insert_dropout`` that every subcommand shares."""
    parser.add_argument(
        "--rate", default="0.1", help="a float in [0, 1) or name=rate pairs (default 0.1)"
    )
    parser.add_argument(
        "--where", help="'activations' (default), 're:PATTERN', or comma-separated layer names"
    )
    parser.add_argument(
        "--kind", default="dropout", help="dropout, spatial, gaussian, alpha or auto"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible masks")
    parser.add_argument("--include-outputs", action="store_true", help="also after model outputs")
    parser.add_argument(
        "--mc", action="store_true", help="keep dropout on at inference (Monte Carlo)"
    )


def insert_options(args: argparse.Namespace) -> Options:
    """The command line's insert options, validated once as an `Options` record."""
    return Options(
        rate=parse_rate(args.rate),
        where=parse_where(args.where or "activations"),
        kind=args.kind,
        seed=args.seed,
        include_outputs=args.include_outputs,
        mc=args.mc,
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
    tolerances = {
        name: value
        for name, value in (("atol", args.atol), ("rtol", args.rtol))
        if value is not None
    }
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    status = rich.console.Console(stderr=True).status(f"verifying on {', '.join(backends)}")
    with status:
        report = multidrop.cross_backend(
            args.model,
            backends,
            tolerances=tolerances,
            edit=args.edit,
            modules=args.modules,
            **options,
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
    demo.run(
        model, options=insert_options(args), epochs=args.epochs, samples=args.samples, out=args.out
    )
    return 0


def load_xy(path: str, option: str):
    """An ``.npz`` file holding arrays ``x`` and ``y`` -> ``(x, y)``."""
    import numpy as np

    if not pathlib.Path(path).is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        with np.load(path) as arrays:
            return arrays["x"], arrays["y"]
    except KeyError as error:
        message = f"{option} {path} must hold arrays x and y: np.savez(path, x=x, y=y)"
        raise UsageError(message) from error
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {path} is not an .npz file of arrays: {error}") from error


def parse_placements(items) -> dict:
    """``["head=fc1,fc2", "all=activations"]`` -> ``{"head": ["fc1", "fc2"], "all": ...}``."""
    placements = {}
    for item in items or ["all=activations"]:
        name, equals, where = (part.strip() for part in item.partition("="))
        if not (name and equals and where):
            raise UsageError(
                f"--where {item!r} is not NAME=PLACEMENT; e.g. --where head=fc1,fc2 "
                "--where all=activations"
            )
        placements[name] = parse_where(where)
    return placements


def cmd_search(args) -> int:
    if importlib.util.find_spec("optuna") is None:
        raise UsageError("search needs optuna: pip install 'multidrop[search]'")
    from multidrop.search import search

    if args.status:
        return search_status(args.status, args.study)
    if not (args.model and args.train and args.validation):
        raise UsageError("search needs MODEL --train T.npz --validation V.npz, or --status URL")

    try:
        rates = [float(rate) for rate in args.rates.split(",")]
    except ValueError:
        raise UsageError(
            f"--rates {args.rates!r} is not comma-separated numbers like 0,0.2,0.5"
        ) from None
    result = search(
        load_model(args.model),
        load_xy(args.train, "--train"),
        load_xy(args.validation, "--validation"),
        where=parse_placements(args.where),
        rates=rates,
        kind=args.kind,
        loss=args.loss,
        optimizer=args.optimizer,
        metrics=[name.strip() for name in args.metrics.split(",") if name.strip()],
        objective=args.objective,
        epochs=args.epochs,
        seeds=args.seeds,
        batch_size=args.batch_size,
        directory=args.directory,
        strategy=args.strategy,
        n_trials=args.trials,
        storage=args.storage,
        workers=args.workers,
        study=args.study,
        verbose=True,
    )
    print(result)
    if args.directory:
        print(
            f"wrote best.keras and heatmap.png to {args.directory}; "
            "its search.db resumes the search"
        )
    return 0


def search_status(url: str, study: str) -> int:
    """Print the study's progress; live, every 2 s until it is complete, on a terminal."""
    import time

    import rich.live

    from multidrop.search_workers import status

    console = rich.console.Console()
    table, finished = status(url, study)
    if not console.is_terminal:
        console.print(table, soft_wrap=True)
        return 0
    with rich.live.Live(table, console=console, auto_refresh=False) as live:
        while not finished:
            time.sleep(2)
            table, finished = status(url, study)
            live.update(table, refresh=True)
    return 0


def cmd_demo_search(args) -> int:
    from multidrop.demo import search

    missing = [
        name
        for name in ("sklearn", "matplotlib", "optuna")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise UsageError(
            f"demo search needs {' and '.join(missing)}: pip install 'multidrop[demo,search]'"
        )
    if args.seeds < 2 or args.epochs < 1 or not 1 <= args.per_class <= 100:
        raise UsageError(
            "demo search needs --seeds of at least 2, --epochs of at least 1 and "
            "--per-class from 1 to 100"
        )
    search.run(out=args.out, seeds=args.seeds, epochs=args.epochs, per_class=args.per_class)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multidrop", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--import",
        dest="modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first: where the classes of a subclassed model are registered",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="print where dropout would go (a dry run)")
    plan.add_argument("model", help="a .keras file")
    add_insert_options(plan)
    plan.set_defaults(run=cmd_plan)

    insert = commands.add_parser("insert", help="write a copy of the model with dropout inserted")
    insert.add_argument("model", help="a .keras file")
    insert.add_argument(
        "-o", "--output", required=True, help="where to write the rewired .keras file"
    )
    add_insert_options(insert)
    insert.set_defaults(run=cmd_insert)

    verify = commands.add_parser(
        "verify", help="prove the rewired model answers like the original on every backend"
    )
    verify.add_argument("model", help="a .keras file")
    verify.add_argument(
        "--backends",
        default="torch,jax,tensorflow",
        help="comma-separated backends to run (default torch,jax,tensorflow)",
    )
    add_insert_options(verify)
    for name, what in (("--atol", "absolute"), ("--rtol", "relative")):
        verify.add_argument(
            name, type=float, help=f"{what} tolerance between backends (default: by dtype)"
        )
    verify.add_argument("--json", metavar="FILE", help="also write the report to FILE as JSON")
    verify.add_argument(
        "--edit",
        choices=("insert", "set"),
        default="insert",
        help="insert dropout (default) or set the layers' own rates (as `set`)",
    )
    verify.add_argument("--fields", help="with --edit set: only these fields, comma-separated")
    verify.set_defaults(run=cmd_verify)

    set_ = commands.add_parser(
        "set", help="write a copy of the model with its layers' own dropout rates set"
    )
    set_.add_argument("model", help="a .keras file")
    set_.add_argument("-o", "--output", required=True, help="where to write the .keras file")
    set_.add_argument("--rate", required=True, help="a float in [0, 1) or name=rate pairs")
    set_.add_argument(
        "--where",
        help="'re:PATTERN' or comma-separated layer names "
        "(default: every layer with a dropout-rate field)",
    )
    set_.add_argument("--fields", help="only these fields, e.g. recurrent_dropout (default: all)")
    set_.set_defaults(run=cmd_set)

    demo = commands.add_parser(
        "demo", help="plan, insert, verify, fine-tune and MC dropout on a digits CNN (or --model)"
    )
    demo.add_argument("--model", help="your own .keras file instead of the bundled digits CNN")
    demo.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    demo.add_argument("--samples", type=int, default=30, help="Monte Carlo samples (default 30)")
    demo.add_argument("--out", default=".", help="folder for the PNG (default: the current one)")
    add_insert_options(demo)
    demo.set_defaults(run=cmd_demo)
    steps = demo.add_subparsers(dest="step", metavar="STEP", help="'search': the search step alone")
    demo_search = steps.add_parser(
        "search", help="does dropout help a small-data fine-tune? digits 0-4 -> 5-9, measured"
    )
    demo_search.add_argument("--seeds", type=int, default=5, help="fine-tunings per setting (5)")
    demo_search.add_argument(
        "--epochs",
        type=int,
        default=DEMO_SEARCH_EPOCHS,
        help=f"fine-tuning epochs (default {DEMO_SEARCH_EPOCHS})",
    )
    demo_search.add_argument(
        "--per-class", type=int, default=20, help="training examples per digit 5-9 (default 20)"
    )
    demo_search.add_argument(
        "--out", default=".", help="folder for search/ (the study, best.keras, heatmap.png)"
    )
    demo_search.set_defaults(run=cmd_demo_search)

    search = commands.add_parser(
        "search", help="fine-tune with dropout at each placement and rate; find the best"
    )
    search.add_argument("model", nargs="?", help="a .keras file")
    for name, what in (("--train", "fine-tune on"), ("--validation", "score on")):
        search.add_argument(name, help=f".npz file of arrays x and y to {what} (required)")
    search.add_argument(
        "--where",
        action="append",
        metavar="NAME=PLACEMENT",
        help="a named placement: activations, re:PATTERN or layer names; repeat "
        "it (default all=activations)",
    )
    search.add_argument("--rates", default="0,0.2,0.5", help="rates to try; 0 is no dropout")
    search.add_argument("--kind", default="dropout", help="dropout, spatial, gaussian, alpha, auto")
    search.add_argument("--loss", default="sparse_categorical_crossentropy")
    search.add_argument("--optimizer", default="adam")
    search.add_argument("--metrics", default="accuracy", help="comma-separated metric names")
    search.add_argument("--objective", default="val_loss", help="e.g. val_loss, val_accuracy")
    search.add_argument("--epochs", type=int, default=3, help="epochs per training (default 3)")
    search.add_argument("--seeds", type=int, default=1, help="trainings per setting (default 1)")
    search.add_argument("--batch-size", type=int, default=32)
    search.add_argument("--strategy", choices=STRATEGIES, default="grid")
    search.add_argument("--trials", type=int, help="trials for --strategy random or bayes")
    search.add_argument(
        "-d",
        "--directory",
        help="folder for the study, best.keras, heatmap.png; run again to resume",
    )
    search.add_argument(
        "--storage",
        metavar="URL",
        help="a database shared by every worker and machine, e.g. "
        "postgresql+psycopg://user:password@host/db (default: search.db in --directory)",
    )
    search.add_argument("--workers", type=int, default=1, help="processes on this machine (1)")
    search.add_argument("--study", default="multidrop-search", help="the study's name in URL")
    search.add_argument(
        "--status", metavar="URL", help="show the progress of the study at URL and exit"
    )
    search.set_defaults(run=cmd_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for module in args.modules:
            _import(module)
        return args.run(args)
    except (UsageError, ValueError, TypeError) as error:
        message = " ".join(str(error).split())  # one line, even for Keras' multi-line errors
        print(f"multidrop {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
