"""set_dropout: a trained model's own dropout rates changed, everything else kept.

keras-hub backbones keep their class, config and weights; LSTM/GRU get an active
recurrent dropout; an existing Dropout's rate is measured; MultiHeadAttention's
dropout is set on the keras-io text-classification transformer; bad input is refused
and leaves the model as it was.
"""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy
from keras import layers, ops
from models import tiny_hub

import multidrop

# Rate fields a layer's config can hold, read here without multidrop.
RATE_KEYS = ("dropout", "attention_dropout", "recurrent_dropout")


def tiny_backbone(cls):
    return tiny_hub(cls, max_sequence_length=16)


def token_inputs(model, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(0, 50, size=(batch, 16)).astype("int32"),
        "padding_mask": np.ones((batch, 16), "int32"),
    }
    x["padding_mask"][:, 12:] = 0  # some padding, so the mask matters
    if "segment_ids" in model.input:
        x["segment_ids"] = rng.integers(0, 2, size=(batch, 16)).astype("int32")
    return x


def rates_in(model) -> dict[str, float]:
    """Every dropout rate in ``model`` and all its sublayers, by layer path and field."""
    found = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        config = layer.get_config()
        keys = [k for k in RATE_KEYS if k in config]
        if isinstance(layer, layers.Dropout):
            keys.append("rate")
        found.update({f"{layer.path}:{k}": float(config[k]) for k in keys})
    return found


