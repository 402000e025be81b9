"""The benchmarks' quickest runs end to end: ``python -m benchmarks`` and
``python -m benchmarks.floor`` (multidrop's Dropout itself: test_dropout.py)."""

import json
import pathlib
import subprocess
import sys

import keras
import matplotlib.image

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH = keras.backend.backend() == "torch"


def run_module(module: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_benchmark_writes_table_json_and_chart(tmp_path):
    backend = keras.backend.backend()
    run = run_module(
        "benchmarks", "--quick", "--backend", backend, "--out", str(tmp_path), timeout=1800
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
    saved = row["saved_bytes_per_element"]
    if TORCH:  # nn.Dropout keeps a float mask and its output; multidrop only its output
        assert saved["native"] == saved["keras"] == 8 and 4 <= saved["multidrop"] < 4.1
    else:
        assert saved is None

    image = matplotlib.image.imread(tmp_path / f"bench_{backend}.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_benchmark_rejects_an_unknown_model(tmp_path):
    run = run_module("benchmarks", "--models", "mlp,vgg", "--out", str(tmp_path))
    assert run.returncode == 2 and "unknown ['vgg']" in run.stderr


def test_quick_floor_benchmark_writes_table_json_and_chart(tmp_path):
    backend = keras.backend.backend()
    run = run_module(
        "benchmarks.floor",
        *("--quick", "--sizes", "4096,300", "--backend", backend, "--out", str(tmp_path)),
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"floor benchmark: {backend}, CPU" in run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("| backend | mode | elements | floor (x * c) ms |")
    mode = {"torch": "eager", "jax": "jit", "tensorflow": "function"}[backend]
    assert [line.split(" | ")[:3] for line in lines[2:4]] == [
        [f"| {backend}", mode, "4,096"],
        [f"| {backend}", mode, "300"],
    ]
    assert (tmp_path / "floor.md").read_text().strip() == run.stdout.strip()

    results = json.loads((tmp_path / "floor.json").read_text())
    rows = results["backends"][backend]["rows"]
    assert [(r["mode"], r["elements"], r["shape"]) for r in rows] == [
        (mode, 4096, [16, 256]),
        (mode, 300, [300]),
    ]
    for row in rows:
        assert set(row["variants"]) == {"floor", "native", "keras", "multidrop", "multidrop seeded"}
        assert all(len(v["samples_ms"]) == 3 and v["min_ms"] > 0 for v in row["variants"].values())
        saved = row["saved_bytes_per_element"]
        if TORCH:  # one dropout alone: nn.Dropout keeps a float mask, multidrop 8 bytes in all
            assert saved["native"] == 4 and saved["multidrop"] * row["elements"] == 8
    image = matplotlib.image.imread(tmp_path / "floor.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_floor_benchmark_rejects_a_bad_size(tmp_path):
    run = run_module("benchmarks.floor", "--sizes", "4096,lots", "--out", str(tmp_path))
    assert run.returncode == 2 and "--sizes takes comma-separated integers" in run.stderr
