"""Graphs Keras itself can clone or save (issue 16), rebuilt as a user would, each held to
multidrop's promises: insert; bitwise inference (with ``training=False`` and with no training
argument); the original untouched; a ``.keras`` round trip; ``remove_dropout`` back to the
original. Case 4 of the issue (a Sequential whose layers use a mask) is in ``test_wild.py``.
"""

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy
from keras import layers

import multidrop

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 6)).astype("float32")


def perturbed(model):
    """``model`` with every weight moved, so that LoRA's zero-initialized B matters."""
    model.set_weights(
        [w + RNG.normal(size=w.shape).astype(w.dtype) / 4 for w in model.get_weights()]
    )
    return model


def lora_attention():
    """LoRA enabled on MultiHeadAttention's inner projections after construction: their
    config does not record it, so a clone from config had 5 weights where this has 11."""
    q = keras.Input((4, 6))
    mha = layers.MultiHeadAttention(2, 4, name="mha")
    h = layers.Dense(8, activation="relu", name="fc")(mha(q, q))
    model = keras.Model(q, layers.Dense(2, name="out")(h))
    for dense in (mha.query_dense, mha.key_dense, mha.value_dense, mha.output_dense):
        dense.enable_lora(2)
    return perturbed(model), RNG.normal(size=(2, 4, 6)).astype("float32")


def lora_dense():
    x = keras.Input((6,))
    fc = layers.Dense(8, activation="relu", name="fc")
    model = keras.Model(x, layers.Dense(2, name="out")(fc(x)))
    fc.enable_lora(2)
    return perturbed(model), X


@keras.saving.register_keras_serializable(package="test_keras_graphs")
class Dynamic(layers.Layer):
    """Knows its output only when called: Keras' Sequential.build stops here."""

    def call(self, inputs):
        return inputs * 2.0 + 1.0

    def compute_output_spec(self, *args, **kwargs):
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="test_keras_graphs")
class Product(layers.Layer):
    """Takes the dict a Sequential passes through."""

    def call(self, inputs):
        return inputs["a"] * inputs["b"]


def deferred_sequential(call_it=True):
    """Built with model.build(shape) whose shape inference could not run: no graph."""
    model = keras.Sequential(
        [
            layers.Dense(8, activation="relu", name="fc1"),
            Dynamic(name="dynamic"),
            layers.Dense(8, activation="relu", name="fc2"),
            layers.Dense(2, name="out"),
        ],
        name="deferred",
    )
    model.build((None, 6))
    if call_it:
        model(X)  # builds fc2 and out, as a first fit or predict would
    return model, X


def dict_sequential():
    """A Sequential passing a dict through: built on its first call, no graph."""
    model = keras.Sequential(
        [
            Product(name="product"),
            layers.Dense(8, activation="relu", name="fc"),
            layers.Dense(2, name="out"),
        ],
        name="dicts",
    )
    x = {"a": X, "b": RNG.normal(size=X.shape).astype("float32")}
    model(x)
    return model, x


def forced_training():
    """A nested model called with training=True written into the outer graph."""
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, activation="relu", name="in1"),
            layers.BatchNormalization(name="in_bn"),
            layers.Dense(8, activation="relu", name="in2"),
        ],
        name="inner",
    )
    x = keras.Input((6,))
    h = layers.Dense(8, activation="relu", name="fc")(inner(x, training=True))
    return keras.Model(x, layers.Dense(2, name="out")(h), name="forced"), X


GRAPHS = [lora_attention, lora_dense, deferred_sequential, dict_sequential, forced_training]


@pytest.mark.parametrize("make", GRAPHS, ids=lambda f: f.__name__)
def test_insert_answers_bitwise_round_trips_and_removes_back(make, tmp_path):
    model, x = make()
    unspecified = to_numpy(model(x))  # a BN forced into training mode moves its statistics
    before, answer = snapshot(model), to_numpy(model(x, training=False))
    rewired = multidrop.insert_dropout(model, 0.5, seed=1)

    assert_identical(rewired(x, training=False), answer)
    rewired.save(tmp_path / "rewired.keras")
    assert_identical(keras.saving.load_model(tmp_path / "rewired.keras")(x, training=False), answer)
    plain = multidrop.remove_dropout(rewired)
    assert [layer.name for layer in plain.layers] == [layer.name for layer in model.layers]
    assert_identical(plain(x, training=False), answer)
    assert_identical(rewired(x), unspecified)  # no training argument: as the original
    assert_snapshot_equal(before, snapshot(model))


