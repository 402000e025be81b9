"""Proof that rewiring changed nothing at inference: in one process, and across backends.

``verify`` runs the original and the rewired model on the same inputs with
``training=False`` and compares every output bitwise. ``cross_backend`` runs
the same saved model on PyTorch, JAX and TensorFlow, one subprocess each
(Keras fixes its backend once per process): each subprocess loads the model,
inserts dropout, verifies the clone bitwise and records its outputs on one
shared input; the parent then compares every pair of backends within
tolerances taken from the model's dtype.

Example:
    >>> multidrop.verify(model, multidrop.insert_dropout(model, 0.2)).raise_on_mismatch()
    >>> report = multidrop.cross_backend("model.keras", rate=0.2)
    >>> print(report); report.ok
    True
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import io
import itertools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import rich.console
import rich.markup
import rich.table
import rich.text

from multidrop import graph
from multidrop.plan import plan
from multidrop.rewire import insert_dropout

BACKENDS = ("torch", "jax", "tensorflow")
# (atol, rtol) for comparing two backends, by the model's least precise float dtype:
# backends "a vs b" agree where |b - a| <= atol + rtol * |a| everywhere. Backends sum
# in different orders and pick different kernels; measured on CPU (README), float32
# outputs of a small conv net, MobileNetV2 and ResNet50 differed by at most 1.2e-6,
# float16 by 2.4e-4 (one ulp) and bfloat16 by 3.9e-3 (one ulp): the defaults allow
# about ten times that.
TOLERANCES = {
    "float64": (1e-12, 1e-10),
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
SMALL_INT_RANGE = 10  # integer inputs that feed no Embedding are drawn from [0, 10)
_SKIPPED = 3  # worker exit status: the backend cannot be imported


class VerificationError(AssertionError):
    """Raised by ``raise_on_mismatch()``; its message is the report's table."""


@dataclasses.dataclass(frozen=True)
class Difference:
    """One output of two runs, compared.

    Attributes:
        output: the output's name (dict key or output layer name).
        shape: the output's shape; dtype: its dtype.
        max_abs: the largest |x - ref| (x: the rewired model's output, or the
            second backend's; ref: the original's, or the first backend's).
        max_rel: the largest |x - ref| / max(|x|, |ref|) (0 where both are 0).
        atol, rtol: what is allowed: |x - ref| <= atol + rtol * |ref| everywhere;
            0 and 0 mean bitwise equality.
        ok: whether the output passes; note: why not, when shapes or dtypes differ.
    """

    output: str
    shape: tuple
    dtype: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    note: str = ""

    @property
    def allowed(self) -> str:
        return "bitwise" if self.atol == self.rtol == 0 else f"{self.atol:g} + {self.rtol:g}·|ref|"


@dataclasses.dataclass(frozen=True)
class Report:
    """The outputs of two models (or one model on two backends), compared.

    ``.ok`` is True when every output passes; ``str(report)`` is a table.
    """

    title: str
    differences: tuple[Difference, ...]

    @property
    def ok(self) -> bool:
        return bool(self.differences) and all(d.ok for d in self.differences)

    def raise_on_mismatch(self) -> Report:
        """Raise `VerificationError` (an AssertionError) unless ``.ok``; return the report."""
        if not self.ok:
            raise VerificationError(str(self))
        return self

    def table(self) -> rich.table.Table:
        table = _table(self.title, check=False)
        for d in self.differences:
            _add_row(table, d)
        return table

    def __str__(self) -> str:
        return _render(self.table())


def verify(original, rewired, x=None, *, atol=0.0, rtol=0.0, raise_on_mismatch=False) -> Report:
    """Check that ``rewired`` answers like ``original`` in inference mode.

    Both models run with ``training=False`` on the same inputs; every output is
    compared element by element. With the default ``atol=0, rtol=0`` that is
    bitwise equality (``np.array_equal``), which `insert_dropout` guarantees
    within one backend.

    Args:
        original, rewired: two built Keras models with the same inputs and outputs.
        x: the inputs, as ``original`` takes them; None generates a deterministic
            batch of 2 from ``original``'s input specs (see `sample_inputs`).
        atol, rtol: allowed difference, |rewired - original| <= atol + rtol * |original|.
        raise_on_mismatch: raise `VerificationError` instead of returning a
            failing report.

    Returns:
        A `Report`: one `Difference` per output, ``.ok``, and a table as ``str()``.

    Example:
        >>> report = multidrop.verify(model, multidrop.insert_dropout(model, 0.2))
        >>> print(report)           # output, shape, dtype, max abs/rel diff, allowed, result
        >>> report.ok
        True
    """
    report, _ = _verify(original, rewired, x, atol, rtol)
    return report.raise_on_mismatch() if raise_on_mismatch else report


