"""The benchmark's quickest run end to end, and multidrop's own Dropout layer.

On PyTorch, ``insert_dropout`` puts `multidrop.dropout.Dropout` (Keras' Dropout
with a cheaper, sync-free training path) where other backends get
``keras.layers.Dropout``; the semantic tests below hold for both.
"""

import json
import pathlib
import subprocess
import sys
import zipfile

import keras
import matplotlib.image
import numpy as np
import pytest
from conftest import assert_identical

import multidrop
from multidrop.dropout import Dropout

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH = keras.backend.backend() == "torch"


def test_quick_benchmark_writes_table_json_and_chart(tmp_path):
    backend = keras.backend.backend()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--backend",
            backend,
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.strip().splitlines()
    assert table[0].startswith("| model | jit_compile |") and table[2].startswith(
        "| mlp | False | 8 |"
    )
    assert (tmp_path / f"bench_{backend}.md").read_text().strip() == run.stdout.strip()

    results = json.loads((tmp_path / f"bench_{backend}.json").read_text())
    assert results["backend"] == backend and results["settings"]["reps"] == 3
    [row] = results["rows"]
    assert (row["model"], row["mode"], row["sites"]) == ("mlp", "eager", 2)
    twins = {"torch none", "torch dropout"} if TORCH else set()
    assert set(row["variants"]) == {"none", "keras", "multidrop", "multidrop seeded"} | twins
    for stats in row["variants"].values():
        assert len(stats["samples_ms"]) == 3 and all(ms > 0 for ms in stats["samples_ms"])
        assert (
            stats["min_ms"]
            <= stats["q1_ms"]
            <= stats["median_ms"]
            <= stats["q3_ms"]
            <= stats["max_ms"]
        )
    assert set(row["added"]) == {"keras", "multidrop", "multidrop seeded"} | (
        {"native"} if TORCH else set()
    )
    assert row["dropout_elements"] == 8 * 2 * 32  # batch 8, two Dense(32) activations

    image = matplotlib.image.imread(tmp_path / f"bench_{backend}.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_benchmark_rejects_an_unknown_model(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--models", "mlp,vgg", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "unknown ['vgg']" in run.stderr


def test_insert_dropout_uses_the_fast_layer_on_torch_only():
    model = _mlp()
    added = [
        layer for layer in multidrop.insert_dropout(model, 0.2).layers if "multidrop" in layer.name
    ]
    assert len(added) == 2 and all(isinstance(layer, keras.layers.Dropout) for layer in added)
    assert all(type(layer) is Dropout for layer in added)


def test_inference_is_the_identity():
    x = np.random.default_rng(0).normal(size=(16, 40)).astype("float32")
    assert_identical(Dropout(0.5, seed=1)(x, training=False), x)
    assert_identical(Dropout(0.5)(x), x)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_training_drops_rate_and_scales_the_rest(rate):
    x = np.random.default_rng(0).uniform(1, 2, size=(200, 500)).astype("float32")
    y = keras.ops.convert_to_numpy(Dropout(rate, seed=3)(x, training=True))
    dropped = y == 0
    # 50k draws per part: 5 standard deviations stay below 0.011; even and odd
    # columns come from the two halves of one hash on PyTorch
    for part in (dropped[:100], dropped[100:], dropped[:, ::2], dropped[:, 1::2]):
        assert abs(part.mean() - rate) < 0.011
    np.testing.assert_allclose(y[~dropped], x[~dropped] / (1 - rate), rtol=1e-6)


def test_noise_shape_shares_the_mask_along_its_unit_axes():
    x = np.ones((4, 6, 32), "float32")
    y = keras.ops.convert_to_numpy(
        Dropout(0.5, noise_shape=(None, 1, 32), seed=0)(x, training=True)
    )
    assert (y == y[:, :1, :]).all() and 0 < (y == 0).mean() < 1


def test_keeps_the_input_dtype():
    x = keras.ops.ones((8, 64), dtype="bfloat16")
    y = Dropout(0.5, seed=0, dtype="bfloat16")(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"


def test_seeded_masks_repeat_run_to_run_and_change_call_to_call():
    x = np.ones((32, 64), "float32")

    def two_calls(seed):
        layer = Dropout(0.5, seed=seed)
        return [keras.ops.convert_to_numpy(layer(x, training=True)) for _ in range(2)]

    first, second = two_calls(7), two_calls(7)
    assert_identical(first, second)
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], two_calls(8)[0])


def test_seeded_model_trains_the_same_way_twice():
    model, x = _mlp(), np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    y = np.arange(16) % 3

    def train():
        rewired = multidrop.insert_dropout(model, 0.5, seed=11)
        rewired.compile("sgd", "sparse_categorical_crossentropy")
        for _ in range(3):
            rewired.train_on_batch(x, y)
        return rewired.get_weights()

    assert_identical(train(), train())


@pytest.mark.skipif(
    not TORCH, reason="the fast path is PyTorch's; other backends run keras.layers.Dropout"
)
def test_gradient_is_the_mask():
    import torch

    x = torch.rand(64, 100, requires_grad=True)
    y = Dropout(0.25, seed=0)(x, training=True)
    y.sum().backward()
    kept = (y != 0).float()
    assert 0.2 < 1 - kept.mean().item() < 0.3
    assert torch.equal(x.grad, kept / 0.75)


@pytest.mark.skipif(
    not TORCH, reason="torch.compile graph breaks exist on the PyTorch backend only"
)
def test_no_graph_break_or_host_read_under_torch_compile():
    import torch

    x = torch.ones(8, 16)

    def graph_breaks(layer):
        return torch._dynamo.explain(lambda t: layer(t, training=True))(x).graph_break_count

    # Keras' seeded Dropout reads its seed back to the host: that is a graph break
    assert graph_breaks(keras.layers.Dropout(0.5, seed=1)) > 0
    assert graph_breaks(Dropout(0.5, seed=1)) == 0
    assert graph_breaks(Dropout(0.5)) == 0


def test_saved_as_keras_dropout_and_still_removable(tmp_path):
    model = _mlp()
    rewired = multidrop.insert_dropout(model, 0.3, seed=5)
    path = tmp_path / "rewired.keras"
    rewired.save(path)
    saved = json.loads(zipfile.ZipFile(path).read("config.json"))["config"]["layers"]
    added = [layer for layer in saved if layer["config"]["name"].endswith("_multidrop")]
    assert [(s["module"], s["class_name"], s["registered_name"]) for s in added] == [
        ("keras.layers", "Dropout", None)
    ] * 2
    assert [layer["config"]["seed"] for layer in added] == [5, 6]

    loaded = keras.saving.load_model(path)
    assert [type(layer) for layer in loaded.layers if "multidrop" in layer.name] == [
        keras.layers.Dropout
    ] * 2
    x = np.random.default_rng(1).normal(size=(4, 8)).astype("float32")
    assert_identical(loaded(x, training=False), rewired(x, training=False))
    for plain in (multidrop.remove_dropout(rewired), multidrop.remove_dropout(loaded)):
        assert [layer.name for layer in plain.layers] == [layer.name for layer in model.layers]


def _mlp():
    x = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="fc1")(x)
    h = keras.layers.Dense(16, activation="relu", name="fc2")(h)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax", name="out")(h))
