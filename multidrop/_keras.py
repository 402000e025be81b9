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
from keras.src.layers.convolutional.base_conv import BaseConv  # noqa: E402
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose  # noqa: E402
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv  # noqa: E402
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv  # noqa: E402
from keras.src.models.functional import Functional  # noqa: E402

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


def is_called(layer) -> bool:
    """True once ``layer`` has been called on symbolic inputs (it is in some graph)."""
    return bool(layer._inbound_nodes)
