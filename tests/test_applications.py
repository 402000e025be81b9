"""Real models from keras.applications (weights=None, small inputs): the full check on each."""

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy
from keras import layers

import multidrop


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)


def inception_v3():
    return keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3), classes=10)


def mobilenet_v2_frozen_backbone():
    """Transfer learning: a frozen MobileNetV2 nested inside a new trainable head."""
    backbone = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, include_top=False
    )
    backbone.trainable = False
    x = keras.Input((32, 32, 3), name="image")
    h = layers.GlobalAveragePooling2D(name="pool")(backbone(x))
    h = layers.Dense(32, activation="relu", bias_initializer="ones", name="head")(h)
    return keras.Model(x, layers.Dense(10, activation="softmax", name="probs")(h), name="transfer")


def hidden_activations(model):
    """Activations counted independently of multidrop: activation layers and fused
    activations, nested models included, minus the one that produces the output."""
    count = 0
    for layer in model._flatten_layers(include_self=False):
        act = getattr(layer, "activation", None)
        if isinstance(layer, (layers.ReLU, layers.Activation)) or isinstance(layer, layers.Dense):
            count += act is not keras.activations.linear
    return count - 1  # the softmax output layer


# JAX builds and first calls big models slowly (an XLA compile per new shape: InceptionV3's
# training step alone took 62 s there), so CI gives InceptionV3 the full treatment on torch
# and tensorflow; `nox -s sweep` rewires it on every backend.
CASES = [resnet50, inception_v3, mobilenet_v2_frozen_backbone]
if keras.backend.backend() == "jax":
    CASES.remove(inception_v3)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    keras.utils.set_random_seed(0)
    model = request.param()
    before = snapshot(model)
    rewired = multidrop.insert_dropout(model, 0.2, seed=0)
    x = np.random.default_rng(0).uniform(size=(2, *model.input_shape[1:])).astype("float32")
    return model, before, rewired, x


def test_one_dropout_per_hidden_activation(case):
    model, _, rewired, _ = case
    plan = multidrop.plan(model, 0.2)
    added = [x for x in rewired._flatten_layers() if isinstance(x, layers.Dropout)]
    assert len(added) == len(plan) == hidden_activations(model)
    if model.name == "resnet50":  # one per hidden ReLU: the stem's and 3 in each of 16 blocks
        assert len(plan) == 49 and "49 dropout layers" in str(plan)


def test_inference_round_trip_training_and_original_untouched(case, tmp_path):
    """In this order, on one clone: identical inference, stochastic training-mode
    output, a .keras round trip, then one training step that leaves the original as it was."""
    model, before, rewired, x = case
    assert_identical(model(x, training=False), rewired(x, training=False))
    a, b = to_numpy(rewired(x, training=True)), to_numpy(rewired(x, training=True))
    assert not np.array_equal(a, b)

    rewired.save(tmp_path / "rewired.keras")
    loaded = keras.saving.load_model(tmp_path / "rewired.keras")
    assert_identical(rewired(x, training=False), loaded(x, training=False))
    assert [w.path for w in loaded.weights] == [w.path for w in rewired.weights]

    weights = [np.array(w) for w in rewired.get_weights()]
    rewired.compile(optimizer=keras.optimizers.SGD(1e-4), loss="categorical_crossentropy")
    rewired.train_on_batch(x, np.eye(10, dtype="float32")[[1, 2]])
    changed = [not np.array_equal(w, v) for w, v in zip(weights, rewired.get_weights())]
    assert any(changed)
    assert_snapshot_equal(before, snapshot(model))
    if model.name == "transfer":  # the frozen backbone moved neither weights nor BN statistics
        assert len(rewired.trainable_weights) == 4
        assert not any(changed[: len(rewired.layers[1].weights)])
