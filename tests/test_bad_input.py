"""Bad input, as a table: each malformed call gets the exception a Python user expects, a
message that names the problem, and leaves the input model exactly as it was.

The command line gets the same treatment for broken files: exit status 2, one line on
stderr, no traceback, nothing written.
"""

import hashlib
import re
import zipfile

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot
from keras import layers

import multidrop
from multidrop import cli, select

X = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")


def mlp():
    """fc1 (relu) -> fc2 (relu) -> probs (softmax output)."""
    x = keras.Input((8,), name="features")
    h = layers.Dense(8, activation="relu", name="fc1")(x)
    h = layers.Dense(8, activation="relu", name="fc2")(h)
    return keras.Model(x, layers.Dense(3, activation="softmax", name="probs")(h), name="mlp")


def unbuilt():
    return keras.Sequential([layers.Dense(8, activation="relu"), layers.Dense(2)], name="unbuilt")


def subclassed():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.fc = layers.Dense(2, activation="relu")

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(X)
    return net


def frozen_backbone():
    """A nested model called with training=False: its sites are never active."""
    backbone = keras.Sequential(
        [keras.Input((8,)), layers.Dense(8, activation="relu", name="b1")], name="bb"
    )
    x = keras.Input((8,))
    return keras.Model(x, layers.Dense(2, name="out")(backbone(x, training=False)), name="frozen")


insert = multidrop.insert_dropout


def case(name, make, call, error, message):
    """One row: the input model's factory (None: no model), the call, what it must raise."""
    return pytest.param(make, call, error, message, id=name)