def lambda_layer():
    x = keras.Input((6,))
    h = layers.Lambda(lambda t: t * 2.0, name="twice")(layers.Dense(8, activation="relu")(x))
    return keras.Model(x, layers.Dense(2)(h))


def argument_less_layer():
    class Twice(layers.Layer):
        def __init__(self):
            super().__init__(name="twice")

        def call(self, inputs):
            return inputs * 2.0

    x = keras.Input((6,))
    return keras.Model(x, layers.Dense(2)(Twice()(layers.Dense(8, activation="relu")(x))))


@pytest.mark.parametrize("make", [lambda_layer, argument_less_layer], ids=lambda f: f.__name__)
def test_share_weights_is_the_way_out_for_insert_and_remove(make):
    """Layers that cannot be rebuilt from their config: the error names share_weights=True,
    and both insert_dropout and remove_dropout take it."""
    model = make()
    answer = to_numpy(model(X))
    with pytest.raises(TypeError, match=r"(?s)cannot clone .*'twice'.*share_weights=True"):
        multidrop.insert_dropout(model, 0.5)
    rewired = multidrop.insert_dropout(model, 0.5, share_weights=True)
    with pytest.raises(TypeError, match=r"(?s)cannot clone .*'twice'.*share_weights=True"):
        multidrop.remove_dropout(rewired)

    plain = multidrop.remove_dropout(rewired, share_weights=True)
    assert_identical(rewired(X, training=False), answer)
    assert_identical(plain(X), answer)
    assert not any(layer.name.endswith("_multidrop") for layer in plain.layers)
    assert plain.get_layer("twice") is model.get_layer("twice")


def test_a_sequential_built_short_of_its_layers_is_refused_with_the_true_reason():
    model, _ = deferred_sequential(call_it=False)
    with pytest.raises(ValueError, match=r"\['fc2', 'out'\] have no weights yet.*model\(x\)"):
        multidrop.insert_dropout(model, 0.5)


@pytest.mark.parametrize("make", [deferred_sequential, dict_sequential], ids=lambda f: f.__name__)
def test_a_sequential_without_a_graph_is_rewired_as_a_list(make):
    model, x = make()
    rewired = multidrop.insert_dropout(model, 0.5, seed=1, mc=True)
    names = [layer.name for layer in rewired.layers]
    assert [n for n in names if not n.endswith("_multidrop")] == [
        layer.name for layer in model.layers
    ]
    assert names[names.index("fc1" if "fc1" in names else "fc") + 1].endswith("_multidrop")
    mean, std = multidrop.mc_predict(rewired, x, samples=8, seed=0)
    assert mean.shape == (len(X), 2) and std.max() > 0


def test_verify_checks_a_sequential_without_a_graph():
    model, x = deferred_sequential()
    rewired = multidrop.insert_dropout(model, 0.5)
    assert multidrop.verify(model, rewired, x).ok
    assert multidrop.verify(model, rewired).ok  # inputs generated from the list's first input


def test_a_nested_call_with_training_true_gets_no_dropout_unless_asked():
    model, _ = forced_training()
    plan = multidrop.plan(model, 0.5)
    assert [site.call.name for site in plan] == ["fc"]
    assert "3 layers inside models called with training=True are skipped" in plan.note
    assert [s.call.qualname for s in multidrop.plan(model, 0.5, mc=True)] == [
        "inner/in1",
        "inner/in2",
        "fc",
    ]


@pytest.mark.parametrize("mc", [False, True], ids=["mc=False", "mc=True"])
def test_mc_predict_leaves_batch_norm_statistics_alone(mc):
    x = keras.Input((6,))
    h = layers.BatchNormalization(name="bn")(layers.Dense(8, activation="relu", name="fc1")(x))
    model = perturbed(keras.Model(x, layers.Dense(2)(layers.Dense(8, activation="relu")(h))))
    rewired = multidrop.insert_dropout(model, 0.5, mc=mc)
    statistics = [np.array(v) for v in rewired.get_layer("bn").non_trainable_weights]

    multidrop.mc_predict(rewired, X * 3 + 1, samples=4, seed=0)
    rewired(X * 3 + 1)  # no training argument: a dropout with mc=True set it for the layers after
    for before, after in zip(statistics, rewired.get_layer("bn").non_trainable_weights):
        assert np.array_equal(before, np.array(after))
