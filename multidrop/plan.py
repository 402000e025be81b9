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
import re
from collections.abc import Mapping, Sequence

import keras

from multidrop import _keras, graph, kinds, probe, rebuild, render, surgery
from multidrop.graph import Call
from multidrop.layers import MonteCarlo
from multidrop.options import Options, build, signature_of

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
        kind: the class name of the inserted dropout (``Dropout``, ``SpatialDropout2D``...).
        name: the inserted layer's name.
        seed: the inserted layer's seed (None when unseeded).
        layer: the layer insertion puts there, already built from the options
            (a `multidrop.layers.MonteCarlo` around the dropout with ``mc=True``).
    """

    call: Call = dataclasses.field(repr=False)
    rate: float
    kind: str
    name: str
    seed: int | None
    layer: keras.layers.Layer = dataclasses.field(repr=False, compare=False)

    @property
    def qualname(self) -> str:
        """The site's layer name with its nesting path, e.g. ``backbone/conv1_relu``."""
        return self.call.qualname

    @property
    def shape(self) -> tuple:
        return tuple(self.call.outputs[0].shape)


@dataclasses.dataclass(frozen=True)
class Plan(Sequence):
    """The whole decision of ``insert_dropout``: every site, with the layer it gets.

    A plan is a sized, iterable sequence of `Site`; ``str(plan)`` is a table.
    Every layer is built and every option checked when the plan is made, so a plan
    that succeeds is an insertion that succeeds.
    """

    model_name: str
    sites: tuple[Site, ...]
    options: Options
    note: str

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i):
        return self.sites[i]

    @property
    def after(self) -> dict:
        """``{node: layer}``, what `multidrop.rebuild.rebuild` puts after which call."""
        return {site.call.node: site.layer for site in self.sites}

    def table(self):
        """The plan as a ``rich`` table."""
        mc = ", mc=True" * self.options.mc
        table = render.table(
            f"multidrop plan for '{self.model_name}': {len(self)} dropout "
            f"layer{'s' * (len(self) != 1)} (where={self.options.selector.text}{mc})",
            ("#", "after", "layer", "output shape", "inserts", "#rate", "new layer"),
            caption="; ".join(filter(None, (self.note, self.saved_as()))),
        )
        for i, site in enumerate(self.sites):
            call = site.qualname + (f" (call {site.call.index + 1})" if site.call.index else "")
            calls = getattr(site.call.node, "calls", 1)
            call += f" (all {calls} calls)" if calls > 1 else ""
            table.add_row(
                str(i),
                call,
                type(site.call.operation).__name__,
                str(site.shape),
                _class_label(site.layer),
                f"{site.rate:g}",
                site.name,
            )
        return table

    def saved_as(self) -> str:
        """How the result saves: edits inside a ``call()`` need multidrop to load; the
        layers multidrop makes in a graph are saved under a Keras name."""
        if any(isinstance(s.call.node, probe.ProbeNode) for s in self.sites):
            return (
                "edits inside call() are saved as multidrop>Edited: the file loads back with "
                "them after import multidrop (and your classes registered)"
            )
        inner = {type(getattr(s.layer, "layer", s.layer)) for s in self.sites}
        names = {
            cls: _keras.saved_name(cls) for cls in inner if cls.__module__.startswith("multidrop")
        }
        return "; ".join(
            f"multidrop.{cls.__name__} is saved as {name}, so the file loads without multidrop"
            for cls, name in names.items()
            if name
        )

    def __str__(self) -> str:
        return render.text(self.table())


@signature_of(Options, "model")
def plan(model, rate, where="activations", **options) -> Plan:
    """Dry run of `insert_dropout`: the sites it fills, and how. Changes nothing.

    Takes the same arguments as `multidrop.insert_dropout` (see `multidrop.options.Options`)
    and raises the same errors: the plan builds every layer insertion would add, so a
    plan that succeeds is one insertion carries out.

    Returns:
        A `Plan`: ``len(plan)`` is the number of dropout layers insertion adds,
        ``list(plan)`` its sites, ``print(plan)`` a table.

    Example:
        >>> print(multidrop.plan(model, {"fc1": 0.5, "fc2": 0.3}, where=["fc1", "fc2"]))
    """
    the_plan = decide(model, build(Options, "plan", rate=rate, where=where, **options))
    _check_copyable(model)
    return the_plan


