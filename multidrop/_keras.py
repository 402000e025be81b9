"""The one module that reaches into private Keras; everything else uses the public API.

Tested against Keras 3.15.1 (the pin in ``pyproject.toml`` and ``constraints.txt``)
and, in ``nox -s "tests(keras-next)"``, against keras-nightly. When Keras moves one of
these names, this file is the only one to change.

It also picks multidrop's default backend: PyTorch, when ``KERAS_BACKEND`` is
unset, Keras is not imported yet and PyTorch is installed. The choice is made for
the import of Keras alone; ``os.environ`` is left as it was, so subprocesses and
other libraries see the user's environment, not multidrop's.

Example:
    >>> from multidrop import _keras
    >>> _keras.inputs_struct(model)      # the nesting of model.inputs (dict, list...)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile

import numpy as np

TESTED = ("3.15.1",)


@contextlib.contextmanager
def _default_backend():
    default = (
        "KERAS_BACKEND" not in os.environ
        and "keras" not in sys.modules
        and importlib.util.find_spec("torch") is not None
    )
    if default:
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        yield
    finally:
        if default:
            del os.environ["KERAS_BACKEND"]


with _default_backend():
    import keras

from keras.src import api_export  # noqa: E402
from keras.src.backend.common import global_state  # noqa: E402
from keras.src.layers.convolutional.base_conv import BaseConv  # noqa: E402
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose  # noqa: E402
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv  # noqa: E402
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv  # noqa: E402
from keras.src.layers.layer import Layer  # noqa: E402
from keras.src.models.functional import Functional  # noqa: E402
from keras.src.saving import object_registration, saving_lib  # noqa: E402

CONV_LAYERS = (BaseConv, BaseConvTranspose, BaseDepthwiseConv, BaseSeparableConv)


def save_as(cls: type, name: str) -> None:
    """Make Keras save instances of ``cls`` under the public name ``name``
    (e.g. ``"keras.layers.Dropout"``), so the saved file loads without multidrop."""
    api_export.REGISTERED_OBJS_TO_NAMES[cls] = name


def saved_name(cls: type) -> str | None:
    """The public name Keras saves ``cls`` under, if it has one."""
    return api_export.REGISTERED_OBJS_TO_NAMES.get(cls)


def sequential_graph(model) -> Functional | None:
    """The Functional graph a built Sequential keeps, or None when it recorded none."""
    return model._functional


def sequential_input(model):
    """The InputLayer a Sequential starts with (given, or added by ``build``), or None."""
    first = model._layers[0] if model._layers else None
    return first if isinstance(first, keras.layers.InputLayer) else None


def nodes_by_depth(graph) -> dict:
    return graph._nodes_by_depth


def inputs_struct(graph):
    """The nesting (dict, list, single tensor) of a Functional graph's inputs."""
    return graph._inputs_struct


def outputs_struct(graph):
    return graph._outputs_struct


def all_layers(layer) -> list:
    """``layer`` and every layer inside it, depth first (Keras' own order)."""
    return list(layer._flatten_layers())


def producer(tensor):
    """The operation whose call produced a symbolic ``tensor``."""
    return tensor._keras_history.operation


def output_rank(layer) -> int:
    """The rank of ``layer``'s (first) output in its first call."""
    return len(layer._inbound_nodes[0].outputs[0].shape)


def is_called(layer) -> bool:
    """True once ``layer`` has been called on symbolic inputs (it is in some graph)."""
    return bool(layer._inbound_nodes)


@contextlib.contextmanager
def training_kept():
    """Keep the current call's ``training`` through a nested call that passes its own.

    Keras writes an explicit ``training=`` into the call context that the whole outer
    call shares and does not restore it, so the layers called afterwards run in that
    mode too (on 3.15 when the outer call has no ``training``; on 3.16 always)."""
    context = global_state.get_global_attribute("current_call_ctx")
    before = None if context is None else context.get_value("training")
    try:
        yield
    finally:
        if context is not None:
            context.set_value("training", before)


@contextlib.contextmanager
def intercepting_calls(around):
    """Route every layer call made in the block through ``around(layer, args, kwargs,
    proceed)``, which must return ``proceed()`` (the call's outputs). Keras has no hook
    for the sublayer calls a ``call()`` makes, so ``Layer.__call__`` is wrapped for the
    duration of the block; no layer is touched."""
    original = Layer.__call__

    def intercepted(self, *args, **kwargs):
        return around(self, args, kwargs, lambda: original(self, *args, **kwargs))

    Layer.__call__ = intercepted
    try:
        yield
    finally:
        Layer.__call__ = original


def is_keras_layer(layer) -> bool:
    """True when ``layer``'s class is Keras' own or derives from a Keras layer other than
    ``Layer`` and ``Model`` (``MultiHeadAttention`` and keras-hub's subclass of it): its
    structure is Keras', not written by a user in a ``call()``."""
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("keras."):
            return cls not in (Layer, keras.Model, keras.layers.Layer)
    return True


