"""Every Keras model, edited from the inside: subclassed models, custom layers, keras-hub blocks.

Each model of the corpus (tests/corpus.py) goes through the whole life of an edit:
plan, insertion inside its call(), bitwise inference, dropout active in training, the
.keras round trip with the edit kept, Monte Carlo with BatchNormalization left alone,
a training step that leaves the original untouched, and remove_dropout back to the
original, bitwise.
"""

import pathlib
import warnings

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy
from corpus import FACTORIES, MLP, register
from keras import layers

import multidrop
from multidrop import _keras, graph, probe, select
from multidrop.layers import Then
from multidrop.plan import is_added_name


def inside(site) -> bool:
    """The site is in a call(): edited by surgery, not by the graph rebuild."""
    return isinstance(site.call.node, probe.ProbeNode) or graph.within(site.call.node) is not None


def thens(model) -> list:
    return [layer for layer in _keras.all_layers(model) if isinstance(layer, Then)]


def added(model) -> list[str]:
    return [layer.name for layer in _keras.all_layers(model) if is_added_name(layer.name)]


def bn_state(model) -> list:
    return [
        np.array(v)
        for layer in _keras.all_layers(model)
        if isinstance(layer, layers.BatchNormalization)
        for v in layer.non_trainable_weights
    ]


def load(path):
    """keras.saving.load_model, quiet about what Keras warns of for the original model's
    file too: keras-io's layers have no build(), keras-hub's tasks a custom compile()."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have a `build\(\)` method")
        warnings.filterwarnings("ignore", message=r".*model's `compile\(\)` method is custom")
        return keras.saving.load_model(path)


def train_step(model, x, seed=0):
    """One fit step on targets shaped like the model's outputs."""
    y = keras.tree.map_structure(
        lambda t: np.random.default_rng(seed).normal(size=t.shape).astype("float32"),
        to_numpy(model(x, training=False)),
    )
    # One eager step: no compile (on JAX, XLA's would cost more than the step).
    model.compile(optimizer="sgd", loss="mse", metrics=[], jit_compile=False)
    model.fit(x, y, epochs=1, batch_size=len(keras.tree.flatten(x)[0]), shuffle=False, verbose=0)


# Where the default would also edit a keras-hub task's graph (its backbone's pooler), which
# rebuilds it as a Functional: here only the blocks' insides, so that the class is kept.
WHERE = {"bert_classifier": select.activations() & select.regex("transformer_layer")}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_edited_from_the_inside(name, tmp_path):
    model, x = FACTORIES[name]()
    before = snapshot(model)
    expected = model(x, training=False)
    where = WHERE.get(name, "activations")

    plan = multidrop.plan(model, 0.5, where=where, seed=1)
    assert any(inside(site) for site in plan), f"no site inside a call() of {name}"
    rewired = multidrop.insert_dropout(model, 0.5, where=where, seed=1)
    assert isinstance(rewired, type(model))
    assert len(thens(rewired)) == sum(isinstance(s.call.node, probe.ProbeNode) for s in plan)
    # Every site got its layer: wrapped sublayers and graphs called inside a call() alike.
    assert sorted(added(rewired)) == sorted(site.name for site in plan)
    assert_identical(rewired(x, training=False), expected)
    multidrop.verify(model, rewired, x).raise_on_mismatch()

    # Nothing else lost: names, weights and trainable flags of every original layer.
    names = {layer.name for layer in _keras.all_layers(rewired)}
    assert {layer.name for layer in _keras.all_layers(model)} <= names
    assert [w.trainable for w in rewired.weights] == [w.trainable for w in model.weights]
    for a, b in zip(rewired.get_weights(), model.get_weights()):
        assert np.array_equal(a, b)

    # Saving keeps the edit: the file loads back with it (classes registered, multidrop imported).
    rewired.save(tmp_path / "rewired.keras")
    loaded = load(tmp_path / "rewired.keras")
    assert isinstance(loaded, type(model)) and sorted(added(loaded)) == sorted(added(rewired))
    assert_identical(loaded(x, training=False), expected)

    # Monte Carlo: samples spread, BatchNormalization statistics unchanged.
    bn = bn_state(rewired)
    _, std = multidrop.mc_predict(rewired, x, samples=4, seed=0)
    assert max(float(np.max(s)) for s in keras.tree.flatten(std)) > 0
    assert all(np.array_equal(a, b) for a, b in zip(bn, bn_state(rewired)))

    # remove_dropout puts the original sublayers back: bitwise, same class, no wrapper left.
    restored = multidrop.remove_dropout(rewired)
    assert type(restored) is type(model) and not thens(restored) and not added(restored)
    assert_identical(restored(x, training=False), expected)

    # Dropout is active in training: two training calls differ (BatchNormalization's
    # moving averages move too, hence last but one).
    first, second = to_numpy(rewired(x, training=True)), to_numpy(rewired(x, training=True))
    assert any(not np.array_equal(a, b) for a, b in zip(*map(keras.tree.flatten, (first, second))))

    # The copy trains; the original stays exactly as it was.
    train_step(rewired, x)
    assert_snapshot_equal(before, snapshot(model))
    assert_identical(model(x, training=False), expected)


