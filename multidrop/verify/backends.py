"""One saved model, rewired and verified on several Keras backends, then compared: `cross_backend`.

Keras fixes its backend once per process, so each backend runs in its own
subprocess (`multidrop.verify.worker`), all at once. The parent writes what they
share into a temporary folder (the model, the inputs, the insert `Options`),
reads back each one's `BackendRun`, and compares every pair of backends within
tolerances chosen by the model's least precise float dtype.

Example:
    >>> report = multidrop.cross_backend("model.keras", rate=0.2)
    >>> print(report); report.ok
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import keras
import numpy as np
import rich.markup
import rich.table
import rich.text

from multidrop import _keras, graph, options, render
from multidrop.options import Options, SetOptions
from multidrop.plan import plan
from multidrop.rewire import set_plan
from multidrop.verify import compare, inputs
from multidrop.verify.compare import TOLERANCES, Report

BACKENDS = ("torch", "jax", "tensorflow")
# What the parent and the workers share in the temporary folder.
INPUTS = "inputs.npz"  # the shared input, flat, as np.savez writes a list of arrays
OPTIONS = "options.pkl"  # the pickled `Options`


def result_path(tmp: pathlib.Path, backend: str) -> pathlib.Path:
    """Where ``backend``'s worker writes its pickled `BackendRun`."""
    return tmp / f"{backend}.pkl"


def started_path(tmp: pathlib.Path, backend: str) -> pathlib.Path:
    """Where ``backend``'s worker marks that it started: Keras and its backend imported."""
    return tmp / f"{backend}.started"


@dataclasses.dataclass(frozen=True)
class BackendRun:
    """What one backend's subprocess found.

    Attributes:
        backend: ``torch``, ``jax`` or ``tensorflow``.
        status: ``ok`` (the clone is bitwise identical), ``mismatch``, ``skipped``
            (the backend is not installed, or cannot be imported) or ``error``
            (the subprocess failed).
        message: the reason for ``skipped`` or ``error``.
        version: the backend library and its version, e.g. ``torch 2.13.0``.
        seconds: wall time of the subprocess, imports included.
        report: the clone-vs-original `Report` (None unless it ran).
        outputs: the clone's outputs on the shared input, by output name.
    """

    backend: str
    status: str
    message: str = ""
    version: str = ""
    seconds: float = 0.0
    report: Report | None = None
    outputs: dict = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two backends' outputs compared: ``b``'s against ``a``'s, within tolerance."""

    a: str
    b: str
    report: Report

    @property
    def ok(self) -> bool:
        return self.report.ok


