"""multidrop.search on a tiny MLP and real digits: the table, reproducing the best call, the
untouched original, resuming from a directory, and bad input refused before any training."""

import re
import sys

import keras
import numpy as np
import pytest
from conftest import assert_snapshot_equal, snapshot

import multidrop
from multidrop import cli, select
from multidrop.demo import search as demo_search
from multidrop.search import search

LOSS = "sparse_categorical_crossentropy"
PLACES = {"head": select.last(1), "all": "activations"}
SHARED = dict(
    where=PLACES, rates=[0.0, 0.3], loss=LOSS, epochs=1, seeds=2, objective="val_accuracy"
)


@pytest.fixture(scope="module")
def data():
    """128 training and 64 validation digits, flat: whole batches of 32, so that JAX
    compiles one training and one evaluation step per model, not one more per last batch."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int32")
    return (x[:128], y[:128]), (x[128:192], y[128:192])


def mlp() -> keras.Model:
    keras.utils.set_random_seed(1)
    x = inputs = keras.Input((64,), name="pixels")
    x = keras.layers.Dense(24, activation="relu", name="h1")(x)
    x = keras.layers.Dense(24, activation="relu", name="h2")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="probs")(x))


class FitCounter:
    """Counts ``keras.Model.fit`` calls, and can fail the n-th one (a power cut)."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, fit = 0, fail_at, keras.Model.fit

        def counted(model, *args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("power cut")
            return fit(model, *args, **kwargs)

        monkeypatch.setattr(keras.Model, "fit", counted)


@pytest.fixture(scope="module")
def searched(data):
    """One grid search (2 placements x 2 rates x 2 seeds), with the model before and after."""
    model = mlp()
    before, outputs = snapshot(model), model.predict(data[1][0], verbose=0)
    result = search(model, *data, **SHARED)
    return model, before, outputs, result


def test_every_placement_and_rate_gets_a_row(searched, tmp_path):
    result = searched[-1]
    assert [(r["placement"], r["rate"]) for r in result.rows] == [
        ("head", 0.0),
        ("head", 0.3),
        ("all", 0.0),
        ("all", 0.3),
    ]
    assert result.trained == 6  # the baseline (shared by both placements) and 2 x 2, 2 seeds each
    rows = {(r["placement"], r["rate"]): r for r in result.rows}
    assert rows["head", 0.0]["scores"] == rows["all", 0.0]["scores"]
    assert [rows[p, 0.3]["sites"] for p in ("head", "all")] == [1, 2]
    for row in result.rows:
        assert row["n"] == len(row["scores"]) == 2 and 0 <= row["mean"] <= 1
        assert row["mean"] == pytest.approx(np.mean(row["scores"]))
        assert row["std"] == pytest.approx(np.std(row["scores"], ddof=1))
    assert result.maximize and result.best["mean"] == max(r["mean"] for r in result.rows)

    text = str(result)
    for placement, rate in rows:
        assert re.search(rf"{placement}\s+│ .* │\s+{rate:g} │", text)
    assert f"best: {result.best_call}" in text and "val_accuracy (higher is better)" in text
    png = result.save_heatmap(tmp_path / "map.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_the_original_model_is_untouched(searched, data):
    model, before, outputs, _ = searched
    assert_snapshot_equal(before, snapshot(model))  # weights, config, trainable flags
    np.testing.assert_array_equal(outputs, model.predict(data[1][0], verbose=0))
    assert not model.compiled


def test_the_pasted_best_call_reproduces_the_best_score(data):
    """Exactly, not within a tolerance: the same seed, the same clone, the same batches and
    the same arithmetic in one process give the same bits, on every backend."""
    model = mlp()
    result = search(model, *data, where=PLACES, rates=[0.3], loss=LOSS, epochs=2)
    assert re.fullmatch(
        r"multidrop\.insert_dropout\(model, 0\.3, where="
        r"(select\.last\(1\)|'activations'), seed=0\)",
        result.best_call,
    )

    keras.utils.set_random_seed(0)
    clone = eval(result.best_call, {"multidrop": multidrop, "select": select, "model": model})
    clone.compile("adam", LOSS, metrics=["accuracy"])
    clone.fit(*data[0], batch_size=32, epochs=2, verbose=0)
    score = clone.evaluate(*data[1], batch_size=32, verbose=0, return_dict=True)["loss"]
    assert score == result.best["scores"][0]
    for mine, theirs in zip(clone.get_weights(), result.best_model.get_weights()):
        np.testing.assert_array_equal(mine, theirs)


def test_a_resumed_search_trains_only_what_is_missing(searched, data, tmp_path, monkeypatch):
    model, folder = mlp(), tmp_path / "search"
    options = {**SHARED, "directory": folder}
    cut = FitCounter(monkeypatch, fail_at=4)  # 3 of the 6 trainings finish, then the power goes
    with pytest.raises(RuntimeError, match="power cut"):
        search(model, *data, **options)
    assert cut.calls == 4

    fits = FitCounter(monkeypatch)
    resumed = search(model, *data, **options)
    assert resumed.trained == 3 and fits.calls == 3 + 1  # the rest, and the best model once
    assert len(resumed.rows) == 4 and all(r["n"] == 2 for r in resumed.rows)
    assert {p.name for p in folder.iterdir()} == {"search.db", "best.keras", "heatmap.png"}

    fits = FitCounter(monkeypatch)
    again = search(model, *data, **options)
    assert again.trained == 0 and fits.calls == 0  # even the best model is read from best.keras
    assert again.rows == resumed.rows and again.best_call == resumed.best_call

    assert resumed.rows == searched[-1].rows  # the interruption changed no number

    with pytest.raises(ValueError, match=r"other settings \(epochs: 1 there, 2 now\)"):
        search(model, *data, **{**options, "epochs": 2})


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"rates": []}, ValueError, r"rates=\[\] is empty"),
        ({"rates": [0.2, 1.0]}, ValueError, r"rate must be a float in \[0, 1\), got 1.0 in rates"),
        ({"rates": [-0.1]}, ValueError, r"got -0.1 in rates"),
        ({"rates": 0.2}, TypeError, r"rates must be a list of floats"),
        ({"rates": [0.2, 0.2]}, ValueError, r"repeats a rate"),
        ({"where": {}}, ValueError, r"where=\{\} names no placement"),
        ({"where": "activations"}, TypeError, r"where must be a dict of named placements"),
        ({"where": {"head": ["nope"]}}, ValueError, r"No layer named 'nope'"),
        ({"train": "digits"}, TypeError, r"train must be an \(x, y\) tuple or a dataset"),
        ({"train": np.zeros((4, 64))}, TypeError, r"for arrays pass train=\(x, y\)"),
        ({"validation": (np.zeros((4, 64)), np.zeros(3))}, ValueError, r"as many x as y"),
        ({"validation": (1, 2, 3)}, ValueError, r"must be an \(x, y\) pair"),
        ({"objective": "loss"}, ValueError, r"must name a validation metric"),
        ({"objective": "val_auc"}, ValueError, r"val_<one of these>"),
        ({"objective": "val_thing"}, ValueError, r"\('val_thing', 'max'\)"),
        ({"strategy": "annealing"}, ValueError, r"strategy='annealing' is not one of"),
        ({"n_trials": 3}, ValueError, r"n_trials=3 is for strategy='random' or 'bayes'"),
        ({"seeds": 0}, ValueError, r"seeds must be .*got 0"),
        ({"kind": "spotty"}, ValueError, r"Unknown dropout kind='spotty'"),
        ({"workers": 0}, ValueError, r"workers must be .*got 0"),
        ({"storage": 5}, TypeError, r"storage must be a database URL string or None, got 5"),
        ({"storage": "db.sqlite"}, ValueError, r"storage='db.sqlite' is not a database URL"),
        (
            {"storage": "postgresql+psycopg://me:secret@127.0.0.1:1/db"},  # nothing listens
            ValueError,
            r"storage='postgresql\+psycopg://me:\*\*\*@127.0.0.1:1/db' cannot be used: "
            r"OperationalError: .*refused.* Check that the server is running and reachable",
        ),
        (
            {"strategy": "bayes", "n_trials": 2, "workers": 2},
            ValueError,
            r"strategy='bayes' runs in one process; workers and storage share a grid",
        ),
        (
            {"where": {"h": select.where(lambda call: True)}, "workers": 2},
            ValueError,
            r"where\['h'\] = .* cannot be sent to worker processes",
        ),
    ],
)
def test_bad_input_is_refused_before_any_training(change, error, message, data, monkeypatch):
    fits = FitCounter(monkeypatch)
    train, validation = data
    arguments = {
        "train": train,
        "validation": validation,
        "where": PLACES,
        "rates": [0.0, 0.2],
        "loss": LOSS,
        **change,
    }
    with pytest.raises(error, match=message):
        search(mlp(), **arguments)
    assert fits.calls == 0