def test_a_wrapped_sublayer_drops_at_the_rate_asked():
    model, x = FACTORIES["mlp"]()
    rewired = multidrop.insert_dropout(model, 0.3, where=select.first(1), seed=3)
    wrapper = rewired.linear_1
    assert isinstance(wrapper, Then) and wrapper.layer.name == model.linear_1.name
    many = np.repeat(x, 500, axis=0)
    h = to_numpy(wrapper(many, training=True))
    plain = to_numpy(model.linear_1(many))
    live = plain != 0  # relu zeros are not dropout's
    zeros = np.count_nonzero((h == 0) & live)
    n = np.count_nonzero(live)
    assert abs(zeros - 0.3 * n) < 3 * np.sqrt(n * 0.3 * 0.7)
    kept = live & (h != 0)
    np.testing.assert_allclose(h[kept], plain[kept] / 0.7, rtol=1e-5)


def test_stochastic_depth_on_every_bert_block():
    model, x = FACTORIES["bert"]()
    where = select.residual_branches()
    plan = multidrop.plan(model, 0.3, where=where, kind="stochastic_depth")
    branches = [s.qualname for s in plan]
    assert branches == [
        f"transformer_layer_{i}/{part}_dropout"
        for i in range(2)
        for part in ("self_attention", "feedforward")
    ]
    deep = multidrop.insert_dropout(model, 0.3, where=where, kind="stochastic_depth", seed=0)
    assert isinstance(deep, type(model))
    assert_identical(deep(x, training=False), model(x, training=False))

    # Count whole-sample drops at every inserted layer over many training calls.
    dropped, seen = 0, 0

    def around(layer, args, kwargs, proceed):
        nonlocal dropped, seen
        out = proceed()
        if is_added_name(layer.name):
            values = to_numpy(out).reshape(len(to_numpy(out)), -1)
            inputs = to_numpy(args[0]).reshape(len(values), -1)
            dropped += int(np.sum(~values.any(axis=1) & inputs.any(axis=1)))
            seen += len(values)
        return out

    with _keras.intercepting_calls(around):
        for _ in range(25):
            deep(x, training=True)
    expected, sd = 0.3 * seen, np.sqrt(seen * 0.3 * 0.7)
    assert seen == 25 * 4 * len(branches)
    assert abs(dropped - expected) < 3 * sd, (dropped, expected, sd)
    train_step(deep, x)


