"""Inputs for a model under test: generated from its input specs, flattened and packed.

``sample_inputs`` makes a deterministic batch that fits the model (integer ids
stay below the ``input_dim`` of the Embedding they feed). ``flat_inputs`` and
``pack`` turn inputs into a list of arrays and back, so they can be saved with
``np.savez`` and read in another process.

Example:
    >>> x = sample_inputs(model)            # {"image": float32 (2, 16, 16, 3), "tokens": ...}
    >>> pack(model, flat_inputs(model, x))  # the same structure again
"""

from __future__ import annotations

import keras
import numpy as np

from multidrop import graph, probe

SMALL_INT_RANGE = 10  # integer inputs that feed no Embedding are drawn from [0, 10)


def sample_inputs(model: keras.Model, *, batch_size: int = 2, seed: int = 0):
    """Deterministic inputs for ``model``, shaped and typed by its inputs.

    Floats are standard normal (bfloat16 inputs get float32 values, which the
    model casts); integers are drawn from ``[0, input_dim)`` of the smallest
    Embedding they feed (through reshapes and nested models), else from
    ``[0, 10)``; booleans are fair coins; unknown dimensions are 8.

    A subclassed model has no input specs: its inputs are those multidrop reads its
    ``call()`` with (see `multidrop.probe.default_sample`).

    Args:
        model: a built Keras model.
        batch_size: the size of the batch.
        seed: the seed of the generator; the same seed gives the same inputs.

    Returns:
        Numpy arrays nested as ``model``'s inputs are (a dict, a list or one array).

    Example:
        >>> x = sample_inputs(model)   # {"image": float32 (2, 16, 16, 3), "tokens": int32 (2, 8)}
    """
    graph.check_model(model)
    if not graph.is_graph_model(model):
        return probe.sample_of(model)
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
    return pack(model, arrays)


def pack(model, arrays: list):
    """``arrays``, one per input of ``model`` in order, nested as ``model`` takes them."""
    return keras.tree.pack_sequence_as(_structure(model), arrays)


def _structure(model):
    """A graph model's inputs; for a subclassed model, those it is read with (its probe's)."""
    return graph.inputs_struct(model) if graph.is_graph_model(model) else probe.sample_of(model)


def flat_inputs(model, x) -> list[np.ndarray]:
    """``x`` as a list of numpy arrays in the order of ``model.inputs``."""
    if not graph.is_graph_model(model):
        return [keras.ops.convert_to_numpy(a) for a in keras.tree.flatten(x)]
    inputs = graph.graph_of(model).inputs
    if isinstance(x, dict) and not isinstance(graph.inputs_struct(model), dict):
        x = [x[t.name] for t in inputs]
    arrays = [keras.ops.convert_to_numpy(a) for a in keras.tree.flatten(x)]
    if len(arrays) != len(inputs):
        raise ValueError(
            f"x has {len(arrays)} arrays but model '{model.name}' has {len(inputs)} inputs "
            f"{[t.name for t in inputs]}. Pass one array per input, or x=None to generate them."
        )
    return arrays


def _index_limit(model, tensor) -> int:
    """Exclusive bound for the integer values of ``tensor``, an input of ``model``."""
    dims = [
        layer.input_dim
        for layer in _consumers(model, [tensor])
        if isinstance(layer, keras.layers.Embedding)
    ]
    return min(dims, default=SMALL_INT_RANGE)


def _consumers(model, tensors):
    """The layers that ``tensors`` reach while they stay integer, nested models included."""
    reached = set(map(id, tensors))
    for node in graph.nodes(model):
        if not any(id(t) in reached for t in node.input_tensors):
            continue
        op = node.operation
        if graph.is_graph_model(op):
            inner = [
                t
                for t, outer in zip(graph.graph_of(op).inputs, node.input_tensors)
                if id(outer) in reached
            ]
            yield from _consumers(op, inner)
        else:
            yield op
        reached.update(id(t) for t in node.outputs if "int" in str(t.dtype))
