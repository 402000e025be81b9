"""insert_dropout / plan / remove_dropout on hand-built graphs: every promise of the rewiring
core."""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy
from keras import layers

import multidrop
from multidrop import select

X = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")


def mlp_with_ops():
    """Functional MLP: fused activations, an activation op node, a shared layer, a residual Add."""
    x = keras.Input((8,), name="features")
    shared = layers.Dense(16, activation="relu", name="shared")
    h = shared(x)
    g = keras.activations.relu(layers.Dense(16, name="fc2")(h))
    g = layers.Dense(8, name="fc3")(g)
    h2 = shared(g)
    out = layers.Dense(3, activation="softmax", name="probs")(layers.Add(name="add")([h, h2]))
    return keras.Model(x, out, name="mlp")


def two_heads():
    """Two named inputs, a dict of two outputs."""
    a = keras.Input((8,), name="a")
    b = keras.Input((4,), name="b")
    h = layers.Concatenate(name="cat")([layers.Dense(8, activation="tanh", name="fa")(a), b])
    h = layers.Dense(8, activation="gelu", name="trunk")(h)
    outputs = {
        "score": layers.Dense(1, name="score")(h),
        "label": layers.Dense(2, activation="softmax", name="label")(h),
    }
    return keras.Model({"a": a, "b": b}, outputs, name="two_heads")


def with_nested():
    """A frozen nested Sequential block and a trainable nested Functional block."""
    block = keras.Sequential(
        [
            keras.Input((8,)),
            layers.Dense(8, activation="relu", name="s1"),
            layers.BatchNormalization(name="s_bn"),
        ],
        name="seq_block",
    )
    block.trainable = False
    inner_in = keras.Input((8,))
    inner = keras.Model(
        inner_in, layers.Dense(8, activation="elu", name="f1")(inner_in), name="fn_block"
    )
    x = keras.Input((8,), name="x")
    h = inner(block(x))
    h = layers.Dense(8, activation="relu", name="head")(h)
    return keras.Model(x, layers.Dense(2, name="out")(h), name="nested")


def train_one_step(model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.train_on_batch(x, y)


def test_inserts_after_every_activation_including_op_nodes_and_shared_calls():
    model = mlp_with_ops()
    rewired = multidrop.insert_dropout(model, 0.5)
    added = [layer.name for layer in rewired.layers if isinstance(layer, layers.Dropout)]
    # shared (2 calls) + the relu op node; the softmax output is skipped
    assert sorted(added) == sorted(
        ["shared_multidrop", "shared_multidrop_1", f"{_relu_op(model).name}_multidrop"]
    )
    assert len(added) == len(multidrop.plan(model, 0.5)) == 3
    assert_identical(model(X, training=False), rewired(X, training=False))
    assert not np.array_equal(
        to_numpy(rewired(X, training=True)), to_numpy(model(X, training=True))
    )


def _relu_op(model):
    return next(op for op in model.operations if type(op).__name__ == "ReLU")


def test_original_is_untouched_after_training_the_clone():
    model = mlp_with_ops()
    before = snapshot(model)
    rewired = multidrop.insert_dropout(model, 0.3)
    train_one_step(rewired, X, np.ones((4, 3), "float32"))
    assert_snapshot_equal(before, snapshot(model))
    assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), rewired.get_weights()))


def test_shared_layer_stays_one_layer_called_twice():
    rewired = multidrop.insert_dropout(mlp_with_ops(), 0.3)
    shared = rewired.get_layer("shared")
    assert len(shared._inbound_nodes) == 2
    assert [layer.name for layer in rewired.layers].count("shared") == 1


def test_share_weights_shares_variables_and_copy_does_not():
    model = mlp_with_ops()
    copied = multidrop.insert_dropout(model, 0.3)
    shared = multidrop.insert_dropout(model, 0.3, share_weights=True)
    assert not {id(v) for v in copied.weights} & {id(v) for v in model.weights}
    assert [id(v) for v in shared.weights] == [id(v) for v in model.weights]


def test_sequential_comes_back_sequential():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            layers.Dense(16, activation="relu"),
            layers.Dense(16),
            layers.ReLU(),
            layers.Dense(2),
        ],
        name="seq",
    )
    rewired = multidrop.insert_dropout(model, 0.2)
    assert isinstance(rewired, keras.Sequential) and rewired.name == "seq"
    kinds = [type(layer).__name__ for layer in rewired.layers]
    assert kinds == ["Dense", "Dropout", "Dense", "ReLU", "Dropout", "Dense"]
    assert_identical(model(X, training=False), rewired(X, training=False))