def test_set_dropout_inside_a_call():
    @register
    class Regularized(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = layers.Dense(8, activation="relu")
            self.drop = layers.Dropout(0.1)
            self.out = layers.Dense(2)

        def call(self, x, training=None):
            return self.out(self.drop(self.hidden(x), training=training))

    model = Regularized()
    x = np.ones((2, 4), "float32")
    model(x)
    print(multidrop.set_plan(model, 0.4))
    tuned = multidrop.set_dropout(model, 0.4)
    assert isinstance(tuned, Regularized) and tuned.drop.rate == 0.4 and model.drop.rate == 0.1
    assert_identical(tuned(x, training=False), model(x, training=False))


def test_a_sublayer_called_twice_is_one_site_after_every_call():
    model, _ = FACTORIES["heads"]()
    plan = multidrop.plan(model, 0.2, where=select.regex("heads/"))
    shared = [s for s in plan if s.call.node.calls == 2]
    assert len(shared) == 1 and "(all 2 calls)" in str(plan)


class Fresh(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc = layers.Dense(4, activation="relu")

    def call(self, x):
        return layers.Dense(2, name="fresh")(self.fc(x))  # a new layer on every call


class Tied(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a, self.b = MLPHolder(name="a"), MLPHolder(name="b")
        self.b.fc = self.a.fc  # one Dense held by two blocks

    def call(self, x):
        return self.b(self.a(x))


class MLPHolder(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc = layers.Dense(4, activation="relu", name=f"fc_{self.name}")

    def build(self, shape):
        if not self.fc.built:
            self.fc.build(shape)

    def call(self, x):
        return self.fc(x)


class Lookup(keras.Model):
    """Its call() takes integer ids: random floats cannot be read with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = layers.Embedding(10, 4)
        self.fc = layers.Dense(4, activation="relu")
        self.out = layers.Dense(2)

    def call(self, ids):
        if "int" not in keras.backend.standardize_dtype(ids.dtype):
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        return self.out(self.fc(self.table(ids)))


class Opaque(keras.Model):
    """Its __init__ takes an object Keras cannot serialize, and it has no get_config."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.fc = layers.Dense(4, activation="relu")

    def call(self, x):
        return self.fc(x) * self.scale.value


class Box:
    value = 2.0


def built(model, x):
    model(x)
    return model


X4 = np.ones((2, 4), "float32")


@pytest.mark.parametrize(
    "make, call, error, message",
    [
        pytest.param(
            lambda: built(Fresh(), X4),
            lambda m: multidrop.insert_dropout(m, 0.1, where=["fresh"]),
            ValueError,
            r"'fresh'.*made inside call\(\).*create it in __init__",
            id="layer-made-in-call",
        ),
        pytest.param(
            lambda: built(Tied(), X4),
            lambda m: multidrop.insert_dropout(m, 0.1, where=["fc_a"]),
            ValueError,
            r"'fc_a'.*held by 2 layers.*give each layer its own sublayer",
            id="sublayer-under-two-parents",
        ),
        pytest.param(
            lambda: built(Lookup(), np.zeros((2, 3), "int32")),
            lambda m: multidrop.plan(m, 0.1),
            ValueError,
            r"read the structure of its call\(\).*sample=",
            id="call-needs-real-inputs",
        ),
        pytest.param(
            lambda: MLP(),
            lambda m: multidrop.insert_dropout(m, 0.1),
            ValueError,
            r"not built.*model\(x\)",
            id="unbuilt",
        ),
        pytest.param(
            lambda: built(Opaque(Box()), X4),
            lambda m: multidrop.insert_dropout(m, 0.1),
            TypeError,
            r"copies Opaque.*get_config\(\).*register_keras_serializable",
            id="no-usable-get-config",
        ),
        pytest.param(
            lambda: FACTORIES["mlp"]()[0],
            lambda m: multidrop.insert_dropout(m, 0.1, where=layers.Conv2D),
            ValueError,
            r"matched no site in model 'mlp",
            id="where-matches-nothing-inside",
        ),
    ],
)
def test_bad_input_inside_a_call(make, call, error, message):
    model = make()
    before = [np.array(w) for w in model.weights], [layer.name for layer in model._flatten_layers()]
    with pytest.raises(error, match=r"(?s)" + message):
        call(model)
    after = [np.array(w) for w in model.weights], [layer.name for layer in model._flatten_layers()]
    assert before[1] == after[1] and all(np.array_equal(a, b) for a, b in zip(before[0], after[0]))


def test_sample_reads_a_call_that_random_floats_cannot():
    model = built(Lookup(), np.zeros((2, 3), "int32"))
    ids = np.array([[1, 2, 3], [4, 5, 6]], "int32")
    rewired = multidrop.insert_dropout(model, 0.2, sample=ids)
    assert_identical(rewired(ids, training=False), model(ids, training=False))


def test_the_command_line_edits_a_saved_subclassed_model(tmp_path, capsys):
    from multidrop import cli

    model, x = FACTORIES["mlp"]()
    model.save(tmp_path / "mlp.keras")
    argv = ["--import", "corpus", "insert", str(tmp_path / "mlp.keras"), "-o"]
    assert cli.main([*argv, str(tmp_path / "out.keras"), "--rate", "0.2"]) == 0
    rewired = load(tmp_path / "out.keras")
    assert isinstance(rewired, MLP) and len(thens(rewired)) == 2
    assert_identical(rewired(x, training=False), model(x, training=False))
    assert cli.main(["--import", "no_such_module", "plan", str(tmp_path / "mlp.keras")]) == 2
    assert "--import no_such_module" in capsys.readouterr().err


@pytest.mark.crossbackend
def test_cross_backend_on_a_saved_subclassed_model(tmp_path, monkeypatch):
    model, x = FACTORIES["seq2seq"]()
    model.save(tmp_path / "seq2seq.keras")
    monkeypatch.setenv("PYTHONPATH", str(pathlib.Path(__file__).parent))  # where corpus lives
    report = multidrop.cross_backend(tmp_path / "seq2seq.keras", x=x, rate=0.2, modules=["corpus"])
    print(report)
    assert report.ok and [r.status for r in report.runs] == ["ok"] * 3


def test_removing_dropout_written_into_a_call_names_set_dropout():
    class Own(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden, self.drop = layers.Dense(4), layers.Dropout(0.2)

        def call(self, x, training=None):
            return self.drop(self.hidden(x), training=training)

    model = Own()
    model(np.ones((2, 3), "float32"))
    with pytest.raises(ValueError, match=r"only inside call\(\).*set_dropout\(model, 0\.0\)"):
        multidrop.remove_dropout(model, all=True)


def test_cross_backend_names_a_module_it_cannot_import(tmp_path):
    with pytest.raises(ImportError, match=r"modules=\('no_such_module',\): .*on PYTHONPATH"):
        multidrop.cross_backend(tmp_path / "m.keras", x=X4, modules=["no_such_module"])
