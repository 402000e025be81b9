"""``multidrop demo`` end to end, through the CLI: the bundled digits CNN, a model of the user's
that takes digits, and one that does not."""

import re
import sys

import keras
import numpy as np
import pytest
from keras import layers

from multidrop import cli, demo
from multidrop.demo import digits


def test_bundled_model_runs_the_whole_job(tmp_path, capsys):
    assert cli.main(["demo", "--epochs", "1", "--samples", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 dropout layers" in out  # after relu1, relu2 and fc
    assert re.search(r"probs\s+│ \(64, 10\)\s+│ float32 .* bitwise │ ok", out)  # verified
    cell = r"\s+│\s+([\d.]+)"
    rows = re.findall(rf"(with|without) dropout{cell}{cell}{cell} ms", out)
    assert [r[0] for r in rows] == ["without", "with"]
    (_, before, after_plain, _), (_, before_again, after_dropout, _) = rows
    assert before == before_again  # the same start: inference did not change
    assert float(after_plain) > 0.9 and float(after_dropout) > 0.9
    assert re.search(r"least certain test digits: \d+/36; among the other 90%: \d+/324", out)
    png = tmp_path / demo.PNG_NAME
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


def test_a_users_digits_model_with_logits_is_fine_tuned_too(tmp_path, capsys):
    """An untrained flat MLP on 64 inputs that ends in logits: the data is reshaped, the
    loss takes logits, and three epochs of fine-tuning lift both runs well above chance."""
    x = keras.Input((64,), name="pixels")
    h = layers.Dense(32, activation="relu", name="hidden")(x)
    model = keras.Model(x, layers.Dense(10, name="logits")(h), name="flat_mlp")
    path = tmp_path / "flat.keras"
    model.save(path)

    argv = [
        "demo",
        "--model",
        str(path),
        "--epochs",
        "3",
        "--samples",
        "3",
        "--rate",
        "0.2",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "'flat_mlp'" in out and "1 dropout layer " in out
    rows = re.findall(r"with(?:out)? dropout\s+│\s+([\d.]+) │\s+([\d.]+) │", out)
    assert len(rows) == 2 and all(float(after) > float(before) + 0.3 for before, after in rows)
    assert (tmp_path / demo.PNG_NAME).is_file()


def test_a_model_that_takes_no_digits_gets_plan_insert_and_verify(tmp_path, capsys):
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    h = layers.Dense(16, activation="relu", name="trunk")(layers.Concatenate()([a, b]))
    outputs = {
        "label": layers.Dense(3, activation="softmax", name="label")(h),
        "score": layers.Dense(1, name="score")(h),
    }
    path = tmp_path / "two_heads.keras"
    keras.Model({"a": a, "b": b}, outputs, name="two_heads").save(path)
    assert cli.main(["demo", "--model", str(path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "multidrop plan for 'two_heads': 1 dropout layer " in out
    assert len(re.findall(r"│ bitwise │ ok", out)) == 2  # label and score, unchanged
    assert "does not take 8x8 digit images" in out and "skipped" in out
    assert "val acc" not in out and not (tmp_path / demo.PNG_NAME).exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mc"], "drop --mc"),
        (["--epochs", "0"], "at least 1"),
        (["--model", "nope.keras"], "no such model"),
    ],
)
def test_bad_demo_options_are_one_line_errors(argv, message, capsys):
    assert cli.main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_demo_dependency_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec now reports it missing
    assert cli.main(["demo"]) == 2
    assert "needs sklearn: pip install 'multidrop[demo]'" in capsys.readouterr().err


def test_the_bundled_model_is_the_one_digits_py_builds():
    model = keras.saving.load_model(digits.MODEL_PATH)
    fresh = digits.build()
    assert [type(layer) for layer in model.layers] == [type(layer) for layer in fresh.layers]
    assert [w.shape for w in model.weights] == [w.shape for w in fresh.weights]
    _, _, (x, y) = digits.load()
    accuracy = np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y)
    assert accuracy > 0.9
