"""Models from the wild (issue 14): adapted preprocessing state, masked Sequential models and
wrapped activations, as in keras-io examples, the masking guide and a BiLSTM tagger.

Each model gets the three promises: bitwise inference, a ``.keras`` round trip, and the
original untouched (its config, weights and answers), also after the rewired model trains
(on JAX, ``fit`` donates the buffers of the variables it trains: a clone that held the
original's arrays deleted them).

Wrappers: ``TimeDistributed(Dense(8, activation="relu"))`` is an activation site, since its
output is the activation the user fused into the Dense. ``Bidirectional(LSTM)`` is not, nor
is any recurrent layer: the ``tanh`` of its cell is applied inside the recurrence, and what
comes out is the hidden state, not an activation the user asked for. It is rewired when picked
explicitly (``select.layers(layers.Bidirectional)``); see ``select.activations()``.
"""

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy
from keras import layers

import multidrop
from multidrop import select

RNG = np.random.default_rng(0)
IDS = np.array([[3, 7, 1, 0, 0], [5, 2, 9, 4, 0]], "int32")  # 0 pads (mask_zero=True)
STEPS = RNG.normal(size=(2, 5, 3)).astype("float32")
STEPS[0, 3:] = 0.0  # padded time steps for Masking()


def normalization():
    """The issue's case 1 (keras-io ViT and MLP-Mixer start so): jax and tensorflow lost
    the adapted statistics, which Keras derives in finalize_state()."""
    norm = layers.Normalization()
    norm.adapt(np.random.rand(32, 4).astype("float32") * 10 + 3)
    inp = keras.Input((4,))
    m = keras.Model(inp, layers.Dense(2)(layers.Dense(8, activation="relu")(norm(inp))))
    return m, RNG.normal(size=(3, 4)).astype("float32") * 10 + 3, {}


def discretization():
    disc = layers.Discretization(num_bins=4, output_mode="one_hot")
    disc.adapt(RNG.random((64, 1)).astype("float32") * 5)
    inp = keras.Input((1,))
    m = keras.Model(inp, layers.Dense(2)(layers.Dense(8, activation="relu")(disc(inp))))
    return m, RNG.random((5, 1)).astype("float32") * 5, {}


def lookup(layer, vocabulary, x, dtype):
    """A lookup layer whose vocabulary exists only once adapted (an asset, not a weight)."""
    layer.adapt(vocabulary)
    inp = keras.Input((x.shape[1],), dtype=dtype)
    h = layers.GlobalAveragePooling1D()(layers.Embedding(8, 4)(layer(inp)))
    return keras.Model(inp, layers.Dense(2)(layers.Dense(8, activation="relu")(h))), x, {}


def integer_lookup():
    return lookup(layers.IntegerLookup(), np.array([5, 7, 7, 9, 11, 11]), IDS + 5, "int32")


def string_lookup():
    words = np.array([["a", "b", "z"], ["d", "c", "a"]])
    return lookup(layers.StringLookup(), np.array(["a", "b", "b", "c", "d"]), words, "string")


def embedding_lstm():
    """The issue's case 2: ValueError "Only instances of keras.Layer can be added to a
    Sequential model. Received: <Operation name=not_equal>" (the mask's op node)."""
    s = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            layers.Embedding(50, 4, mask_zero=True),
            layers.LSTM(4),
        ]
    )
    return s, IDS, {"where": layers.Embedding}


def masking_lstm():
    """Masking() first, dropout right after the masking layer."""
    s = keras.Sequential([keras.Input((5, 3)), layers.Masking(), layers.LSTM(4)])
    return s, STEPS, {"where": layers.Masking}


def functional_masks():
    """Embedding(mask_zero=True) and a Masking layer in a Functional graph."""
    inp = keras.Input((None,), dtype="int32")
    h = layers.Embedding(50, 4, mask_zero=True)(inp)
    h = layers.Dense(4, activation="relu")(h)
    return keras.Model(inp, layers.LSTM(3)(h)), IDS, {}


def time_distributed():
    """The issue's case 3: a tagging head that the default selector did not see."""
    inp = keras.Input((5, 3))
    h = layers.TimeDistributed(layers.Dense(8, activation="relu"), name="td")(inp)
    return keras.Model(inp, layers.Dense(2)(h)), STEPS, {}


