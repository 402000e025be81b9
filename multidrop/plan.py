"""The dry run: which sites get which dropout, decided and checked before anything is built.

``plan()`` and ``insert_dropout()`` share this code, so a plan is always exactly
what insertion does.

Example:
    >>> p = multidrop.plan(model, 0.2)
    >>> len(p)                       # dropout layers insert_dropout(model, 0.2) would add
    49
    >>> print(p)                     # a table: site, layer, output shape, kind, rate, new name
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import re
from collections.abc import Mapping, Sequence

import rich.console
import rich.table

from multidrop import graph, kinds, select
from multidrop.graph import Call

MARK = "_multidrop"
_ADDED = re.compile(rf"{MARK}(_\d+)?$")


def is_added_name(name: str) -> bool:
    """True for names that multidrop gives the dropout layers it inserts."""
    return bool(_ADDED.search(name))


@dataclasses.dataclass(frozen=True)
class Site:
    """One place where a dropout layer goes: right after ``call``'s output.

    Attributes:
        call: the layer or op call the dropout follows.
        rate: the dropout rate.
        kind: the class name of the inserted layer (``Dropout``, ``SpatialDropout2D``...).
        name: the inserted layer's name.
        seed: the inserted layer's seed (None when unseeded).
    """

    call: Call = dataclasses.field(repr=False)
    rate: float
    kind: str
    name: str
    seed: int | None

    @property
    def qualname(self) -> str:
        """The site's layer name with its nesting path, e.g. ``backbone/conv1_relu``."""
        return self.call.qualname

    @property
    def shape(self) -> tuple:
        return tuple(self.call.outputs[0].shape)


@dataclasses.dataclass(frozen=True)
class Plan(Sequence):
    """The sites ``insert_dropout`` fills, with the options it fills them with.

    A plan is a sized, iterable sequence of `Site`; ``str(plan)`` is a table.
    """

    model_name: str
    sites: tuple[Site, ...]
    where: str
    kind: object
    note: str
    noise_shape: tuple | None
    recursive: bool
    share_weights: bool
    mc: bool

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i):
        return self.sites[i]

    def table(self) -> rich.table.Table:
        """The plan as a ``rich`` table."""
        table = rich.table.Table(
            title=f"multidrop plan for '{self.model_name}': {len(self)} dropout "
            f"layer{'s' * (len(self) != 1)} (where={self.where}{', mc=True' * self.mc})",
            title_justify="left",
            caption=self.note or None,
            caption_justify="left",
        )
        for column in ("#", "after", "layer", "output shape", "inserts", "rate", "new layer"):
            table.add_column(column, justify="right" if column in ("#", "rate") else "left")
        for i, site in enumerate(self.sites):
            call = site.qualname + (f" (call {site.call.index + 1})" if site.call.index else "")
            table.add_row(
                str(i), call, type(site.call.operation).__name__, str(site.shape),
                site.kind, f"{site.rate:g}", site.name,
            )
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        console = rich.console.Console(file=buffer, width=140, color_system=None)
        console.print(self.table())
        return buffer.getvalue()


