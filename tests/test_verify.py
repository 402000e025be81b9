"""verify() in one process, input generation, and the exit codes of `multidrop verify`."""

import zipfile

import keras
import numpy as np
import pytest
from models import multi_io, nested_embedding

import multidrop
from multidrop import cli
from multidrop.verify import TOLERANCES, VerificationError, sample_inputs, tolerance_for


@pytest.fixture(scope="module")
def model():
    return multi_io()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "multi_io.keras"
    model.save(path)
    return path


def test_rewired_model_is_identical(model):
    rewired = multidrop.insert_dropout(model, 0.3, kind="auto")
    report = multidrop.verify(model, rewired)

    assert report.ok
    assert [d.output for d in report.differences] == ["label", "score"]
    assert [d.shape for d in report.differences] == [(2, 3), (2, 1)]
    assert all(d.max_abs == d.max_rel == 0 and d.allowed == "bitwise" for d in report.differences)
    assert report.raise_on_mismatch() is report
    text = str(report)
    assert "label" in text and "score" in text and "bitwise" in text and "MISMATCH" not in text


def test_altered_weight_is_a_mismatch(model):
    rewired = multidrop.insert_dropout(model, 0.3)
    bias = rewired.get_layer("score").bias
    bias.assign(keras.ops.convert_to_numpy(bias) + 1e-3)

    report = multidrop.verify(model, rewired)

    label, score = report.differences
    assert not report.ok
    assert label.ok and label.max_abs == 0  # the label head does not use that bias
    assert not score.ok and score.max_abs == pytest.approx(1e-3, rel=1e-2)
    assert "MISMATCH" in str(report)
    with pytest.raises(VerificationError, match="MISMATCH"):
        report.raise_on_mismatch()
    with pytest.raises(AssertionError):
        multidrop.verify(model, rewired, raise_on_mismatch=True)
    assert multidrop.verify(model, rewired, atol=2e-3).ok
    assert bias is not model.get_layer("score").bias  # the original was left alone
    assert multidrop.verify(model, multidrop.insert_dropout(model, 0.3)).ok


def test_given_inputs_are_used(model):
    x = sample_inputs(model, batch_size=5, seed=1)
    report = multidrop.verify(model, multidrop.insert_dropout(model, 0.2), x)
    assert report.ok and report.differences[0].shape == (5, 3)


def test_generated_inputs_are_deterministic_and_typed(model):
    x = sample_inputs(model, batch_size=64)
    assert set(x) == {"image", "tokens"}
    assert x["image"].dtype == np.float32 and x["image"].shape == (64, 16, 16, 3)
    assert x["tokens"].dtype == np.int32 and x["tokens"].shape == (64, 8)
    assert x["tokens"].min() >= 0 and x["tokens"].max() == 49  # Embedding(50, ...)
    again = sample_inputs(model, batch_size=64)
    assert all(np.array_equal(x[k], again[k]) for k in x)


def test_integer_ids_stay_below_a_nested_embeddings_input_dim():
    model = nested_embedding(vocab=7)
    ids = sample_inputs(model, batch_size=64)
    assert ids.dtype == np.int32 and ids.min() == 0 and ids.max() == 6
    assert multidrop.verify(model, multidrop.insert_dropout(model, 0.2)).ok


def test_integers_that_feed_no_embedding_get_a_small_range():
    counts = keras.Input((4,), dtype="int32", name="counts")
    x = keras.layers.Dense(2)(keras.ops.cast(counts, "float32"))
    ids = sample_inputs(keras.Model(counts, x), batch_size=64)
    assert ids.dtype == np.int32 and ids.min() == 0 and ids.max() == 9


def test_verify_rejects_what_it_cannot_compare(model):
    with pytest.raises(TypeError, match="rewired"):
        multidrop.verify(model, "rewired.keras")
    other = keras.Model(model.inputs, model.get_layer("label").output)
    with pytest.raises(ValueError, match="different outputs"):
        multidrop.verify(model, other)


def test_missing_backends_are_skipped_not_crashed(model, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    report = multidrop.cross_backend(model, rate=0.2)
    assert [(r.backend, r.status) for r in report.runs] == [
        ("torch", "skipped"),
        ("jax", "skipped"),
        ("tensorflow", "skipped"),
    ]
    assert not report.ok and report.pairs == () and report.skipped == ["torch", "jax", "tensorflow"]
    assert "jax is not installed" in str(report)


def test_cross_backend_checks_its_arguments(model):
    with pytest.raises(ValueError, match="pytorch"):
        multidrop.cross_backend(model, backends=("pytorch",), rate=0.2)
    with pytest.raises(ValueError, match="rate"):
        multidrop.cross_backend(model, rate=1.5)
    with pytest.raises(TypeError, match="pickle"):
        multidrop.cross_backend(model, rate=0.2, where=lambda layer: layer.name == "head")
    with pytest.raises(ValueError, match="atol"):
        multidrop.cross_backend(model, rate=0.2, tolerances={"tol": 1e-3})
    with pytest.raises(ValueError, match="atol"):
        multidrop.cross_backend(model, rate=0.2, tolerances={"atol": -1})


def test_cross_backend_takes_the_insert_options_and_shows_the_changed_ones(model, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    report = multidrop.cross_backend(model, rate=0.2, where="activations", kind="auto", seed=None)
    assert report.options == "rate=0.2, kind='auto'"  # the defaults are left out
    assert "5 dropout layers inserted (rate=0.2, kind='auto')" in str(report)
    with pytest.raises(TypeError, match=r"cross_backend.*'sead'.*seed"):
        multidrop.cross_backend(model, rate=0.2, sead=7)


def test_tolerance_for_reads_the_table_by_dtype():
    assert tolerance_for("float32") == TOLERANCES["float32"] == (1e-5, 1e-4)
    assert tolerance_for(np.dtype("float16")) == TOLERANCES["float16"]
    assert tolerance_for("bfloat16") == TOLERANCES["bfloat16"]
    with pytest.raises(ValueError, match=r"'int32'.*float64"):
        tolerance_for("int32")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_cli_missing_file(capsys, tmp_path):
    assert cli.main(["verify", str(tmp_path / "nowhere.keras")]) == 2
    assert "no such model file" in one_line_error(capsys)


def test_cli_corrupt_file(capsys, saved, tmp_path):
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(saved.read_bytes()[:2000])
    assert cli.main(["verify", str(truncated)]) == 2
    assert "truncated.keras" in one_line_error(capsys)


def test_cli_non_model_files(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert cli.main(["verify", str(text)]) == 2
    assert "not a .keras file" in one_line_error(capsys)

    archive = tmp_path / "archive.keras"  # a zip archive, but no model in it
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "hello")
    assert cli.main(["verify", str(archive)]) == 2
    assert "cannot load" in one_line_error(capsys)


def test_cli_bad_options(capsys, saved):
    assert cli.main(["verify", str(saved), "--backends", "torch,pytorch"]) == 2
    assert "pytorch" in one_line_error(capsys)
    assert cli.main(["verify", str(saved), "--rate", "2"]) == 2
    assert "rate" in one_line_error(capsys)


def test_cli_nothing_verified_is_a_failure(capsys, saved, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    assert cli.main(["verify", str(saved), "--atol", "1e-3"]) == 1
    out = capsys.readouterr().out
    assert "torch is not installed" in out and "tensorflow is not installed" in out
    assert "atol=0.001, rtol=0.0001: set by the caller" in out