# fmt: off
CASES = [
    case("model-none", None, lambda m: insert(None, 0.2),
         TypeError, r"`model` must be a keras\.Model, got NoneType"),
    case("model-path", None, lambda m: insert("model.keras", 0.2),
         TypeError, r"got str.*keras\.saving\.load_model"),
    case("model-layer", lambda: layers.Dense(3), lambda m: insert(m, 0.2),
         TypeError, r"must be a keras\.Model, got Dense"),
    case("subclassed-unbuilt", lambda: type(subclassed())(), lambda m: insert(m, 0.2),
         ValueError, r"Subclassed model 'net' \(Net\) is not built.*model\(x\)"),
    case("unbuilt-sequential", unbuilt, lambda m: insert(m, 0.2),
         ValueError, r"'unbuilt' is not built.*keras\.Input\(shape=\.\.\.\)"),
    case("rate-bool", mlp, lambda m: insert(m, True),
         ValueError, r"rate must be a float in \[0, 1\), got True"),
    case("rate-negative", mlp, lambda m: insert(m, -0.1),
         ValueError, r"rate must be a float in \[0, 1\), got -0\.1"),
    case("rate-one", mlp, lambda m: insert(m, 1.0),
         ValueError, r"rate must be a float in \[0, 1\), got 1\.0"),
    case("rate-nan", mlp, lambda m: insert(m, float("nan")),
         ValueError, r"rate must be a float in \[0, 1\), got nan"),
    case("rate-str", mlp, lambda m: insert(m, "0.2"),
         ValueError, r"rate must be a float in \[0, 1\), got '0\.2'"),
    case("rate-empty-dict", mlp, lambda m: insert(m, {}),
         ValueError, r"rate=\{\} names no layer"),
    case("rate-dict-int-key", mlp, lambda m: insert(m, {0: 0.5}),
         TypeError, r"rate dict keys must be layer names \(str\), got 0"),
    case("rate-dict-unknown", mlp, lambda m: insert(m, {"fc3": 0.5}),
         ValueError, r"No layer named 'fc3' in model 'mlp'\. Did you mean 'fc\d' or 'fc\d'"),
    case("rate-dict-unselected", mlp, lambda m: insert(m, {"fc2": 0.5}, where=["fc1"]),
         ValueError, r"rate names \['fc2'\], which where=select\.names\('fc1'\) does not select"),
    case("rate-callable-bad", mlp, lambda m: insert(m, lambda layer: 1.5),
         ValueError, r"got 1\.5 for site 'fc1'"),
    case("rate-callable-none", mlp, lambda m: insert(m, lambda layer: None),
         ValueError, r"rate returned None for all 2 sites"),
    case("kind-unknown", mlp, lambda m: insert(m, 0.2, kind="gauss"),
         ValueError, r"Unknown dropout kind='gauss'\. Valid kinds: 'dropout', 'spatial'"),
    case("kind-class", mlp, lambda m: insert(m, 0.2, kind=layers.GaussianDropout),
         TypeError, r"kind=GaussianDropout is a layer class.*"
                    r"kind=lambda rate, layer: keras\.layers\.GaussianDropout\(rate\)"),
    case("kind-layer-object", mlp, lambda m: insert(m, 0.2, kind=layers.Dropout(0.1)),
         TypeError, r"kind=Dropout\(\) is a layer object"),
    case("kind-returns-non-layer", mlp, lambda m: insert(m, 0.2, kind=lambda rate, layer: rate),
         TypeError, r"kind callable must return a keras\.layers\.Layer, got float for site 'fc1'"),
    case("kind-returns-model-layer", mlp, lambda m: insert(m, 0.2, kind=lambda rate, layer: layer),
         TypeError, r"returned Dense 'fc1' for site 'fc1', a layer already in use"),
    case("kind-spatial-on-vectors", mlp, lambda m: insert(m, 0.2, kind="spatial"),
         ValueError, r"kind='spatial' needs a feature map of rank 3, 4 or 5.*'fc1' has shape"),
    case("noise-shape-rank", mlp, lambda m: insert(m, 0.2, noise_shape=(None, 1, 8)),
         ValueError, r"noise_shape=\(None, 1, 8\) has rank 3, but site 'fc1' has shape"),
    case("noise-shape-size", mlp, lambda m: insert(m, 0.2, noise_shape=(None, 3)),
         ValueError, r"noise_shape=\(None, 3\) does not fit site 'fc1'.*axis 1"),
    case("noise-shape-int", mlp, lambda m: insert(m, 0.2, noise_shape=8),
         TypeError, r"noise_shape must be a tuple"),
    case("noise-shape-gaussian", mlp, lambda m: insert(m, 0.2, kind="gaussian", noise_shape=(1, 8)),
         ValueError, r"noise_shape is not supported by GaussianDropout"),
    case("where-bare-name", mlp, lambda m: insert(m, 0.2, where="fc1"),
         ValueError, r"where='fc1' is not a selector.*where=\['fc1'\]"),
    case("where-empty-list", mlp, lambda m: insert(m, 0.2, where=[]),
         TypeError, r"non-empty list of layer names.*got \[\]"),
    case("where-unknown-name", mlp, lambda m: insert(m, 0.2, where=["fc_1"]),
         ValueError, r"No layer named 'fc_1' in model 'mlp'\. Did you mean 'fc1'"),
    case("where-output", mlp, lambda m: insert(m, 0.2, where=["probs"]),
         ValueError, r"Cannot put dropout after layer 'probs': it produces a model output; "
                     r"pass include_outputs=True"),
    case("where-matches-nothing", mlp, lambda m: insert(m, 0.2, where=layers.Conv2D),
         ValueError, r"where=select\.layers\(Conv2D\) matched no site in model 'mlp'"),
    case("where-empty-selection", mlp,
         lambda m: insert(m, 0.2, where=select.activations() & ~select.activations()),
         ValueError, r"matched no site.*where=\['fc1', 'fc2'\]"),
    case("where-bad-regex", mlp, lambda m: insert(m, 0.2, where=select.regex("fc(")),
         ValueError, r"select\.regex\('fc\('\) is not a regular expression"),
    case("where-inert-site", frozen_backbone, lambda m: insert(m, 0.2, where=["b1"]),
         ValueError, r"after layer 'b1': model 'bb' is called with training=False.*mc=True"),
    case("select-first-zero", None, lambda m: select.first(0),
         ValueError, r"n of select\.first\(n\) must be a positive int, got 0"),
    case("select-layers-str", None, lambda m: select.layers("Dense"),
         TypeError, r"select\.layers\(\) takes layer classes"),
    case("seed-float", mlp, lambda m: insert(m, 0.2, seed=0.5),
         TypeError, r"seed must be an int or None, got 0\.5"),
    case("remove-nothing-added", mlp, lambda m: multidrop.remove_dropout(m),
         ValueError, r"'mlp' has no dropout layers added by multidrop.*all=True"),
    case("remove-not-a-model", None, lambda m: multidrop.remove_dropout(X),
         TypeError, r"must be a keras\.Model, got ndarray"),
]
# fmt: on


@pytest.mark.parametrize("make, call, error, message", CASES)
def test_bad_call_is_refused_clearly(make, call, error, message):
    model = make() if make else None
    before = snapshot(model) if model is not None else None
    with pytest.raises(error, match=message) as raised:
        call(model)
    assert type(raised.value) is error
    if model is not None:
        assert_snapshot_equal(before, snapshot(model))


# ----------------------------------------------------------------- layers that cannot be cloned


def lambda_closure():
    """A Lambda over a Python closure: Keras saves the function by name, so it cannot be rebuilt."""
    factor = 2.0

    def scale(t):
        return t * factor

    x = keras.Input((8,))
    h = layers.Lambda(scale, name="scale")(layers.Dense(8, activation="relu", name="fc1")(x))
    return keras.Model(x, layers.Dense(2, name="out")(h))