def bilstm_tagger():
    """A BiLSTM tagger, masked: the TimeDistributed head is an activation site, and the
    Bidirectional is picked explicitly."""
    inp = keras.Input((None,), dtype="int32")
    h = layers.Embedding(50, 4, mask_zero=True)(inp)
    h = layers.Bidirectional(layers.LSTM(4, return_sequences=True), name="bi")(h)
    h = layers.TimeDistributed(layers.Dense(8, activation="relu"), name="td")(h)
    model = keras.Model(inp, layers.TimeDistributed(layers.Dense(3), name="tags")(h))
    return model, IDS, {"where": select.activations() | select.layers(layers.Bidirectional)}


MODELS = [
    normalization,
    discretization,
    integer_lookup,
    embedding_lstm,
    masking_lstm,
    functional_masks,
    time_distributed,
    bilstm_tagger,
]
if keras.backend.backend() == "tensorflow":  # Keras has string tensors on TensorFlow only
    MODELS.append(string_lookup)


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_rewired_model_answers_bitwise_round_trips_and_leaves_the_original(make, tmp_path):
    model, x, options = make()
    before, answer = snapshot(model), to_numpy(model(x, training=False))

    rewired = multidrop.insert_dropout(model, 0.5, seed=1, **options)

    assert (
        len(multidrop.plan(model, 0.5, **options))
        == sum("_multidrop" in layer.name for layer in rewired.layers)
        > 0
    )
    assert_identical(rewired(x, training=False), answer)
    rewired.save(tmp_path / "rewired.keras")
    assert_identical(keras.saving.load_model(tmp_path / "rewired.keras")(x), answer)
    assert_snapshot_equal(before, snapshot(model))
    assert_identical(model(x, training=False), answer)


@pytest.mark.parametrize("make", [normalization, time_distributed], ids=lambda f: f.__name__)
def test_training_the_rewired_model_leaves_the_original(make):
    model, x, options = make()
    before, answer = snapshot(model), to_numpy(model(x, training=False))
    rewired = multidrop.insert_dropout(model, 0.5, seed=1, **options)
    rewired.compile("sgd", "mse")
    rewired.fit(x, np.ones_like(answer), batch_size=len(x), epochs=2, verbose=0)

    assert not np.array_equal(to_numpy(rewired(x, training=False)), answer)  # it trained
    assert_snapshot_equal(before, snapshot(model))
    assert_identical(model(x, training=False), answer)


@pytest.mark.parametrize("make", [embedding_lstm, masking_lstm], ids=lambda f: f.__name__)
def test_the_mask_reaches_the_lstm_of_a_rewired_sequential_in_training(make):
    """The rewired Sequential's LSTM gets the mask in training mode too: its output is the
    one the layers give when the mask is passed to the LSTM by hand, with the same dropout."""
    model, x, options = make()
    rewired = multidrop.insert_dropout(model, 0.5, seed=1, **options)
    first, dropout, lstm = rewired.layers
    assert dropout.name.endswith("_multidrop")
    state = dropout.seed_generator.state
    start = np.array(state)

    by_hand = lstm(dropout(first(x), training=True), mask=first.compute_mask(x), training=True)
    state.assign(start)
    assert_identical(rewired(x, training=True), by_hand)
    unmasked = lstm(dropout(first(x), training=True), training=True)  # the test can fail
    assert not np.array_equal(to_numpy(unmasked), to_numpy(by_hand))


def test_wrapped_activations_are_sites_and_recurrent_outputs_are_not():
    model, _, options = bilstm_tagger()
    assert [site.call.name for site in multidrop.plan(model, 0.5)] == ["td"]
    assert [site.call.name for site in multidrop.plan(model, 0.5, **options)] == ["bi", "td"]
    assert select.is_activation(layers.TimeDistributed(layers.Conv1D(2, 1, activation="gelu")))
    assert not select.is_activation(layers.TimeDistributed(layers.Dense(2)))
    assert not select.is_activation(layers.Bidirectional(layers.LSTM(2)))
    assert not select.is_activation(layers.LSTM(2))