def test_nested_models_stay_nested_with_names_and_trainable_flags():
    model = with_nested()
    rewired = multidrop.insert_dropout(model, 0.2)
    assert [layer.name for layer in rewired.layers if isinstance(layer, keras.Model)] == [
        "seq_block",
        "fn_block",
    ]
    assert isinstance(rewired.get_layer("seq_block"), keras.Sequential)
    assert not rewired.get_layer("seq_block").trainable
    assert [type(layer).__name__ for layer in rewired.get_layer("seq_block").layers] == [
        "Dense",
        "Dropout",
        "BatchNormalization",
    ]
    assert [(v.path, v.trainable) for v in rewired.weights] == [
        (v.path, v.trainable) for v in model.weights
    ]
    assert len(rewired.trainable_weights) == len(model.trainable_weights)
    assert_identical(model(X, training=False), rewired(X, training=False))


def test_layer_trainable_flag_inside_a_trainable_model_is_kept():
    model = mlp_with_ops()
    model.get_layer("fc2").trainable = False
    rewired = multidrop.insert_dropout(model, 0.2)
    assert not rewired.get_layer("fc2").trainable
    assert rewired.trainable and rewired.get_layer("fc3").trainable


def test_recursive_false_leaves_nested_models_alone():
    plan = multidrop.plan(with_nested(), 0.2, recursive=False)
    assert [site.qualname for site in plan] == ["head"]


def test_inputs_outputs_names_and_structure_kept():
    model = two_heads()
    rewired = multidrop.insert_dropout(model, 0.2)
    assert rewired.output_names == model.output_names
    assert [t.name for t in rewired.inputs] == [t.name for t in model.inputs]
    x = {"a": X, "b": X[:, :4]}
    out = rewired(x, training=False)
    assert set(out) == {"score", "label"}
    assert_identical(model(x, training=False), out)
    rewired.compile(optimizer="sgd", loss={"score": "mse", "label": "categorical_crossentropy"})
    rewired.train_on_batch(x, {"score": np.zeros((4, 1)), "label": np.eye(2)[[0, 1, 0, 1]]})


def test_include_outputs_puts_dropout_after_outputs_and_keeps_output_names():
    model = mlp_with_ops()
    plan = multidrop.plan(model, 0.2, include_outputs=True)
    assert plan[-1].qualname == "probs"
    rewired = multidrop.insert_dropout(model, 0.2, include_outputs=True)
    assert rewired.output_names == ["probs"]
    assert_identical(model(X, training=False), rewired(X, training=False))


def test_rate_dict_and_callable():
    model = mlp_with_ops()
    plan = multidrop.plan(model, {"fc2": 0.5, "fc3": 0.1}, where=["fc2", "fc3"])
    assert [(s.qualname, s.rate) for s in plan] == [("fc2", 0.5), ("fc3", 0.1)]
    plan = multidrop.plan(model, lambda layer: 0.4 if layer.name == "shared" else None)
    assert [(s.qualname, s.rate) for s in plan] == [("shared", 0.4), ("shared", 0.4)]


def test_where_forms():
    model = mlp_with_ops()
    assert [s.qualname for s in multidrop.plan(model, 0.1, where=layers.Add)] == ["add"]
    assert [s.qualname for s in multidrop.plan(model, 0.1, where=(layers.Add, layers.Dense))] == [
        "shared",
        "fc2",
        "fc3",
        "shared",
        "add",
    ]
    fc = multidrop.plan(model, 0.1, where=lambda layer: layer.name.startswith("fc"))
    assert [s.qualname for s in fc] == ["fc2", "fc3"]
    last = multidrop.plan(model, 0.1, where=select.activations() & select.last(1))
    assert [(s.qualname, s.call.index) for s in last] == [("shared", 1)]
    assert [
        s.qualname for s in multidrop.plan(model, 0.1, where=select.regex("^fc") | layers.Add)
    ] == ["fc2", "fc3", "add"]
    not_act = multidrop.plan(model, 0.1, where=~select.activations() & select.layers(layers.Dense))
    assert [s.qualname for s in not_act] == ["fc2", "fc3"]