def decide(model, opts: Options) -> Plan:
    """The plan for ``model`` under ``opts`` (already validated)."""
    graph.check_model(model)
    probe.read_with(model, opts.sample)
    selector = opts.selector
    calls = graph.walk(model, recursive=opts.recursive)
    reasons = {id(c): _why_not(c, opts.include_outputs, opts.mc) for c in calls}
    candidates = [c for c in calls if reasons[id(c)] is None]
    rate_names = tuple(opts.rate) if isinstance(opts.rate, Mapping) else ()
    check_names(selector.names + rate_names, calls, reasons, model, opts.recursive)
    chosen = [c for c, keep in zip(candidates, selector(candidates)) if keep]
    note = _skipped_note(calls, opts.mc)
    if not chosen:
        raise ValueError(
            f"where={selector} matched no site in model '{model.name}' "
            f"({len(candidates)} candidate sites; outputs skipped unless include_outputs=True"
            f"{'; ' + note if note else ''}). Check the selector with multidrop.plan(), or pick "
            "sites by name"
            + (f": where={[c.name for c in candidates[:3]]}." if candidates else ".")
        )
    _check_rate_names(opts.rate, chosen, selector)

    rates = kinds.resolve_rates(opts.rate, chosen)
    taken = {c.name for c in calls} | _input_names(model, calls)
    sites = []
    for call, value in zip(chosen, rates):
        if value is None:
            continue
        kind_name = kinds.resolve_kind(opts.kind, call)
        kinds.check_noise_shape(opts.noise_shape, kind_name, call)
        noise_shape = (
            kinds.sample_noise_shape(call) if opts.kind == "stochastic_depth" else opts.noise_shape
        )
        name = _new_name(call, taken)
        taken.add(name)
        seed = None if opts.seed is None else opts.seed + len(sites)
        layer = _site_layer(opts, kind_name, value, call, seed, name, noise_shape)
        sites.append(Site(call, value, kind_name, name, seed, layer))
    if not sites:
        raise ValueError(
            f"rate returned None for all {len(chosen)} sites that where={selector} "
            "selected, so nothing would be inserted. Return a rate for the sites to keep."
        )
    if not opts.share_weights:
        _check_clonable(calls)
    return Plan(model.name, tuple(sites), opts, note)


def _site_layer(opts: Options, kind_name: str, rate: float, call: Call, seed, name, noise_shape):
    inner = kinds.make_layer(
        opts.kind, kind_name, rate, call, noise_shape=noise_shape, seed=seed, name=name
    )
    if not opts.mc:
        inner.name = name
        return inner
    inner.name = f"{name}_inner"
    return MonteCarlo(inner, name=name, dtype=inner.dtype_policy)


def _class_label(layer) -> str:
    """``keras.SpatialDropout2D``, ``multidrop.Dropout (None, 1, 1)`` or ``mc(...)``."""
    if isinstance(layer, MonteCarlo):
        return f"mc({_class_label(layer.layer)})"
    noise = getattr(layer, "noise_shape", None)
    label = f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}"
    return label + (f" {tuple(noise)}" if noise is not None else "")


def _skipped_note(calls, mc: bool) -> str:
    if mc:
        return ""
    inert = sum(1 for c in calls if c.inference_only)
    forced = sum(1 for c in calls if c.training_forced and not c.inference_only)
    parts = [f"{inert} layers inside models called with training=False are skipped"] * bool(inert)
    parts += [f"{forced} layers inside models called with training=True are skipped"] * bool(forced)
    after = sum(1 for c in calls if getattr(c.node, "in_inference_since", None))
    parts += [f"{after} calls after a call with training=False are skipped"] * bool(after)
    refused = [c for c in calls if getattr(c.node, "reason", None)]
    if refused:
        first = refused[0].node.reason
        parts.append(f"{len(refused)} calls inside call() cannot take one ({first})")
    return "; ".join(parts)


def _check_clonable(calls) -> None:
    """Clone every layer from its config once, so a layer that cannot be cloned is
    refused now, by name, rather than halfway through the rebuild."""
    for call in calls:
        inside = isinstance(call.node, probe.ProbeNode)  # copied with the layer around it
        if call.index == 0 and not inside and not graph.is_graph_model(call.operation):
            rebuild.clone_operation(call.operation)


def _check_copyable(model) -> None:
    """A subclassed model is copied whole by surgery: check now that it can be
    (`multidrop.surgery.check_copyable`). An edit does not need this: its copy is made
    first, before anything is edited, and fails with the same error."""
    if not graph.is_graph_model(model):
        surgery.check_copyable(model)


def _why_not(call: Call, include_outputs: bool, mc: bool) -> str | None:
    """Why a dropout cannot, or by default does not, follow ``call``; None if it can."""
    if getattr(call.node, "reason", None):
        return call.node.reason
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
    since = getattr(call.node, "in_inference_since", None)
    if since and not mc:
        return (
            f"'{since}' is called with training=False before it in the same call(), and Keras "
            "keeps that mode for the calls after it that pass no training argument, so a "
            "dropout here would never be active; pass training=training to this call, or "
            "pass mc=True for always-on dropout"
        )
    if call.training_forced and not mc:
        return (
            f"model '{call.path[-1]}' is called with training=True written into the graph, so a "
            "dropout inside it would be active at inference too; pass mc=True if you want "
            "always-on dropout there, or call the nested model without training=True"
        )
    return None


def check_names(names, calls, reasons, model, recursive: bool = True) -> None:
    """Raise for a name that is no call of ``calls`` (with the closest names), or whose
    calls all have a reason (``reasons[id(call)]``) not to take a dropout."""
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


def _check_rate_names(rate, chosen, selector) -> None:
    missing = kinds.unmatched_rate_names(rate, chosen)
    if missing:
        raise ValueError(
            f"rate names {missing}, which where={selector} does not select. "
            f"Pass where={list(rate)!r} to put dropout after exactly the "
            "layers named in rate."
        )


def _input_names(model, calls) -> set[str]:
    models = [m for m in (model, *(c.operation for c in calls)) if graph.is_graph_model(m)]
    return {_keras.producer(t).name for m in models for t in graph.graph_of(m).inputs}


def _new_name(call: Call, taken: set[str]) -> str:
    name = f"{call.name}{MARK}" + (f"_{call.index}" if call.index else "")
    k = call.index
    while name in taken:
        k += 1
        name = f"{call.name}{MARK}_{k}"
    return name