def test_random_and_bayes_strategies_and_a_baseline_best(data):
    """Rate 0 alone: whichever placement a strategy proposes, it is the same model without
    dropout, trained once and then read back; the best call is the model itself."""
    model = mlp()
    for strategy in ("random", "bayes"):
        result = search(
            model, *data, where=PLACES, rates=[0.0], loss=LOSS, strategy=strategy, n_trials=2
        )
        assert result.trained == 1 and 1 <= len(result.rows) <= 2
        assert result.best_call.startswith("model  # no dropout")
        assert result.best["sites"] == 0 and len(result.best_model.layers) == 4


def test_the_search_command(data, tmp_path, capsys):
    path, folder = tmp_path / "mlp.keras", tmp_path / "study"
    mlp().save(path)
    for name, (x, y) in zip(("train", "validation"), data):
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    argv = [
        "search",
        str(path),
        "--train",
        str(tmp_path / "train.npz"),
        "--validation",
        str(tmp_path / "validation.npz"),
        "--where",
        "head=h2",
        "--where",
        "all=activations",
        "--rates",
        "0.3",
        "--epochs",
        "1",
        "-d",
        str(folder),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"head\s+│ \['h2'\]|all\s+│ select\.activations\(\)", out)) == 2
    assert re.search(r"best: multidrop\.insert_dropout\(model, 0\.3, where=", out)
    assert (folder / "best.keras").is_file() and (folder / "heatmap.png").is_file()

    assert cli.main([*argv[:-2], "--where", "head"]) == 2
    assert "--where 'head' is not NAME=PLACEMENT" in capsys.readouterr().err