def train_one_step(backbone, x):
    """One training step of the backbone: as a BertTextClassifier for BERT, else under a
    small regression head over all its outputs. Returns the losses."""
    y = np.array([0, 1] * (len(x["token_ids"]) // 2))
    if isinstance(backbone, keras_hub.models.BertBackbone):
        model = keras_hub.models.BertTextClassifier(
            backbone=backbone, preprocessor=None, num_classes=2
        )
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        outputs = keras.tree.flatten(backbone(backbone.input))
        pooled = [layers.GlobalAveragePooling1D()(t) if len(t.shape) == 3 else t for t in outputs]
        head = layers.Dense(1)(pooled[0] if len(pooled) == 1 else layers.Concatenate()(pooled))
        model, loss = keras.Model(backbone.input, head), "mse"
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    return model.train_on_batch(x, y)


@pytest.mark.parametrize(
    "cls, block",
    [
        (keras_hub.models.BertBackbone, keras_hub.layers.TransformerEncoder),
        (keras_hub.models.GPT2Backbone, keras_hub.layers.TransformerDecoder),
    ],
    ids=["bert", "gpt2"],
)
def test_hub_backbone_keeps_class_and_answers_bitwise(cls, block, tmp_path):
    model = tiny_backbone(cls)
    x = token_inputs(model)
    before = snapshot(model)
    old_rates = rates_in(model)
    assert set(old_rates.values()) == {0.1}

    plan = multidrop.set_plan(model, 0.2)
    assert [(c.qualname, c.field, c.old, c.new, c.kernel) for c in plan] == [
        (model.name, "dropout", 0.1, 0.2, "")
    ]
    clone = multidrop.set_dropout(model, 0.2)

    assert type(clone) is cls and clone.name == model.name
    blocks = [layer for layer in clone.layers if isinstance(layer, block)]
    assert len(blocks) == 2
    for b in blocks:
        assert b.get_config()["dropout"] == 0.2
        attention = [s for s in b._flatten_layers() if isinstance(s, layers.MultiHeadAttention)]
        assert attention and all(a.get_config()["dropout"] == 0.2 for a in attention)
    new_rates = rates_in(clone)
    assert new_rates.keys() == old_rates.keys() and set(new_rates.values()) == {0.2}

    # Inference: bitwise; training: stochastic.
    assert_identical(model(x, training=False), clone(x, training=False))
    first, second = to_numpy(clone(x, training=True)), to_numpy(clone(x, training=True))
    for a, b in zip(keras.tree.flatten(first), keras.tree.flatten(second)):
        assert np.max(np.abs(a - b)) > 1e-3

    # The clone trains (BERT's as a BertTextClassifier); the original keeps its config and
    # weights.
    clone_weights = [np.array(w) for w in clone.get_weights()]
    assert np.all(np.isfinite(train_one_step(clone, x)))
    assert any(not np.array_equal(a, b) for a, b in zip(clone_weights, clone.get_weights()))
    assert_snapshot_equal(before, snapshot(model))
    assert rates_in(model) == old_rates
    assert rates_in(clone) == new_rates

    # A local preset round trip gives the same class, rates and inference.
    folder = str(tmp_path / "preset")
    clone.save_to_preset(folder)
    loaded = keras_hub.models.Backbone.from_preset(folder)
    assert type(loaded) is cls and loaded.get_config()["dropout"] == 0.2
    assert_identical(clone(x, training=False), loaded(x, training=False))


@pytest.mark.parametrize("cls", [layers.LSTM, layers.GRU], ids=["lstm", "gru"])
def test_recurrent_dropout_is_active_in_training(cls):
    inputs = keras.Input((12, 5))
    hidden = cls(6, return_sequences=True, name="rnn")(inputs)
    model = keras.Model(inputs, layers.Dense(2, name="head")(hidden))
    x = np.random.default_rng(0).normal(size=(8, 12, 5)).astype("float32")
    before = snapshot(model)

    plan = multidrop.set_plan(model, 0.5, fields="recurrent_dropout")
    assert [(c.qualname, c.field, c.old, c.new) for c in plan] == [
        ("rnn", "recurrent_dropout", 0.0, 0.5)
    ]
    assert plan[0].kernel  # Keras leaves its fused kernel: named in the plan
    clone = multidrop.set_dropout(model, 0.5, fields="recurrent_dropout")
    config = clone.get_layer("rnn").get_config()
    assert (config["recurrent_dropout"], config["dropout"]) == (0.5, 0.0)

    # Inference agrees within float rounding (another kernel, see the plan).
    reference, answer = to_numpy(model(x, training=False)), to_numpy(clone(x, training=False))
    print(f"{cls.__name__} inference max abs diff {np.max(np.abs(reference - answer)):.3g}")
    np.testing.assert_allclose(answer, reference, rtol=0, atol=1e-5)

    # Training: the original (rate 0) is deterministic, the clone drops recurrent state.
    np.testing.assert_array_equal(to_numpy(model(x, training=True)), reference)
    first, second = to_numpy(clone(x, training=True)), to_numpy(clone(x, training=True))
    assert np.max(np.abs(first - reference)) > 1e-2
    assert np.max(np.abs(first - second)) > 1e-2
    assert_snapshot_equal(before, snapshot(model))


def test_existing_dropout_rate_is_changed():
    inputs = keras.Input((4096,))
    dropped = layers.Dropout(0.5, name="drop")(inputs)
    model = keras.Model(inputs, layers.Dense(2, name="head")(dropped))
    clone = multidrop.set_dropout(model, 0.1)
    assert clone.get_layer("drop").rate == 0.1 and model.get_layer("drop").rate == 0.5

    ones = np.ones((64, 4096), "float32")  # 262144 draws: the zero fraction has sd < 0.001
    for net, rate in ((clone, 0.1), (model, 0.5)):
        probe = keras.Model(net.input, net.get_layer("drop").output)
        y = to_numpy(probe(ones, training=True))
        zeros = np.mean(y == 0)
        print(f"rate {rate}: fraction of zeros {zeros:.4f}")
        assert abs(zeros - rate) < 0.005
        np.testing.assert_allclose(y[y != 0], 1 / (1 - rate), rtol=1e-6)


def text_transformer(vocab=50, maxlen=16, embed=8, heads=2, ff=16):
    """The keras-io text-classification transformer, its block written out as graph layers."""
    tokens = keras.Input((maxlen,), dtype="int32", name="tokens")
    x = layers.Embedding(vocab, embed, name="token_emb")(tokens)
    x = x + layers.Embedding(maxlen, embed, name="pos_emb")(ops.arange(maxlen)[None])
    attention = layers.MultiHeadAttention(heads, embed, name="attention")(x, x)
    attention = layers.Dropout(0.1, name="attention_dropout")(attention)
    x = layers.LayerNormalization(epsilon=1e-6, name="norm1")(x + attention)
    f = layers.Dense(ff, activation="relu", name="ffn_1")(x)
    f = layers.Dropout(0.1, name="ffn_dropout")(layers.Dense(embed, name="ffn_2")(f))
    x = layers.LayerNormalization(epsilon=1e-6, name="norm2")(x + f)
    x = layers.Dropout(0.1, name="pool_dropout")(layers.GlobalAveragePooling1D(name="pool")(x))
    x = layers.Dropout(0.1, name="dense_dropout")(layers.Dense(20, activation="relu")(x))
    outputs = layers.Dense(2, activation="softmax", name="label")(x)
    return keras.Model(tokens, outputs, name="text_transformer")


def test_attention_dropout_on_the_keras_io_transformer():
    model = text_transformer()
    x = np.random.default_rng(0).integers(0, 50, size=(8, 16)).astype("int32")
    before = snapshot(model)

    plan = multidrop.set_plan(model, 0.1, where=layers.MultiHeadAttention)
    assert [(c.qualname, c.field, c.old, c.new) for c in plan] == [
        ("attention", "dropout", 0.0, 0.1)
    ]
    assert "dot_product_attention" in plan[0].kernel and "kernel" in str(plan)
    clone = multidrop.set_dropout(model, 0.1, where=layers.MultiHeadAttention)
    assert clone.get_layer("attention").get_config()["dropout"] == 0.1
    assert clone.get_layer("ffn_dropout").rate == 0.1  # the Dropout layers are not selected

    reference, answer = to_numpy(model(x, training=False)), to_numpy(clone(x, training=False))
    print(f"MultiHeadAttention inference max abs diff {np.max(np.abs(reference - answer)):.3g}")
    np.testing.assert_allclose(answer, reference, rtol=0, atol=1e-6)

    # In training the attention output is stochastic in the clone only.
    def attention_output(net):
        probe = keras.Model(net.input, net.get_layer("attention").output)
        return to_numpy(probe(x, training=True)), to_numpy(probe(x, training=True))

    a, b = attention_output(model)
    np.testing.assert_array_equal(a, b)
    a, b = attention_output(clone)
    assert np.max(np.abs(a - b)) > 1e-3
    assert_snapshot_equal(before, snapshot(model))


def test_no_rate_field_anywhere_is_refused():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layers.Dense(2)(layers.Dense(3, activation="relu")(inputs)))
    with pytest.raises(ValueError, match=r"no layer with a dropout-rate field.*insert_dropout"):
        multidrop.set_dropout(model, 0.2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rate": 1.5}, ValueError, r"rate must be a float in \[0, 1\), got 1.5"),
        ({"rate": -0.1}, ValueError, r"rate must be a float in \[0, 1\), got -0.1"),
        ({"rate": 0.2, "fields": "nope"}, ValueError, r"dropout-rate field named \['nope'\]"),
        ({"rate": 0.2, "fields": 3}, TypeError, "fields must be a field name"),
        ({"rate": 0.2, "where": lambda layer: False}, ValueError, "matched no layer"),
        ({"rate": 0.2, "where": ["no_such_layer"]}, ValueError, "no_such_layer"),
        (
            {"rate": 0.2, "where": ["ffn_1"]},
            ValueError,
            r"'ffn_1' \(Dense\) has no dropout-rate field",
        ),
        (
            {"rate": 0.2, "where": ["attention", "ffn_1"]},
            ValueError,
            r"'ffn_1' \(Dense\) has no dropout-rate field",
        ),
        (
            {"rate": 0.2, "where": layers.MultiHeadAttention, "fields": "recurrent_dropout"},
            ValueError,
            r"'attention' \(MultiHeadAttention\) has no dropout-rate field named",
        ),
        ({"rate": {"ffn_1": 0.2}}, ValueError, r"rate names \['ffn_1'\]"),
    ],
    ids=[
        "rate>1",
        "rate<0",
        "unknown-field",
        "fields-type",
        "where-nothing",
        "where-unknown",
        "selected-without-field",
        "one-selected-without-field",
        "selected-without-that-field",
        "rate-dict-unknown",
    ],
)
def test_bad_input_is_refused_and_model_untouched(kwargs, error, match):
    model = text_transformer()
    before = snapshot(model)
    for function in (multidrop.set_dropout, multidrop.set_plan):
        with pytest.raises(error, match=match):
            function(model, **kwargs)
    assert_snapshot_equal(before, snapshot(model))