class Gain(layers.Layer):
    """A custom layer without get_config, whose __init__ takes an object Keras cannot serialize."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = table

    def call(self, x):
        return x * self.table["gain"]


def custom_without_config():
    x = keras.Input((8,))
    h = Gain({"gain": np.float32(3.0)}, name="gain")(
        layers.Dense(8, activation="relu", name="fc1")(x)
    )
    return keras.Model(x, layers.Dense(2, name="out")(h))


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(lambda_closure, r"cannot clone Lambda 'scale'", id="lambda-closure"),
        pytest.param(
            custom_without_config,
            r"cannot clone Gain 'gain'.*get_config",
            id="custom-no-get-config",
        ),
    ],
)
def test_uncloneable_layer_names_itself_and_the_way_out(make, message):
    model = make()
    before = _state(model)
    with pytest.raises(
        TypeError, match=r"(?s)" + message + r".*register_keras_serializable.*share_weights=True"
    ):
        multidrop.insert_dropout(model, 0.2)
    assert _state(model) == before
    rewired = multidrop.insert_dropout(model, 0.2, share_weights=True)  # the way out works
    assert [layer.name for layer in rewired.layers].count("fc1_multidrop") == 1
    assert_identical(model(X, training=False), rewired(X, training=False))
    assert _state(model) == before


def _state(model):
    """`snapshot` without the config, which a model holding Gain cannot give (get_config raises)."""
    return {
        "names": [
            (layer.name, type(layer).__name__, layer.trainable) for layer in model._flatten_layers()
        ],
        "weights": [w.tobytes() for w in model.get_weights()],
        "variables": [(v.path, v.trainable) for v in model.weights],
    }


# ----------------------------------------------------------------- the command line


def _layer_archive(path, good_file):
    """A .keras archive that loads, but as a ReLU layer rather than a model."""
    layer = '{"module": "keras.layers", "class_name": "ReLU", "config": {"name": "relu"}}'
    with zipfile.ZipFile(good_file) as source, zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, layer if name == "config.json" else source.read(name))


FILES = {
    "missing": (None, r"no such model file: .*missing\.keras"),
    "wrong-suffix": (lambda p: p.write_bytes(b"x"), r"model\.h5 is not a \.keras file"),
    "garbage": (
        lambda p: p.write_bytes(b"not a zip archive"),
        r"is not a \.keras archive \(not a zip file\)",
    ),
    "empty": (lambda p: p.write_bytes(b""), r"is not a \.keras archive"),
    "truncated": ("truncated", r"is not a \.keras archive"),
    "zip-without-model": (
        lambda p: zipfile.ZipFile(p, "w").close(),
        r"cannot load .* as a Keras model",
    ),
    "layer-not-model": ("layer", r"`model` must be a keras\.Model, got ReLU"),
    "subclassed-unregistered": (
        "subclassed",
        r"cannot load .* as a Keras model: Could not locate class 'Net'.*--import",
    ),
}


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mlp.keras"
    mlp().save(path)
    return path


@pytest.mark.parametrize("command", ["plan", "insert"])
@pytest.mark.parametrize("name", list(FILES))
def test_cli_refuses_a_broken_file_in_one_line(name, command, good_file, tmp_path, capsys):
    make, message = FILES[name]
    path = tmp_path / ("model.h5" if name == "wrong-suffix" else f"{name}.keras")
    if make == "truncated":
        path.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    elif make == "layer":
        _layer_archive(path, good_file)
    elif make == "subclassed":
        subclassed().save(path)
    elif make is not None:
        make(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    out = tmp_path / "out.keras"
    argv = [command, str(path), "--rate", "0.2"] + ["-o", str(out)] * (command == "insert")
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"multidrop {command}: error: ")
    assert re.search(message, captured.err), captured.err
    assert not out.exists()
    assert digest == (hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--rate", "1.5"], r"rate must be a float in \[0, 1\), got 1\.5"),
        (["--rate", "fc1:0.5"], r"--rate 'fc1:0\.5' is neither a number nor name=rate pairs"),
        (["--where", "re:fc("], r"is not a regular expression"),
        (["--where", "fc9"], r"No layer named 'fc9'"),
        (["--kind", "spatial"], r"kind='spatial' needs a feature map"),
        (["-o", "/nonexistent-folder/out.keras"], r"cannot write /nonexistent-folder/out\.keras"),
    ],
    ids=["rate", "rate-pairs", "regex", "name", "kind", "unwritable-output"],
)
def test_cli_refuses_bad_options_in_one_line(options, message, good_file, tmp_path, capsys):
    digest = hashlib.sha256(good_file.read_bytes()).hexdigest()
    output = [] if "-o" in options else ["-o", str(tmp_path / "out.keras")]
    assert cli.main(["insert", str(good_file), *output, *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out.keras").exists()
    assert hashlib.sha256(good_file.read_bytes()).hexdigest() == digest