@dataclasses.dataclass(frozen=True)
class CrossBackendReport:
    """Per-backend and per-pair results of `cross_backend`.

    ``.ok`` is True when at least one backend ran, every backend that ran
    found its clone bitwise identical, and every pair agrees within
    ``atol``/``rtol``. Skipped backends do not count against it.
    """

    model: str
    sites: int
    options: str
    dtype: str
    atol: float
    rtol: float
    tolerance_source: str
    runs: tuple[BackendRun, ...]
    pairs: tuple[Pair, ...]
    edit: str = "insert"

    @property
    def ok(self) -> bool:
        ran = [r for r in self.runs if r.status != "skipped"]
        return bool(ran) and all(r.status == "ok" for r in ran) and all(p.ok for p in self.pairs)

    @property
    def skipped(self) -> list[str]:
        return [r.backend for r in self.runs if r.status == "skipped"]

    def tables(self) -> list[rich.table.Table]:
        """A table of the backends, and a table of every comparison."""
        backends = render.table("", ("backend", "version", "#seconds", "status"))
        for run in self.runs:
            message = run.message
            if len(message) >= 160:
                message = message[:150] + "... (see to_json)"
            status = rich.markup.escape(run.status + (f": {message}" if message else ""))
            seconds = f"{run.seconds:.1f}" if run.seconds else ""
            backends.add_row(run.backend, run.version, seconds, status)

        checks = render.table(
            "rewired vs original in each backend, then each pair of backends",
            ("check", *compare.COLUMNS),
            caption="rewired vs original: bitwise (np.array_equal), ref = original. a vs b: "
            "|b - a| <= atol + rtol·|ref| everywhere, ref = a; "
            f"atol={self.atol:g}, rtol={self.rtol:g}: {self.tolerance_source}. "
            "max rel diff = max |x - ref| / max(|x|, |ref|).",
        )
        for run in self.runs:
            for d in run.report.differences if run.report else ():
                checks.add_row(f"{run.backend}: rewired vs original", *compare.row(d))
        for pair in self.pairs:
            for d in pair.report.differences:
                checks.add_row(f"{pair.a} vs {pair.b}", *compare.row(d))
        return [backends, checks]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "edit": self.edit,
            "ok": self.ok,
            "sites": self.sites,
            "options": self.options,
            "tolerances": {
                "dtype": self.dtype,
                "atol": self.atol,
                "rtol": self.rtol,
                "source": self.tolerance_source,
            },
            "backends": [
                {
                    "backend": r.backend,
                    "status": r.status,
                    "message": r.message,
                    "version": r.version,
                    "seconds": round(r.seconds, 2),
                    "outputs": [compare.as_dict(d) for d in r.report.differences]
                    if r.report
                    else [],
                }
                for r in self.runs
            ],
            "pairs": [
                {
                    "a": p.a,
                    "b": p.b,
                    "ok": p.ok,
                    "outputs": [compare.as_dict(d) for d in p.report.differences],
                }
                for p in self.pairs
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        done = "dropout layers inserted" if self.edit == "insert" else "dropout fields set"
        headline = f"multidrop verify '{self.model}': {self.sites} {done} ({self.options})"
        return render.text(rich.text.Text(headline), *self.tables())


EDITS = {"insert": Options, "set": SetOptions}  # the options record of each edit
DRY_RUNS = {"insert": plan, "set": set_plan}


def cross_backend(
    model_or_path: keras.Model | str | os.PathLike,
    backends: str | Sequence[str] = BACKENDS,
    *,
    x=None,
    tolerances: dict | None = None,
    edit: str = "insert",
    modules: Sequence[str] = (),
    **insert_options,
) -> CrossBackendReport:
    """Rewire and verify one saved model on several Keras backends, then compare them.

    Each backend runs in its own subprocess (``KERAS_BACKEND`` set for it),
    all at once. Each loads the model, calls ``insert_dropout(model,
    **insert_options)``, checks the clone bitwise against the original and
    records the clone's outputs on a shared input, generated here once (see
    `sample_inputs`) unless ``x`` is given. Then every pair of backends is
    compared with tolerances chosen by the model's least precise float dtype
    (`TOLERANCES`). A backend that is not installed, or cannot be imported,
    is reported as skipped.

    Args:
        model_or_path: a Keras model (saved to a temporary ``.keras`` file first)
            or the path of a ``.keras`` file.
        backends: which backends to run, from ``("torch", "jax", "tensorflow")``.
        x: the shared input, as the model takes it.
        tolerances: ``{"atol": ..., "rtol": ...}`` overriding either default.
        edit: ``"insert"`` runs `insert_dropout`, ``"set"`` runs `set_dropout`.
        modules: modules each subprocess imports before it loads the model: where the
            classes of a subclassed model or custom layer are registered
            (``@keras.saving.register_keras_serializable``), e.g. ``("my_models",)``.
        **insert_options: the options of that edit (`multidrop.options.Options`, or
            `multidrop.options.SetOptions` for ``"set"``; ``rate`` is required), checked
            here. They cross process boundaries, so they must pickle: use
            ``where='activations'``, layer classes or layer names, not selectors or lambdas.

    Returns:
        A `CrossBackendReport`: ``.ok``, ``print(report)`` for the tables, ``.to_json()``.

    Example:
        >>> report = multidrop.cross_backend("model.keras", rate=0.1)
        >>> print(report)
        >>> assert report.ok, report
    """
    backends = _check_backends(backends)
    modules = tuple(modules)
    for module in modules:  # here too: this process loads the file first
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(
                f"modules={modules!r}: {error}. Give modules importable from here (on "
                "PYTHONPATH) that register the model's classes; each backend's process "
                "imports them too."
            ) from error
    if edit not in EDITS:
        raise ValueError(f"edit={edit!r}: choose 'insert' (insert_dropout) or 'set' (set_dropout).")
    opts = options.build(EDITS[edit], "cross_backend", **insert_options)
    with tempfile.TemporaryDirectory(prefix="multidrop-verify-") as tmp:
        tmp = pathlib.Path(tmp)
        model, path = _model_and_path(model_or_path, tmp)
        sites = len(DRY_RUNS[edit](model, **dataclasses.asdict(opts)))  # its errors, raised now
        arrays = inputs.flat_inputs(model, inputs.sample_inputs(model) if x is None else x)
        np.savez(tmp / INPUTS, *arrays)
        _dump_options(opts, tmp / OPTIONS)
        dtype = working_dtype(model)
        atol, rtol, source = _tolerances(dtype, tolerances)
        runs = _run_all(backends, path, tmp, modules)

    ran = [r for r in runs if r.status in ("ok", "mismatch")]
    pairs = tuple(_pair(a, b, atol, rtol) for a, b in itertools.combinations(ran, 2))
    changed = ", ".join(f"{name}={value!r}" for name, value in opts.changed().items())
    return CrossBackendReport(
        model.name, sites, changed, dtype, atol, rtol, source, tuple(runs), pairs, edit
    )


def _pair(a: BackendRun, b: BackendRun, atol, rtol) -> Pair:
    differences = (compare.compare(n, b.outputs[n], a.outputs[n], atol, rtol) for n in a.outputs)
    return Pair(a.backend, b.backend, Report(f"{a.backend} vs {b.backend}", tuple(differences)))


def _check_backends(backends) -> tuple[str, ...]:
    backends = (backends,) if isinstance(backends, str) else tuple(backends)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(
            f"backends={backends!r}: {', '.join(map(repr, unknown)) or 'none given'}; "
            f"choose one or more of {BACKENDS}, e.g. backends=('torch', 'jax')."
        )
    return tuple(dict.fromkeys(backends))


def _model_and_path(model_or_path, tmp: pathlib.Path):
    if isinstance(model_or_path, (str, os.PathLike)):
        path = pathlib.Path(model_or_path)
        if not path.is_file():
            raise ValueError(f"No model file at '{path}'; pass a .keras file or a keras.Model.")
        return keras.saving.load_model(path), path.resolve()
    graph.check_model(model_or_path)
    path = tmp / "model.keras"
    model_or_path.save(path)
    return model_or_path, path


def _dump_options(opts: Options, path: pathlib.Path) -> None:
    try:
        path.write_bytes(pickle.dumps(opts))
    except Exception as error:
        raise TypeError(
            f"The insert options {opts!r} must reach each backend's subprocess, but they "
            f"do not pickle ({error}). Pass where='activations', layer classes or a list of "
            "layer names, rate as a number or {name: rate}, and kind as a string."
        ) from error


def working_dtype(model) -> str:
    """The least precise float dtype the model computes or answers in."""
    dtypes = {
        layer.compute_dtype
        for layer in _keras.all_layers(model)
        if not isinstance(layer, keras.layers.InputLayer)
    }
    if graph.is_graph_model(model):
        dtypes |= {keras.backend.standardize_dtype(t.dtype) for t in graph.graph_of(model).outputs}
    floats = [d for d in TOLERANCES if d in dtypes]  # TOLERANCES runs from most to least precise
    return floats[-1] if floats else "float32"


def _tolerances(dtype: str, override) -> tuple[float, float, str]:
    atol, rtol = compare.tolerance_for(dtype)
    override = dict(override or {})
    unknown = set(override) - {"atol", "rtol"}
    if unknown or any(not value >= 0 for value in override.values()):
        raise ValueError(
            f"tolerances={override!r}: give 'atol' and/or 'rtol' as numbers >= 0, "
            f"e.g. tolerances={{'atol': 1e-4}}."
        )
    if override:
        source = f"set by the caller (the defaults for {dtype} are atol={atol:g}, rtol={rtol:g})"
    else:
        source = f"the defaults for {dtype}, the model's least precise float dtype"
    return float(override.get("atol", atol)), float(override.get("rtol", rtol)), source


def _run_all(backends, path, tmp, modules=()) -> list[BackendRun]:
    """Start one worker per installed backend, all at once, and collect their runs."""
    with contextlib.ExitStack() as logs:
        started = {}
        for backend in backends:
            if importlib.util.find_spec(backend) is None:
                continue
            env = {"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ, "KERAS_BACKEND": backend}
            log = logs.enter_context(open(tmp / f"{backend}.log", "wb"))
            command = [
                sys.executable,
                "-m",
                "multidrop.verify.worker",
                str(path),
                str(tmp),
                backend,
                *modules,
            ]
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            started[backend] = (process, time.perf_counter())
        runs = []
        for backend in backends:
            if backend not in started:
                runs.append(BackendRun(backend, "skipped", f"{backend} is not installed"))
                continue
            process, start = started[backend]
            status = process.wait()
            runs.append(_collect(backend, status, tmp, time.perf_counter() - start))
    return runs


def _collect(backend, status, tmp, seconds) -> BackendRun:
    result = result_path(tmp, backend)
    if status == 0 and result.is_file():
        return dataclasses.replace(pickle.loads(result.read_bytes()), seconds=seconds)
    lines = (tmp / f"{backend}.log").read_text(errors="replace").strip().splitlines()
    last = lines[-1] if lines else f"exit status {status}"
    # ``python -m multidrop.verify.worker`` imports multidrop, hence Keras, hence the
    # backend, before the worker runs. This process imported multidrop, so a worker
    # that failed before it started failed on the one thing that differs: the backend.
    if status > 0 and not started_path(tmp, backend).is_file():
        return BackendRun(backend, "skipped", f"cannot import {backend}: {last}", seconds=seconds)
    return BackendRun(backend, "error", last, seconds=seconds)
