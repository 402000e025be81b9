"""A layer's own dropout: the rate fields its config has, found by reading configs.

A field is a config entry holding a rate in [0, 1] whose name says dropout:
``dropout``, ``recurrent_dropout``, ``attention_dropout``, ``*_dropout``,
``dropout_rate``, ``drop_rate``, ``drop_path_rate``, and the ``rate`` of a
Dropout-family layer. No list of classes: a keras-hub backbone's ``dropout``,
a custom layer's ``attention_dropout`` and an LSTM's ``recurrent_dropout`` are
found the same way.

`changes` decides what ``set_dropout`` changes (a `Change` per layer and
field), and `FieldPlan` shows it as a table.

Example:
    >>> from multidrop import fields
    >>> fields.rate_fields(keras.layers.LSTM(4, dropout=0.1))
    {'dropout': 0.1, 'recurrent_dropout': 0.0}
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Sequence

from multidrop import graph, kinds, probe, rebuild, render, select
from multidrop.graph import Call
from multidrop.options import SetOptions
from multidrop.plan import check_names

_NAME = re.compile(r"(^|_)(dropout|dropout_rate|drop_rate|drop_path_rate)$")
# Keras picks another kernel once these fields are non-zero, even at inference, so the
# outputs agree with the original's within float rounding instead of bitwise.
KERNEL_SWITCH = {
    ("MultiHeadAttention", "dropout"): "leaves fused dot_product_attention",
    ("LSTM", "recurrent_dropout"): "leaves the backend's fused LSTM (torch's, cuDNN)",
    ("GRU", "recurrent_dropout"): "leaves the backend's fused GRU (torch's, cuDNN)",
}


def rate_fields(op) -> dict[str, float]:
    """The dropout-rate fields of ``op``'s config, with their values."""
    try:
        config = op.get_config()
    except Exception:  # an op node or a layer without a config has no fields to set
        return {}
    names = [key for key in config if _NAME.search(key)]
    if isinstance(op, kinds.DROPOUT_LAYERS):
        names.append("rate")
    return {
        key: float(config[key])
        for key in names
        if isinstance(config.get(key), numbers.Real)
        and not isinstance(config[key], bool)
        and 0 <= config[key] <= 1
    }


@dataclasses.dataclass(frozen=True)
class Change:
    """One field of one layer, set to a new rate.

    Attributes:
        qualname: the layer's name with its nesting path (the model's name for
            the model's own fields).
        layer: the layer (or model) whose config holds the field.
        field: the config key; old, new: its rate before and after.
        kernel: why Keras runs another kernel after the change ("" when it does not).
        node: the call's node (a `multidrop.probe.ProbeNode` inside a ``call()``).
    """

    qualname: str
    layer: object = dataclasses.field(repr=False, compare=False)
    field: str
    old: float
    new: float
    kernel: str = ""
    node: object = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class FieldPlan(Sequence):
    """Every field ``set_dropout`` sets, as `Change` rows; ``str()`` is a table."""

    model_name: str
    changes: tuple[Change, ...]

    def __len__(self) -> int:
        return len(self.changes)

    def __getitem__(self, i):
        return self.changes[i]

    def by_layer(self) -> dict[int, dict[str, float]]:
        """``{id(layer): {field: new rate}}``."""
        result: dict[int, dict[str, float]] = {}
        for change in self.changes:
            result.setdefault(id(change.layer), {})[change.field] = change.new
        return result

    def table(self):
        table = render.table(
            f"multidrop set_dropout for '{self.model_name}': {len(self)} field"
            f"{'s' * (len(self) != 1)}",
            ("layer", "class", "field", "#old", "#new", "kernel"),
            caption="kernel: where Keras switches kernels, inference agrees within float "
            "rounding, not bitwise" * any(c.kernel for c in self.changes),
        )
        for c in self.changes:
            table.add_row(
                c.qualname, type(c.layer).__name__, c.field, f"{c.old:g}", f"{c.new:g}", c.kernel
            )
        return table

    def __str__(self) -> str:
        return render.text(self.table())