@pytest.mark.parametrize(
    ("kind", "shape", "expected"),
    [
        ("spatial", (6, 6, 3), "SpatialDropout2D"),
        ("spatial", (6, 3), "SpatialDropout1D"),
        ("spatial", (4, 4, 4, 3), "SpatialDropout3D"),
        ("auto", (6, 6, 3), "SpatialDropout2D"),
        ("gaussian", (6, 6, 3), "GaussianDropout"),
        ("alpha", (6, 6, 3), "AlphaDropout"),
    ],
)
def test_kinds(kind, shape, expected):
    x = keras.Input(shape)
    h = layers.Activation("relu", name="act")(x)
    model = keras.Model(x, layers.Dense(2, name="out")(h))
    rewired = multidrop.insert_dropout(model, 0.2, kind=kind)
    assert type(rewired.get_layer("act_multidrop")).__name__ == expected
    data = np.random.default_rng(1).normal(size=(2, *shape)).astype("float32")
    assert_identical(model(data, training=False), rewired(data, training=False))


def test_auto_kind_is_alpha_after_selu_and_plain_on_vectors():
    x = keras.Input((8,))
    h = layers.Dense(8, activation="selu", name="s")(x)
    h = layers.Dense(8, activation="relu", name="r")(h)
    plan = multidrop.plan(keras.Model(x, layers.Dense(1)(h)), 0.1, kind="auto")
    assert [s.kind for s in plan] == ["AlphaDropout", "Dropout"]


def test_callable_kind_and_noise_shape():
    model = mlp_with_ops()
    rewired = multidrop.insert_dropout(
        model, 0.3, kind=lambda rate, layer: layers.GaussianNoise(rate)
    )
    assert isinstance(rewired.get_layer("shared_multidrop"), layers.GaussianNoise)
    # noise_shape=(1, features): every row of the batch loses the same units
    x = keras.Input((64,))
    base = keras.Model(x, layers.Dense(1)(layers.Activation("relu", name="act")(x)))
    rewired = multidrop.insert_dropout(base, 0.5, where=["act"], noise_shape=(1, 64), seed=3)
    probe = keras.Model(rewired.input, rewired.get_layer("act_multidrop").output)
    dropped = to_numpy(probe(np.ones((5, 64), "float32"), training=True)) == 0
    assert dropped.any() and (dropped == dropped[0]).all()


def test_seed_makes_masks_reproducible_and_differ_between_sites():
    model = mlp_with_ops()
    a = multidrop.insert_dropout(model, 0.5, seed=7)
    b = multidrop.insert_dropout(model, 0.5, seed=7)
    assert_identical(a(X, training=True), b(X, training=True))
    assert [s.seed for s in multidrop.plan(model, 0.5, seed=7)] == [7, 8, 9]


def test_mc_dropout_is_on_at_inference_and_round_trips(tmp_path):
    model = mlp_with_ops()
    rewired = multidrop.insert_dropout(model, 0.5, mc=True, seed=1)
    first, second = to_numpy(rewired(X, training=False)), to_numpy(rewired(X, training=False))
    assert not np.array_equal(first, second)
    rewired.save(tmp_path / "mc.keras")
    loaded = keras.saving.load_model(tmp_path / "mc.keras")
    assert not np.array_equal(to_numpy(loaded(X)), to_numpy(loaded(X)))
    assert_identical(model(X), multidrop.remove_dropout(loaded)(X))


def test_keras_round_trip_loads_with_plain_keras(tmp_path):
    model = two_heads()
    rewired = multidrop.insert_dropout(model, 0.2)
    rewired.save(tmp_path / "r.keras")
    x = {"a": X, "b": X[:, :4]}
    script = (
        "import sys, keras, numpy as np; "
        "m = keras.saving.load_model(sys.argv[1]); "
        "x = {'a': np.load(sys.argv[2]), 'b': np.load(sys.argv[2])[:, :4]}; "
        "print(sorted(type(l).__module__.split('.')[0] for l in m.layers)[-1]); "
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(x)['label']))"
    )
    np.save(tmp_path / "x.npy", X)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            tmp_path / "r.keras",
            tmp_path / "x.npy",
            tmp_path / "y.npy",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split()[-1] == "keras"  # only built-in Keras layers, no multidrop import
    assert "multidrop" not in result.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), to_numpy(model(x, training=False)["label"]))


def test_remove_dropout_restores_the_layer_list_and_keeps_user_dropout(tmp_path):
    x = keras.Input((8,), name="x")
    h = layers.Dropout(0.5, name="mine")(layers.Dense(8, activation="relu", name="fc")(x))
    model = keras.Model(x, layers.Dense(2, name="out")(h), name="user")
    rewired = multidrop.insert_dropout(model, 0.3)
    rewired.save(tmp_path / "r.keras")
    for source in (rewired, keras.saving.load_model(tmp_path / "r.keras")):
        restored = multidrop.remove_dropout(source)
        assert [layer.name for layer in restored.layers] == [layer.name for layer in model.layers]
        assert_identical(model(X, training=False), restored(X, training=False))
    everything = multidrop.remove_dropout(rewired, all=True)
    assert not [layer for layer in everything.layers if isinstance(layer, layers.Dropout)]
    with pytest.raises(ValueError, match="no dropout layers added by multidrop"):
        multidrop.remove_dropout(model)