def test_mc_predict_samples_through_built_in_dropout():
    backbone = tiny_backbone(keras_hub.models.BertBackbone)
    x = token_inputs(backbone)
    clone = multidrop.set_dropout(backbone, 0.2)
    before = snapshot(clone)
    _, spread = multidrop.mc_predict(clone, x, samples=4, seed=0)
    assert all(np.max(s) > 0 for s in keras.tree.flatten(spread))
    assert_snapshot_equal(before, snapshot(clone))  # sampling writes nothing of the model
    _, spread = multidrop.mc_predict(multidrop.set_dropout(backbone, 0.0), x, samples=4, seed=0)
    assert all(np.max(s) == 0 for s in keras.tree.flatten(spread))


def test_hub_task_keeps_class_and_sets_its_backbone_too():
    """A task's own ``dropout`` drives only its head: its backbone is a row of its own, and
    the clone, still a BertTextClassifier, carries both in its config."""
    backbone = tiny_backbone(keras_hub.models.BertBackbone)
    task = keras_hub.models.BertTextClassifier(backbone=backbone, preprocessor=None, num_classes=2)
    rows = [(c.qualname, c.field, c.new) for c in multidrop.set_plan(task, 0.2)]
    assert rows == [(task.name, "dropout", 0.2), (backbone.name, "dropout", 0.2)]
    clone = multidrop.set_dropout(task, 0.2)
    assert type(clone) is keras_hub.models.BertTextClassifier
    assert clone.get_config()["dropout"] == clone.backbone.get_config()["dropout"] == 0.2
    assert backbone.get_config()["dropout"] == 0.1
    x = token_inputs(backbone)
    assert_identical(task(x, training=False), clone(x, training=False))