def plan(
    model,
    rate,
    where="activations",
    *,
    kind="dropout",
    noise_shape=None,
    seed=None,
    include_outputs=False,
    recursive=True,
    share_weights=False,
    mc=False,
) -> Plan:
    """Dry run of `insert_dropout`: the sites it fills, and how. Builds nothing.

    Takes the same arguments as `multidrop.insert_dropout` and raises the same
    errors, so a plan that succeeds is one insertion will carry out.

    Returns:
        A `Plan`: ``len(plan)`` is the number of dropout layers insertion adds,
        ``list(plan)`` its sites, ``print(plan)`` a table.

    Example:
        >>> print(multidrop.plan(model, {"fc1": 0.5, "fc2": 0.3}, where=["fc1", "fc2"]))
    """
    graph.check_model(model)
    kinds.check_rate(rate)
    kinds.check_kind(kind)
    selector = select.coerce(where)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}.")
    if noise_shape is not None and not isinstance(noise_shape, Sequence):
        raise TypeError(f"noise_shape must be a tuple such as (None, 1, 64), got {noise_shape!r}.")

    calls = graph.walk(model, recursive=recursive)
    reasons = {id(c): _why_not(c, include_outputs, mc) for c in calls}
    candidates = [c for c in calls if reasons[id(c)] is None]
    rate_names = tuple(rate) if isinstance(rate, Mapping) else ()
    _check_names(selector.names + rate_names, calls, reasons, model, recursive)
    chosen = [c for c, keep in zip(candidates, selector(candidates)) if keep]
    inert = sum(1 for c in calls if c.inference_only and not mc)
    note = f"; {inert} layers inside models called with training=False are skipped" * bool(inert)
    if not chosen:
        raise ValueError(
            f"where={selector} matched no site in model '{model.name}' "
            f"({len(candidates)} candidate sites; outputs skipped unless include_outputs=True{note}). "
            "Check the selector with multidrop.plan(), or pick sites by name"
            + (f": where={[c.name for c in candidates[:3]]}." if candidates else ".")
        )
    _check_rate_names(rate_names, chosen, selector)

    taken = {c.name for c in calls} | _input_names(model, calls)
    sites = []
    for call in chosen:
        value = kinds.resolve_rate(rate, call)
        if value is None:
            continue
        kind_name = kinds.resolve_kind(kind, call)
        kinds.check_noise_shape(noise_shape, kind_name, call)
        name = _new_name(call, taken)
        taken.add(name)
        site_seed = None if seed is None else seed + len(sites)
        sites.append(Site(call, value, kind_name, name, site_seed))
    if not sites:
        raise ValueError(
            f"rate returned None for all {len(chosen)} sites that where={selector} "
            "selected, so nothing would be inserted. Return a rate for the sites to keep."
        )
    return Plan(
        model.name, tuple(sites), selector.text, kind, note.lstrip("; "),
        None if noise_shape is None else tuple(noise_shape), recursive, share_weights, mc,
    )


def _why_not(call: Call, include_outputs: bool, mc: bool) -> str | None:
    """Why a dropout cannot, or by default does not, follow ``call``; None if it can."""
    outputs = call.outputs
    if len(outputs) != 1 or "float" not in str(outputs[0].dtype):
        return (
            f"it has {len(outputs)} output(s) of dtype {[str(t.dtype) for t in outputs]}, and "
            "dropout can only follow one floating-point output. Choose the layer that consumes it"
        )
    if call.is_output and not include_outputs:
        return "it produces a model output; pass include_outputs=True to put dropout there too"
    if call.inference_only and not mc:
        return (
            f"model '{call.path[-1]}' is called with training=False, so a dropout inside it would "
            "never be active; pass mc=True for dropout that is always on, or call the "
            "nested model without training=False"
        )
    return None


def _check_names(names, calls, reasons, model, recursive) -> None:
    for name in names:
        matches = [c for c in calls if name in (c.name, c.qualname)]
        if not matches:
            known = sorted({c.name for c in calls} | {c.qualname for c in calls})
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            nested = "" if recursive else " Nested models are not searched with recursive=False."
            raise ValueError(f"No layer named {name!r} in model '{model.name}'.{hint}{nested}")
        if all(reasons[id(c)] for c in matches):
            raise ValueError(f"Cannot put dropout after layer {name!r}: {reasons[id(matches[0])]}.")


def _check_rate_names(rate_names, chosen, selector) -> None:
    chosen_names = {c.name for c in chosen} | {c.qualname for c in chosen}
    missing = [n for n in rate_names if n not in chosen_names]
    if missing:
        raise ValueError(
            f"rate names {missing}, which where={selector} does not select. "
            f"Pass where={list(rate_names)!r} to put dropout after exactly the "
            "layers named in rate."
        )


def _input_names(model, calls) -> set[str]:
    models = [model, *(c.operation for c in calls if graph.is_graph_model(c.operation))]
    return {t._keras_history.operation.name for m in models for t in graph.graph_of(m).inputs}


def _new_name(call: Call, taken: set[str]) -> str:
    name = f"{call.name}{MARK}" + (f"_{call.index}" if call.index else "")
    k = call.index
    while name in taken:
        k += 1
        name = f"{call.name}{MARK}_{k}"
    return name