def changes(model, opts: SetOptions) -> FieldPlan:
    """What ``set_dropout(model, **opts)`` changes; raises before anything is built."""
    graph.check_model(model)
    probe.read_with(model, opts.sample)
    calls = [c for c in graph.walk(model) if c.index == 0]
    top = Call(model, None, (), 0, False, False)  # the model's own fields (a backbone's dropout)
    candidates = [top, *calls]
    if opts.where is None:
        chosen = [c for c in candidates if _fields(c.operation, opts)]
        chosen = [c for c in chosen if not _covered(c, chosen, top)]
        if not chosen:
            raise ValueError(
                f"Model '{model.name}' has no layer with a dropout-rate field"
                + (f" named {list(opts.fields)}" if opts.fields else "")
                + ". set_dropout changes the rates layers already have (Dropout, "
                "MultiHeadAttention, LSTM/GRU, keras-hub blocks); to add dropout, use "
                "multidrop.insert_dropout."
            )
    else:
        selector = select.coerce(opts.where)
        check_names(selector.names, calls, dict.fromkeys(map(id, calls)), model)
        chosen = [c for c, keep in zip(calls, selector(calls)) if keep]
        if not chosen:
            raise ValueError(f"where={selector} matched no layer of model '{model.name}'.")
        without = [c for c in chosen if not _fields(c.operation, opts)]
        if without:
            raise ValueError(
                f"{without[0].qualname!r} ({type(without[0].operation).__name__}) has no "
                f"dropout-rate field{' named ' + str(list(opts.fields)) if opts.fields else ''}; "
                f"where= must pick layers that have one (its config has "
                f"{sorted(_config_keys(without[0]))}). "
                "Pass where=None for every layer that has one."
            )
    _check_rate_names(opts.rate, chosen, model)
    rates = kinds.resolve_rates(opts.rate, chosen)
    rows = []
    for call, rate in zip(chosen, rates):
        if rate is None:
            continue
        qualname = call.qualname if call is not top else model.name
        for name, old in _fields(call.operation, opts).items():
            kernel = KERNEL_SWITCH.get((type(call.operation).__name__, name), "")
            kernel = kernel if old == 0 < rate else ""
            rows.append(Change(qualname, call.operation, name, old, rate, kernel, call.node))
    return FieldPlan(model.name, tuple(rows))


def _fields(op, opts: SetOptions) -> dict[str, float]:
    found = rate_fields(op)
    if opts.fields is None:
        return found
    return {k: v for k, v in found.items() if k in opts.fields}


def _covered(call: Call, chosen: list[Call], top: Call) -> bool:
    """True for a layer whose rates follow a model's own field: inside a chosen subclassed
    model (a keras-hub backbone's blocks follow its ``dropout``), with no subclassed model
    with fields of its own in between (a task's backbone has its own ``dropout``)."""
    if call is top:
        return False
    owners = {c.qualname for c in chosen if c is not top and _owns(c.operation)}
    enclosing = ["/".join(call.path[: i + 1]) for i in range(len(call.path))]
    if any(name in owners for name in enclosing):
        return True
    return (
        top in chosen
        and _owns(top.operation)
        and not (graph.is_graph_model(call.operation) and _owns(call.operation))
    )


def _owns(model) -> bool:
    """A subclassed model or custom layer whose own rate fields drive the layers inside."""
    custom = probe.is_structure(model) or (
        graph.is_graph_model(model) and not rebuild.is_plain(model)
    )
    return custom and bool(rate_fields(model))


def nested_config(config, changes: dict[str, dict]):
    """``config`` (a model's, as ``get_config`` gives it) with ``changes`` (``{layer name:
    {field: rate}}``) applied wherever a nested layer's serialized config has that name (a
    keras-hub task's ``backbone``), and the names found."""
    found = set()

    def edit(value):
        if isinstance(value, dict):
            inner = value.get("config")
            if "class_name" in value and isinstance(inner, dict) and inner.get("name") in changes:
                found.add(inner["name"])
                value = {**value, "config": {**inner, **changes[inner["name"]]}}
            return {key: edit(item) for key, item in value.items()}
        if isinstance(value, list):
            return [edit(item) for item in value]
        return value

    return edit(config), found


def _config_keys(call: Call) -> list[str]:
    try:
        return list(call.operation.get_config())
    except Exception:
        return []


def _check_rate_names(rate, chosen, model) -> None:
    missing = kinds.unmatched_rate_names(rate, chosen)
    if missing:
        raise ValueError(
            f"rate names {missing}, which are not among the layers set in model "
            f"'{model.name}'. Give rates for layers that have a dropout-rate field."
        )