def _cache_skipsets() -> None:
    """Keras 3.15 stores the skip sets of its saving walk under ``saving_attr_skipset_<type>``
    but looks them up under ``saving_attr_skiplist_<type>``, so each walk of a layer's
    attributes builds a new ``Layer()`` and lists its ``dir()`` (about 1 ms; an edit walks
    hundreds of layers). Store them where Keras looks: the same sets, computed by Keras."""
    for obj_type in ("Layer", "Functional", "Sequential"):
        key = f"saving_attr_skiplist_{obj_type}"
        if global_state.get_global_attribute(key) is None:
            global_state.set_global_attribute(key, saving_lib.get_attr_skipset(obj_type))


def children(layer, properties: bool = True) -> list[tuple[tuple, object]]:
    """``(steps, sublayer)`` for the layers ``layer`` holds directly, as a ``.keras`` file
    finds them: attributes, and lists, tuples and dicts in attributes (``("blocks", 1)``);
    then, with ``properties``, those only a property shows (a Functional's ``layers``)."""
    _cache_skipsets()
    found, shown = [], []
    for name, value in saving_lib._walk_saveable(layer):
        steps = []
        if isinstance(value, Layer):
            steps = [((name,), value)]
        elif isinstance(value, (list, tuple)):
            steps = [((name, i), v) for i, v in enumerate(value) if isinstance(v, Layer)]
        elif isinstance(value, dict):
            steps = [((name, k), v) for k, v in value.items() if isinstance(v, Layer)]
        is_property = isinstance(getattr(type(layer), name, None), property)
        (shown if is_property else found).extend(steps)
    return found + shown * properties


def replace_sublayer(parent, old, new) -> None:
    """Put ``new`` where the built layer ``parent`` holds ``old``: in its attributes, lists
    and dicts, and in Keras' record of its sublayers (at the same place, so the order of
    the weights stays). Keras locks a built layer against new sublayers; a replacement
    keeps the count, so it is made the way Keras' own ``replace_tracked_value`` makes it."""
    parent._tracker.replace_tracked_value("layers", old, new)
    replaced = False
    for steps, value in children(parent, properties=False):
        if value is not old:
            continue
        holder = getattr(parent, steps[0])
        if len(steps) == 1:
            setattr(parent, steps[0], new)
        elif isinstance(holder, tuple):
            setattr(parent, steps[0], tuple(new if v is old else v for v in holder))
        else:  # a tracked list or dict: set the item without tracking it twice
            (dict if isinstance(holder, dict) else list).__setitem__(holder, steps[1], new)
        replaced = True
    if not replaced:
        raise ValueError(f"{parent.name!r} holds {old.name!r} in no attribute")


def save_under(cls: type, registered_name: str) -> None:
    """Make Keras save instances of ``cls`` (not its bases) as ``registered_name``, the name
    of a registered loader: ``GLOBAL_CUSTOM_NAMES`` is what ``register_keras_serializable``
    writes, keyed by class."""
    object_registration.GLOBAL_CUSTOM_NAMES[cls] = registered_name


def registered_name(cls: type) -> str:
    return object_registration.get_registered_name(cls)


def takes_training(layer) -> bool:
    """True when ``layer.call`` has a ``training`` argument."""
    return layer._call_has_training_arg


def copy_state(old, new) -> None:
    """Copy ``old``'s state into ``new`` (same class, built) the way a ``.keras`` file does:
    each layer's ``save_own_variables``/``load_own_variables`` and ``save_assets``/
    ``load_assets``, recursively through sublayers. Raises when the two do not match."""
    _cache_skipsets()
    with tempfile.TemporaryDirectory(prefix="multidrop-state-") as folder:
        weights, assets = _MemoryStore(), saving_lib.DiskIOStore(folder, mode="r")
        saving_lib._save_state(old, weights, assets, "", set())
        failed, errors = set(), {}
        saving_lib._load_state(new, weights, assets, "", None, set(), failed, errors)
    if errors:
        layer, error = next(iter(errors.values()))
        raise ValueError(f"{type(layer).__name__} '{layer.name}': {error}")
    unread = {path for path, values in weights.contents.items() if values} - weights.read
    if unread:
        raise ValueError(f"the clone has no place for the original's state at {sorted(unread)}")


class _MemoryStore(saving_lib.H5IOStore):
    """The variable store of a ``.keras`` file, kept in memory. An H5IOStore (the one
    store class ``_save_state`` accepts on every Keras since 3.15) with no file."""

    def __init__(self):
        self.contents: dict = {}
        self.read: set = set()

    def __bool__(self):
        return True

    def has_path(self, path):
        return any(p == path or p.startswith(f"{path}/") for p in self.contents)

    def make(self, path, metadata=None):
        self.contents[path] = _Copies()
        return self.contents[path]

    def get(self, path):
        self.read.add(path)
        return self.contents.get(path, {})


class _Copies(dict):
    """Keeps a copy of each value, as a file does: a clone must not hold the original's
    JAX buffers, which ``fit`` and ``predict`` donate (delete) on the JAX backend."""

    def __setitem__(self, key, value):
        super().__setitem__(key, np.array(keras.ops.convert_to_numpy(value)))
