"""multidrop.search in worker processes on a real PostgreSQL server (tests/postgres.py):
2 and 3 workers give the table of one process, a killed worker's trial is finished by
another, a stopped search resumes, other settings or data are refused, and so is a
database where tables cannot be created.

The workers are processes of this session's backend; these tests run in the torch
session (the scheduling does not depend on the backend, and each worker costs a
Keras import)."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import optuna
import postgres
import pytest
from test_search import LOSS, SHARED, FitCounter, mlp
from test_search import data as data  # a fixture

from multidrop import cli, search_workers, select
from multidrop.search import _key, search

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="worker processes are tested in the torch session (each costs a Keras import)",
)
COMPLETE, FAIL, PRUNED, RUNNING = (
    optuna.trial.TrialState[s] for s in ("COMPLETE", "FAIL", "PRUNED", "RUNNING")
)
# The CLI's --where head=h2 --where all=activations.
KILL = dict(
    where={"head": ["h2"], "all": select.activations()},
    rates=[0.0, 0.3],
    loss=LOSS,
    epochs=12,
    seeds=2,
)


@pytest.fixture(scope="module")
def server():
    with postgres.server() as url:
        yield url


@pytest.fixture(scope="module")
def reference(data):
    """The grid in this one process, no storage: the table every worker count must give."""
    return search(mlp(), *data, **SHARED)


@pytest.fixture(scope="module")
def three(server, data):
    """The grid on 3 workers, study "three" on a fresh database."""
    url = postgres.database(server, "tables")
    return url, search(mlp(), *data, **SHARED, storage=url, workers=3, study="three")


@contextlib.contextmanager
def opened(url):
    """The study storage at ``url``, its connections closed after."""
    store = search_workers.storage(url)
    try:
        yield store
    finally:
        store.engine.dispose()


def trials(url, study="multidrop-search"):
    with opened(url) as store:
        return optuna.load_study(study_name=study, storage=store).get_trials()


def test_three_workers_give_the_table_of_one_process(three, reference, data):
    """(Two workers: the resumed search of the last test.) Bitwise the same scores."""
    url, result = three
    assert result.rows == reference.rows and result.best_call == reference.best_call
    assert result.trained == reference.trained == 6  # each (placement, rate, seed) once
    study = trials(url, "three")
    done = [t for t in study if t.state == COMPLETE]
    assert 1 < len({t.user_attrs["worker"] for t in done}) <= 3
    assert sorted(search_workers.point(t) for t in done) == sorted(
        (p, r) for p in SHARED["where"] for r in SHARED["rates"]
    )
    # A worker that saw a queued trial another worker took first gets a sampled trial,
    # pruned at once: no parameters, nothing trained (the grid is the queue).
    for extra in (t for t in study if t.state != COMPLETE):
        assert extra.state == PRUNED and extra.params == {} and "worker" not in extra.user_attrs


def test_other_settings_or_data_on_one_study_are_refused(three, data, monkeypatch):
    url, _ = three
    fits = FitCounter(monkeypatch)
    monkeypatch.setattr(search_workers, "start", lambda *a: pytest.fail("workers started"))
    with pytest.raises(
        ValueError,
        match=r"\(study 'three'\) holds a search with other settings "
        r"\(epochs: 1 there, 2 now\)",
    ):
        search(mlp(), *data, **{**SHARED, "epochs": 2}, storage=url, study="three")
    (x, y), validation = data
    with pytest.raises(ValueError, match=r"other settings \(data: 'train 128 sha256 \w+, "):
        search(mlp(), (x[::-1], y[::-1]), validation, **SHARED, storage=url, study="three")
    assert fits.calls == 0


def test_the_status_view(three, capsys):
    url, result = three
    assert cli.main(["search", "--status", url, "--study", "three"]) == 0
    out = capsys.readouterr().out
    assert "study 'three': 4 of 4 (placement, rate) done, 0 running, 0 queued" in out
    best = result.best
    assert f"best so far: {best['placement']}, rate {best['rate']:g}" in out


def test_a_database_without_the_right_to_create_tables_is_refused(server, data, monkeypatch):
    url = postgres.database(server, "locked")
    postgres.sql(server, "DROP ROLE IF EXISTS reader", "CREATE ROLE reader LOGIN")
    reader = url.replace("postgres:@", "reader:@", 1)
    fits = FitCounter(monkeypatch)
    with pytest.raises(ValueError, match=r"cannot be used: .*permission denied for schema public"):
        search(mlp(), *data, **SHARED, storage=reader)
    assert fits.calls == 0


def test_a_killed_worker_is_replaced_and_a_stopped_search_resumes(three, data, tmp_path):
    """Stop a one-worker search (the CLI, killed with its worker) after the first seed of a
    trial; resume it with two workers and kill one of them in a trial: every
    trial is finished by another worker, nothing finished is trained again, and the table
    is the one process's. The study shares its database with study "three", apart."""
    (url, _), env = three, {"MULTIDROP_SEARCH_HEARTBEAT": "1,10"}
    apart = [(t.number, t.state) for t in trials(url, "three")]
    model, (train, validation) = tmp_path / "mlp.keras", data
    mlp().save(model)
    for name, (x, y) in (("train", train), ("validation", validation)):
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    argv = [str(model), "--train", str(tmp_path / "train.npz"), "--validation",
            str(tmp_path / "validation.npz"), "--where", "head=h2", "--where",
            "all=activations", "--rates", "0,0.3", "--epochs", "12", "--seeds", "2",
            "--storage", url, "--workers", "1"]  # fmt: skip
    command = [sys.executable, "-c", "import sys, multidrop.cli as c; sys.exit(c.main())"]
    stopped = subprocess.Popen(
        [*command, "search", *argv], start_new_session=True, env={**os.environ, **env}
    )
    try:
        wait(url, lambda t: t.state == RUNNING and "seed 0" in t.user_attrs)
    finally:
        os.killpg(stopped.pid, signal.SIGKILL)  # the search and its worker
        stopped.wait()
    before = trials(url)
    [first] = [t for t in before if t.state == RUNNING]  # stopped in its trial
    finished = {
        _key(t.params["placement"], t.params["rate"], int(k[5:]))
        for t in before
        for k in t.user_attrs
        if k.startswith("seed ")
    }
    assert first.state == RUNNING and finished

    killed, done = [], threading.Event()

    def kill_one():  # a worker of the resumed search, in a trial
        stopped_worker = first.user_attrs["worker"]  # a retry inherits it until it runs
        trial = wait(
            url,
            lambda t: (
                t.state == RUNNING
                and t.user_attrs.get("worker", stopped_worker) != stopped_worker
                and is_worker(_pid(t))
            ),
            until=done,
        )
        if trial is not None:
            killed.append(trial)
            os.kill(_pid(trial), signal.SIGKILL)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(search_workers, "HEARTBEAT", 1)
            patch.setattr(search_workers, "GRACE", 10)
            resumed = search(mlp(), *data, **KILL, storage=url, workers=2, verbose=True)
    finally:
        done.set()
        killer.join(60)
    assert killed, "no worker of the resumed search was seen in a trial"

    after = {t.number: t for t in trials(url)}
    assert any(first.number in t.system_attrs.get("retry_history", ()) for t in after.values())
    for dead in (first, killed[0]):  # its point finished after all, its finished seeds kept
        assert after[dead.number].state == FAIL
        placement, rate = search_workers.point(dead)  # killed before it ran: no params yet
        [complete] = [
            t
            for t in after.values()
            if t.state == COMPLETE and t.params == {"placement": placement, "rate": rate}
        ]
        assert all(complete.user_attrs[k] == v for k, v in dead.user_attrs.items() if "seed" in k)
    one = search(mlp(), *data, **KILL)
    assert resumed.rows == one.rows and resumed.best_call == one.best_call
    # What had finished before the stop was read back, not trained again; every other
    # training was done once (the seed in flight in a killed worker is lost and redone).
    assert len(finished) + resumed.trained == one.trained == 6
    with opened(url) as store:
        names = {s.study_name for s in optuna.get_all_study_summaries(store)}
    assert names == {"three", "multidrop-search"}
    assert [(t.number, t.state) for t in trials(url, "three")] == apart


def _pid(trial) -> int:
    return int(trial.user_attrs["worker"].rpartition(":")[2])


def is_worker(pid: int) -> bool:
    """``pid`` is a live worker process now. A trial read as running may belong to a worker
    that has just ended, and its pid may already be another process's: a PostgreSQL
    backend, forked per connection, whose SIGKILL restarts the whole server."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"search_workers" in cmdline.read()
    except OSError:
        return False


def wait(url, condition, timeout=900, until=None):
    """The first trial of the default study that meets ``condition``, polled every 50 ms;
    None once the event ``until`` is set."""
    end, study = time.monotonic() + timeout, None
    with opened(url) as store:
        while time.monotonic() < end and not (until and until.is_set()):
            try:
                study = study or optuna.load_study(study_name="multidrop-search", storage=store)
                found = [t for t in study.get_trials(deepcopy=False) if condition(t)]
            except KeyError:  # the study does not exist yet
                found = []
            if found:
                return found[0]
            time.sleep(0.05)
    if until and until.is_set():
        return None
    raise AssertionError(f"no trial met the condition in {timeout} s")