def sample_inputs(model, *, batch_size: int = 2, seed: int = 0):
    """Deterministic inputs for ``model``, shaped and typed by its inputs.

    Floats are standard normal (bfloat16 inputs get float32 values, which the
    model casts); integers are drawn from ``[0, input_dim)`` of the smallest
    Embedding they feed (through reshapes and nested models), else from
    ``[0, 10)``; booleans are fair coins; unknown dimensions are 8.

    Example:
        >>> x = sample_inputs(model)   # {"image": float32 (2, 16, 16, 3), "tokens": int32 (2, 8)}
    """
    graph.check_model(model)
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in graph.graph_of(model).inputs:
        shape = (batch_size, *(8 if d is None else d for d in tensor.shape[1:]))
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if "int" in dtype:
            arrays.append(rng.integers(0, _index_limit(model, tensor), shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.random(shape) < 0.5)
        elif "float" in dtype:
            values = rng.standard_normal(shape)
            arrays.append(values.astype("float32" if dtype == "bfloat16" else dtype))
        else:
            raise ValueError(
                f"Cannot generate inputs of dtype {dtype} for input '{tensor.name}' of model "
                f"'{model.name}'. Pass the inputs yourself: x=..."
            )
    return _pack(model, arrays)


def _verify(original, rewired, x, atol, rtol) -> tuple[Report, dict]:
    """The report, and the rewired model's outputs by name."""
    graph.check_model(original, "original")
    graph.check_model(rewired, "rewired")
    x = sample_inputs(original) if x is None else x
    expected, actual = _outputs(original, x), _outputs(rewired, x)
    title = f"'{rewired.name}' (rewired) vs '{original.name}' (original), training=False"
    if list(expected) != list(actual):
        raise ValueError(
            f"The models have different outputs: original {list(expected)}, rewired "
            f"{list(actual)}. verify() compares a model with its rewired clone."
        )
    differences = tuple(_compare(n, actual[n], expected[n], atol, rtol) for n in expected)
    return Report(title, differences), actual


def _outputs(model, x) -> dict[str, np.ndarray]:
    """``model(x, training=False)`` as numpy arrays, keyed by output name."""
    result = keras.tree.flatten_with_path(model(x, training=False))
    names = list(graph.graph_of(model).output_names)
    return {
        _output_name(path, names, i): keras.ops.convert_to_numpy(value)
        for i, (path, value) in enumerate(result)
    }


def _output_name(path, names, i) -> str:
    if any(isinstance(p, str) for p in path):
        return "/".join(map(str, path))
    return names[i] if i < len(names) else f"output_{i}"


def _compare(name, a, b, atol, rtol) -> Difference:
    """Compare ``a`` with the reference ``b``: |a - b| <= atol + rtol * |b|."""
    dtype = str(a.dtype) if a.dtype == b.dtype else f"{a.dtype} vs {b.dtype}"
    if a.shape != b.shape or a.dtype != b.dtype:
        note = f"shape {a.shape} vs {b.shape}" if a.shape != b.shape else f"dtype {dtype}"
        return Difference(name, a.shape, dtype, np.nan, np.nan, atol, rtol, False, note)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
        diff = np.nan_to_num(np.where(same, 0.0, np.abs(a64 - b64)), nan=np.inf)
        scale = np.maximum(np.abs(a64), np.abs(b64))
        rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
        rel = np.nan_to_num(rel, nan=np.inf)
    ok = bool(np.isclose(a64, b64, rtol=rtol, atol=atol, equal_nan=True).all())
    return Difference(name, a.shape, dtype, _max(diff), _max(rel), atol, rtol, ok)


def _max(values) -> float:
    return float(values.max()) if values.size else 0.0


def _index_limit(model, tensor) -> int:
    """Exclusive bound for the integer values of ``tensor``, an input of ``model``."""
    dims = [layer.input_dim for layer in _consumers(model, [tensor])
            if isinstance(layer, keras.layers.Embedding)]
    return min(dims, default=SMALL_INT_RANGE)


def _consumers(model, tensors):
    """The layers that ``tensors`` reach while they stay integer, nested models included."""
    reached = set(map(id, tensors))
    for node in graph.nodes(model):
        if not any(id(t) in reached for t in node.input_tensors):
            continue
        op = node.operation
        if graph.is_graph_model(op):
            inner = [t for t, outer in zip(graph.graph_of(op).inputs, node.input_tensors)
                     if id(outer) in reached]
            yield from _consumers(op, inner)
        else:
            yield op
        reached.update(id(t) for t in node.outputs if "int" in str(t.dtype))


def _pack(model, arrays):
    return keras.tree.pack_sequence_as(graph.graph_of(model)._inputs_struct, arrays)


def _flat_inputs(model, x) -> list:
    """``x`` as a list of arrays in the order of ``model.inputs``."""
    inputs = graph.graph_of(model).inputs
    if isinstance(x, dict) and not isinstance(graph.graph_of(model)._inputs_struct, dict):
        x = [x[t.name] for t in inputs]
    arrays = [keras.ops.convert_to_numpy(a) for a in keras.tree.flatten(x)]
    if len(arrays) != len(inputs):
        raise ValueError(
            f"x has {len(arrays)} arrays but model '{model.name}' has {len(inputs)} inputs "
            f"{[t.name for t in inputs]}. Pass one array per input, or x=None to generate them."
        )
    return arrays


# --- across backends --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendRun:
    """What one backend's subprocess found.

    Attributes:
        backend: ``torch``, ``jax`` or ``tensorflow``.
        status: ``ok`` (the clone is bitwise identical), ``mismatch``, ``skipped``
            (the backend is not installed) or ``error`` (the subprocess failed).
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

    @property
    def ok(self) -> bool:
        ran = [r for r in self.runs if r.status != "skipped"]
        return bool(ran) and all(r.status == "ok" for r in ran) and all(p.ok for p in self.pairs)

    @property
    def skipped(self) -> list[str]:
        return [r.backend for r in self.runs if r.status == "skipped"]

    def tables(self) -> list[rich.table.Table]:
        """A table of the backends, and a table of every comparison."""
        backends = rich.table.Table()
        for column in ("backend", "version", "seconds", "status"):
            backends.add_column(column, justify="right" if column == "seconds" else "left")
        for run in self.runs:
            message = run.message if len(run.message) < 160 else run.message[:150] + "... (see to_json)"
            status = rich.markup.escape(run.status + (f": {message}" if message else ""))
            seconds = f"{run.seconds:.1f}" if run.seconds else ""
            backends.add_row(run.backend, run.version, seconds, status)

        title = "rewired vs original in each backend, then each pair of backends"
        checks = _table(title, check=True)
        for run in self.runs:
            for d in run.report.differences if run.report else ():
                _add_row(checks, d, f"{run.backend}: rewired vs original")
        for pair in self.pairs:
            for d in pair.report.differences:
                _add_row(checks, d, f"{pair.a} vs {pair.b}")
        checks.caption = (
            "rewired vs original: bitwise (np.array_equal), ref = original. a vs b: "
            "|b - a| <= atol + rtol·|ref| everywhere, ref = a; "
            f"atol={self.atol:g}, rtol={self.rtol:g}: {self.tolerance_source}. "
            "max rel diff = max |x - ref| / max(|x|, |ref|)."
        )
        checks.caption_justify = "left"
        return [backends, checks]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "ok": self.ok, "sites": self.sites, "options": self.options,
            "tolerances": {"dtype": self.dtype, "atol": self.atol, "rtol": self.rtol,
                           "source": self.tolerance_source},
            "backends": [
                {"backend": r.backend, "status": r.status, "message": r.message,
                 "version": r.version, "seconds": round(r.seconds, 2),
                 "outputs": [_difference_dict(d) for d in r.report.differences] if r.report else []}
                for r in self.runs
            ],
            "pairs": [{"a": p.a, "b": p.b, "ok": p.ok,
                       "outputs": [_difference_dict(d) for d in p.report.differences]}
                      for p in self.pairs],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        headline = (f"multidrop verify '{self.model}': {self.sites} dropout layers inserted "
                    f"({self.options})")
        return _render(rich.text.Text(headline), *self.tables())


def cross_backend(model_or_path, backends=BACKENDS, *, x=None, tolerances=None, **insert_options):
    """Rewire and verify one saved model on several Keras backends, then compare them.

    Each backend runs in its own subprocess (``KERAS_BACKEND`` set for it),
    all at once. Each loads the model, calls ``insert_dropout(model,
    **insert_options)``, checks the clone bitwise against the original and
    records the clone's outputs on a shared input, generated here once (see
    `sample_inputs`) unless ``x`` is given. Then every pair of backends is
    compared with tolerances chosen by the model's least precise float dtype
    (`TOLERANCES`). A backend that is not installed is reported as skipped.

    Args:
        model_or_path: a Keras model (saved to a temporary ``.keras`` file first)
            or the path of a ``.keras`` file.
        backends: which backends to run, from ``("torch", "jax", "tensorflow")``.
        x: the shared input, as the model takes it.
        tolerances: ``{"atol": ..., "rtol": ...}`` overriding either default.
        **insert_options: passed to `insert_dropout` (``rate`` is required). They
            cross process boundaries, so they must pickle: use ``where='activations'``,
            layer classes or layer names, not selectors or lambdas.

    Returns:
        A `CrossBackendReport`: ``.ok``, ``print(report)`` for the tables, ``.to_json()``.

    Example:
        >>> report = multidrop.cross_backend("model.keras", rate=0.1)
        >>> print(report)
        >>> assert report.ok, report
    """
    backends = _check_backends(backends)
    with tempfile.TemporaryDirectory(prefix="multidrop-verify-") as tmp:
        tmp = pathlib.Path(tmp)
        model, path = _model_and_path(model_or_path, tmp)
        sites = len(plan(model, **insert_options))  # the options' errors, raised here and now
        arrays = _flat_inputs(model, sample_inputs(model) if x is None else x)
        np.savez(tmp / "inputs.npz", *arrays)
        _dump_options(insert_options, tmp / "options.pkl")
        dtype = _working_dtype(model)
        atol, rtol, source = _tolerances(dtype, tolerances)
        runs = _run_all(backends, path, tmp)

    ran = [r for r in runs if r.status in ("ok", "mismatch")]
    pairs = tuple(_pair(a, b, atol, rtol) for a, b in itertools.combinations(ran, 2))
    defaults = inspect.signature(insert_dropout).parameters
    options = ", ".join(f"{k}={v!r}" for k, v in insert_options.items()
                        if k == "rate" or v != defaults[k].default)
    return CrossBackendReport(
        model.name, sites, options, dtype, atol, rtol, source, tuple(runs), pairs)


def _pair(a: BackendRun, b: BackendRun, atol, rtol) -> Pair:
    differences = (_compare(n, b.outputs[n], a.outputs[n], atol, rtol) for n in a.outputs)
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


def _dump_options(options: dict, path: pathlib.Path) -> None:
    try:
        path.write_bytes(pickle.dumps(options))
    except Exception as error:
        raise TypeError(
            f"The insert options {options!r} must reach each backend's subprocess, but they "
            f"do not pickle ({error}). Pass where='activations', layer classes or a list of "
            "layer names, rate as a number or {name: rate}, and kind as a string."
        ) from error


def _working_dtype(model) -> str:
    """The least precise float dtype the model computes or answers in."""
    dtypes = {layer.compute_dtype for layer in model._flatten_layers()
              if not isinstance(layer, keras.layers.InputLayer)}
    dtypes |= {keras.backend.standardize_dtype(t.dtype) for t in graph.graph_of(model).outputs}
    floats = [d for d in TOLERANCES if d in dtypes]  # TOLERANCES runs from most to least precise
    return floats[-1] if floats else "float32"


def _tolerances(dtype: str, override) -> tuple[float, float, str]:
    atol, rtol = TOLERANCES[dtype]
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


def _run_all(backends, path, tmp) -> list[BackendRun]:
    """Start one worker per installed backend, all at once, and collect their runs."""
    started = {}
    for backend in backends:
        if importlib.util.find_spec(backend) is None:
            continue
        env = {"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ, "KERAS_BACKEND": backend}
        log = open(tmp / f"{backend}.log", "wb")
        command = [sys.executable, "-c", _WORKER, str(path), str(tmp), backend]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        started[backend] = (process, log, time.perf_counter())
    runs = []
    for backend in backends:
        if backend not in started:
            runs.append(BackendRun(backend, "skipped", f"{backend} is not installed"))
            continue
        process, log, start = started[backend]
        status = process.wait()
        log.close()
        runs.append(_collect(backend, status, tmp, time.perf_counter() - start))
    return runs


def _collect(backend, status, tmp, seconds) -> BackendRun:
    result = tmp / f"{backend}.pkl"
    if status == 0 and result.is_file():
        return dataclasses.replace(pickle.loads(result.read_bytes()), seconds=seconds)
    lines = (tmp / f"{backend}.log").read_text(errors="replace").strip().splitlines()
    last = lines[-1] if lines else f"exit status {status}"
    if status == _SKIPPED:
        return BackendRun(backend, "skipped", last, seconds=seconds)
    return BackendRun(backend, "error", last, seconds=seconds)


# The program each backend's subprocess runs. Importing keras imports the backend, so a
# backend that is missing or broken fails here, before multidrop (which imports keras) loads.
_WORKER = f"""
import sys
try:
    import keras
