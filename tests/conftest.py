"""Shared helpers: each test process runs one Keras backend, chosen by KERAS_BACKEND (nox
sets it)."""

import keras
import numpy as np
import pytest


def to_numpy(tree):
    """Model outputs (a tensor, list or dict of tensors) as numpy arrays, same structure."""
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


def assert_identical(a, b):
    """Bitwise equality of two model outputs of the same structure."""
    keras.tree.assert_same_structure(a, b)
    for x, y in zip(keras.tree.flatten(to_numpy(a)), keras.tree.flatten(to_numpy(b))):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), f"max abs difference {np.max(np.abs(x - y))}"


def snapshot(model):
    """Everything about a model that must survive rewiring untouched."""
    return {
        "config": keras.saving.serialize_keras_object(model),
        "weights": [np.array(w) for w in model.get_weights()],
        "trainable": [(v.path, v.trainable) for v in model.weights],
        "layers": [(layer.name, layer.trainable) for layer in model._flatten_layers()],
    }


def assert_snapshot_equal(before, after):
    assert before["config"] == after["config"]
    assert before["trainable"] == after["trainable"]
    assert before["layers"] == after["layers"]
    assert len(before["weights"]) == len(after["weights"])
    for x, y in zip(before["weights"], after["weights"]):
        assert np.array_equal(x, y)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