def test_frozen_nested_call_with_training_false_is_skipped_and_said():
    backbone = keras.Sequential(
        [keras.Input((8,)), layers.Dense(8, activation="relu", name="b1")], name="bb"
    )
    x = keras.Input((8,))
    h = layers.Dense(4, activation="relu", name="head")(backbone(x, training=False))
    model = keras.Model(x, layers.Dense(1, name="out")(h))
    plan = multidrop.plan(model, 0.2)
    assert [s.qualname for s in plan] == ["head"]
    assert "training=False" in str(plan)
    with pytest.raises(ValueError, match="called with training=False"):
        multidrop.plan(model, 0.2, where=["b1"])
    assert [s.qualname for s in multidrop.plan(model, 0.2, mc=True)] == ["bb/b1", "head"]


def test_plan_table_and_errors_are_clear():
    model = mlp_with_ops()
    text = str(multidrop.plan(model, 0.25))
    assert "3 dropout layers" in text and "shared_multidrop_1" in text and "0.25" in text
    with pytest.raises(ValueError, match="rate"):
        multidrop.plan(model, 1.0)
    with pytest.raises(ValueError, match=r"'nope'.*Valid kinds"):
        multidrop.plan(model, 0.1, kind="nope")
    with pytest.raises(ValueError, match=r"No layer named 'fc9'.*'fc2'"):
        multidrop.plan(model, 0.1, where=["fc9"])
    with pytest.raises(ValueError, match="matched no site"):
        multidrop.plan(model, 0.1, where=layers.Conv2D)
    with pytest.raises(ValueError, match=r"noise_shape.*rank"):
        multidrop.plan(model, 0.1, noise_shape=(1, 1, 16))
    with pytest.raises(TypeError, match=r"keras.Model"):
        multidrop.insert_dropout("model.keras", 0.1)


def test_importing_multidrop_selects_torch_unless_told_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    assert importlib.util.find_spec("torch"), "the test environment installs every backend"
    code = "import multidrop, keras; print(keras.backend.backend())"
    default = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    explicit = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "KERAS_BACKEND": "numpy"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert default.stdout.split()[-1] == "torch"
    assert explicit.stdout.split()[-1] == "numpy"


def test_cli_plan_and_insert(tmp_path, capsys):
    from multidrop import cli

    model = mlp_with_ops()
    model.save(tmp_path / "m.keras")
    assert cli.main(["plan", str(tmp_path / "m.keras"), "--rate", "0.2"]) == 0
    assert "3 dropout layers" in capsys.readouterr().out
    out = tmp_path / "out.keras"
    assert (
        cli.main(
            [
                "insert",
                str(tmp_path / "m.keras"),
                "-o",
                str(out),
                "--rate",
                "fc2=0.5",
                "--where",
                "fc2",
            ]
        )
        == 0
    )
    rewired = keras.saving.load_model(out)
    assert rewired.get_layer("fc2_multidrop").rate == 0.5
    assert cli.main(["plan", str(tmp_path / "missing.keras")]) == 2
    assert "no such model file" in capsys.readouterr().err


def test_cli_set_writes_the_layers_own_rates(tmp_path, capsys):
    from multidrop import cli

    x = keras.Input((5, 3))
    h = layers.LSTM(4, dropout=0.1, name="lstm")(x)
    model = keras.Model(x, layers.Dense(2, name="out")(layers.Dropout(0.5, name="drop")(h)))
    model.save(tmp_path / "m.keras")
    out = tmp_path / "out.keras"
    args = ["set", str(tmp_path / "m.keras"), "-o", str(out), "--rate", "0.3"]
    assert cli.main([*args, "--fields", "recurrent_dropout"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "recurrent_dropout" in printed and "fused LSTM" in printed  # the kernel switch is named
    changed = keras.saving.load_model(out)
    assert changed.get_layer("lstm").recurrent_dropout == 0.3
    assert changed.get_layer("lstm").dropout == 0.1 and changed.get_layer("drop").rate == 0.5
    assert cli.main([*args, "--fields", "nope"]) == 2
    assert "no layer with a dropout-rate field named ['nope']" in capsys.readouterr().err