except ImportError as error:
    print(f"cannot import {{sys.argv[3]}}: {{error}}", file=sys.stderr)
    sys.exit({_SKIPPED})
from multidrop.verify import _work
_work(*sys.argv[1:])
"""


def _work(model_path: str, tmp: str, backend: str) -> None:
    """One backend's subprocess: load, rewire, verify, record outputs in ``tmp/<backend>.pkl``."""
    tmp = pathlib.Path(tmp)
    if keras.backend.backend() != backend:
        raise RuntimeError(f"KERAS_BACKEND={backend} but Keras runs {keras.backend.backend()}")
    model = keras.saving.load_model(model_path)
    options = pickle.loads((tmp / "options.pkl").read_bytes())
    with np.load(tmp / "inputs.npz") as inputs:
        x = _pack(model, [inputs[f"arr_{i}"] for i in range(len(inputs.files))])
    report, outputs = _verify(model, insert_dropout(model, **options), x, 0.0, 0.0)
    version = f"{backend} {importlib.import_module(backend).__version__}"
    run = BackendRun(backend, "ok" if report.ok else "mismatch", version=version,
                     report=report, outputs=outputs)
    (tmp / f"{backend}.pkl").write_bytes(pickle.dumps(run))


# --- tables --------------------------------------------------------------------------------


def _table(title: str, *, check: bool) -> rich.table.Table:
    table = rich.table.Table(title=title, title_justify="left")
    columns = ("output", "shape", "dtype", "max abs diff", "max rel diff", "allowed", "result")
    for column in ("check",) * check + columns:
        table.add_column(column, justify="right" if column.startswith("max") else "left")
    return table


def _add_row(table, d: Difference, *check: str) -> None:
    result = "ok" if d.ok else "MISMATCH" + (f" ({d.note})" if d.note else "")
    table.add_row(*check, d.output, str(d.shape), d.dtype, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}",
                  d.allowed, result)


def _difference_dict(d: Difference) -> dict:
    row = dataclasses.asdict(d)
    row["shape"] = list(d.shape)
    for key in ("max_abs", "max_rel"):  # JSON has no inf or nan
        row[key] = row[key] if np.isfinite(row[key]) else None
    return row


def _render(*renderables) -> str:
    buffer = io.StringIO()
    console = rich.console.Console(file=buffer, width=140, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return buffer.getvalue()
