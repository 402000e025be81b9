"""Comparing outputs: two models on the same inputs, or two arrays, within a tolerance.

``verify`` runs the original and the rewired model with ``training=False`` and
compares every output; ``compare`` is the element-wise check behind it, which
`multidrop.verify.backends` also uses to compare two backends. The tolerance of
a comparison across backends depends on the dtype (`TOLERANCES`, `tolerance_for`).

Example:
    >>> multidrop.verify(model, multidrop.insert_dropout(model, 0.2)).raise_on_mismatch()
    >>> tolerance_for("float32")
    (1e-05, 0.0001)
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import rich.table

from multidrop import graph, render
from multidrop.verify import inputs

# (atol, rtol) for comparing two backends, by the model's least precise float dtype:
# backends "a vs b" agree where |b - a| <= atol + rtol * |a| everywhere. Backends sum
# in different orders and pick different kernels; measured on CPU (README), float32
# outputs of a small conv net, MobileNetV2 and ResNet50 differed by at most 1.2e-6,
# float16 by 2.4e-4 (one ulp) and bfloat16 by 3.9e-3 (one ulp): the defaults allow
# about ten times that. Ordered from the most to the least precise.
TOLERANCES = {
    "float64": (1e-12, 1e-10),
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
COLUMNS = ("output", "shape", "dtype", "#max abs diff", "#max rel diff", "allowed", "result")


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
        table = render.table(self.title, COLUMNS)
        for d in self.differences:
            table.add_row(*row(d))
        return table

    def __str__(self) -> str:
        return render.text(self.table())


def verify(
    original: keras.Model,
    rewired: keras.Model,
    x=None,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    raise_on_mismatch: bool = False,
) -> Report:
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
    report, _ = compare_models(original, rewired, x, atol, rtol)
    return report.raise_on_mismatch() if raise_on_mismatch else report


def tolerance_for(dtype: str | np.dtype) -> tuple[float, float]:
    """The default ``(atol, rtol)`` for comparing two backends that compute in ``dtype``.

    Read from `TOLERANCES`; the comparison passes where |b - a| <= atol + rtol * |a|.

    Args:
        dtype: a float dtype, as a name (``"float16"``) or a dtype object.

    Returns:
        ``(atol, rtol)``.

    Raises:
        ValueError: for a dtype with no default tolerance (integers, bool, float8).

    Example:
        >>> tolerance_for("float32")
        (1e-05, 0.0001)
    """
    name = keras.backend.standardize_dtype(dtype)
    if name not in TOLERANCES:
        raise ValueError(
            f"dtype={name!r} has no default tolerance; tolerance_for takes one of "
            f"{list(TOLERANCES)}. Compare other dtypes bitwise (atol=0, rtol=0) or pass "
            "your own atol and rtol."
        )
    return TOLERANCES[name]


def compare_models(original, rewired, x, atol, rtol) -> tuple[Report, dict]:
    """The report of `verify`, and the rewired model's outputs by name."""
    graph.check_model(original, "original")
    graph.check_model(rewired, "rewired")
    x = inputs.sample_inputs(original) if x is None else x
    expected, actual = outputs(original, x), outputs(rewired, x)
    title = f"'{rewired.name}' (rewired) vs '{original.name}' (original), training=False"
    if list(expected) != list(actual):
        raise ValueError(
            f"The models have different outputs: original {list(expected)}, rewired "
            f"{list(actual)}. verify() compares a model with its rewired clone."
        )
    differences = tuple(compare(n, actual[n], expected[n], atol, rtol) for n in expected)
    return Report(title, differences), actual


def outputs(model, x) -> dict[str, np.ndarray]:
    """``model(x, training=False)`` as numpy arrays, keyed by output name."""
    result = keras.tree.flatten_with_path(model(x, training=False))
    names = list(graph.graph_of(model).output_names) if graph.is_graph_model(model) else []
    return {
        _output_name(path, names, i): keras.ops.convert_to_numpy(value)
        for i, (path, value) in enumerate(result)
    }


def _output_name(path, names, i) -> str:
    if any(isinstance(p, str) for p in path):
        return "/".join(map(str, path))
    return names[i] if i < len(names) else f"output_{i}"


def compare(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> Difference:
    """Compare ``a`` with the reference ``b``: |a - b| <= atol + rtol * |b| (NaN equals NaN)."""
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


def row(d: Difference) -> tuple[str, ...]:
    """``d`` as a table row, one cell per column of `COLUMNS`."""
    result = "ok" if d.ok else "MISMATCH" + (f" ({d.note})" if d.note else "")
    return (
        d.output,
        str(d.shape),
        d.dtype,
        f"{d.max_abs:.3g}",
        f"{d.max_rel:.3g}",
        d.allowed,
        result,
    )


def as_dict(d: Difference) -> dict:
    """``d`` as JSON-ready values (JSON has no inf or nan: they become None)."""
    values = dataclasses.asdict(d)
    values["shape"] = list(d.shape)
    for key in ("max_abs", "max_rel"):
        values[key] = values[key] if np.isfinite(values[key]) else None
    return values


def _max(values) -> float:
    return float(values.max()) if values.size else 0.0
