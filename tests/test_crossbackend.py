"""One saved model, rewired and verified on PyTorch, JAX and TensorFlow (one subprocess each).

Needs all three backends installed: ``nox -s crossbackend`` runs these. Each
subprocess costs seconds of imports, so the runs happen once per module and
the tests read their reports.
"""

import contextlib
import io
import json

import pytest
from models import multi_io

import multidrop
from multidrop import cli

pytestmark = pytest.mark.crossbackend

BACKENDS = ["torch", "jax", "tensorflow"]
PAIRS = [("torch", "jax"), ("torch", "tensorflow"), ("jax", "tensorflow")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The conv / BatchNormalization / residual / Embedding / two-head model, saved
    under this process's backend."""
    path = tmp_path_factory.mktemp("crossbackend") / "multi_io.keras"
    multi_io().save(path)
    return path


@pytest.fixture(scope="module")
def report(saved):
    return multidrop.cross_backend(saved, rate=0.2, kind="auto", seed=7)


@pytest.fixture(scope="module")
def cli_run(saved, tmp_path_factory):
    """``multidrop verify`` with a regex selector and --json: exit status, stdout, JSON."""
    out = tmp_path_factory.mktemp("cli") / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(
            ["verify", str(saved), "--rate", "0.3", "--where", "re:conv|head", "--json", str(out)]
        )
    return status, stdout.getvalue(), json.loads(out.read_text())


def test_every_backend_rewires_bitwise_identically(report):
    assert [(r.backend, r.status) for r in report.runs] == [(b, "ok") for b in BACKENDS]
    for run in report.runs:
        assert run.version.startswith(run.backend + " ")
        assert [d.output for d in run.report.differences] == ["label", "score"]
        assert all(d.ok and d.max_abs == 0 for d in run.report.differences)


def test_every_pair_of_backends_agrees_within_float32_tolerance(report):
    assert report.ok
    assert (report.dtype, report.atol, report.rtol) == ("float32", 1e-5, 1e-4)
    assert [(p.a, p.b) for p in report.pairs] == PAIRS
    for pair in report.pairs:
        assert pair.ok
        for d in pair.report.differences:
            assert d.shape in ((2, 3), (2, 1)) and d.max_abs < report.atol


def test_report_counts_the_sites_and_prints_every_check(report):
    model = multi_io()
    assert report.sites == len(multidrop.plan(model, 0.2, kind="auto", seed=7)) == 5
    text = str(report)
    for backend in BACKENDS:
        assert f"{backend}: rewired vs original" in text
    for a, b in PAIRS:
        assert f"{a} vs {b}" in text
    assert "atol=1e-05, rtol=0.0001" in text and "MISMATCH" not in text


def test_report_as_json(report):
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["tolerances"]["dtype"] == "float32"
    assert [(b["backend"], b["status"]) for b in data["backends"]] == [(b, "ok") for b in BACKENDS]
    assert [(p["a"], p["b"], p["ok"]) for p in data["pairs"]] == [(a, b, True) for a, b in PAIRS]
    assert all(o["max_abs"] < 1e-5 for p in data["pairs"] for o in p["outputs"])


def test_cli_verifies_on_all_three(cli_run):
    status, out, data = cli_run
    assert status == 0
    for a, b in PAIRS:
        assert f"{a} vs {b}" in out
    where = multidrop.select.regex("conv|head")  # conv1, conv2, conv2_bn, head
    assert data["ok"] is True and data["sites"] == len(multidrop.plan(multi_io(), 0.3, where)) == 4
    assert [(b["backend"], b["status"]) for b in data["backends"]] == [(b, "ok") for b in BACKENDS]


def test_cli_reports_a_real_mismatch(saved, tmp_path, capsys):
    # Monte Carlo dropout stays on at inference, so the rewired model answers differently.
    report = tmp_path / "mismatch.json"
    status = cli.main(
        ["verify", str(saved), "--rate", "0.5", "--mc", "--backends", "jax", "--json", str(report)]
    )
    assert status == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "jax: rewired vs original" in out
    data = json.loads(report.read_text())
    assert data["ok"] is False
    assert [(b["backend"], b["status"]) for b in data["backends"]] == [("jax", "mismatch")]
    assert all(o["max_abs"] > 0 and not o["ok"] for b in data["backends"] for o in b["outputs"])


def test_a_backend_that_fails_to_import_is_skipped(saved, tmp_path, monkeypatch):
    broken = tmp_path / "site" / "jax"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this jax is broken')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))  # only the subprocess sees it

    report = multidrop.cross_backend(saved, backends=("jax",), rate=0.2)

    [run] = report.runs
    assert (run.backend, run.status) == ("jax", "skipped")
    assert "cannot import jax" in run.message and "this jax is broken" in run.message
    assert not report.ok and report.skipped == ["jax"]


@pytest.mark.crossbackend
def test_cli_verifies_set_dropout_on_all_three(tmp_path, capsys):
    """An LSTM's recurrent dropout set: Keras leaves its fused kernel, so each backend checks
    the clone within float32 tolerance instead of bitwise, and says so."""
    import keras

    x = keras.Input((5, 3))
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.LSTM(4, name="lstm")(x)))
    model.save(tmp_path / "lstm.keras")
    status = cli.main(
        [
            "verify",
            str(tmp_path / "lstm.keras"),
            "--edit",
            "set",
            "--rate",
            "0.3",
            "--fields",
            "recurrent_dropout",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "1 dropout fields set" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["edit"] == "set" and [b["status"] for b in report["backends"]] == ["ok"] * 3
    assert all(o["atol"] > 0 for b in report["backends"] for o in b["outputs"])