def test_the_search_demo_step(tmp_path, capsys, monkeypatch):
    """The whole demo through the CLI, on a smaller grid: no dropout against the head at 0.5."""
    monkeypatch.setattr(demo_search, "PLACEMENTS", {"head": select.last(2)})
    monkeypatch.setattr(demo_search, "RATES", (0.0, 0.5))
    monkeypatch.setattr(demo_search, "PRETRAIN_EPOCHS", 1)
    argv = ["demo", "search", "--seeds", "2", "--epochs", "2", "--per-class", "10"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning on 5-9 with 10 examples per class (50)" in out
    assert len(re.findall(r"head\s+│ select\.last\(2\) │\s+\d │\s+(0|0\.5) │", out)) == 2
    assert re.search(r"no dropout\s+│ [\d.]+ ± [\d.]+ │", out)  # the held-out table
    assert re.search(r"(yes|no|no clear difference): dropout 0\.5 in 'head'", out)
    assert (tmp_path / "search" / "heatmap.png").is_file()


def test_a_missing_optuna_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # find_spec and import now fail
    assert cli.main(["search", "m.keras", "--train", "t.npz", "--validation", "v.npz"]) == 2
    assert "pip install 'multidrop[search]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"pip install 'multidrop\[search\]'"):
        search(mlp(), ([0], [0]), ([0], [0]), where=PLACES, rates=[0.1], loss=LOSS)
