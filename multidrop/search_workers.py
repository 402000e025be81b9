"""Worker processes for `multidrop.search`: many processes, one Optuna study on a shared storage.

``search(..., storage=URL, workers=N)`` puts every (placement, rate) of the grid in the
study's queue once (Optuna's ``enqueue_trial``), writes the job — the model as a
``.keras`` file, the data, the settings — into a temporary folder, and starts N processes
of ``python -c "import multidrop.search_workers as w; w.main()" JOB``. Each worker takes
queued trials from the study (Optuna pops a waiting trial for one worker only) until every
point of the grid is complete, then exits. Any machine that makes the same call on the
same URL adds its own workers to the same study.

Faults are Optuna's heartbeat: a worker's trial beats every ``HEARTBEAT`` seconds; a
trial whose beat is older than ``GRACE`` seconds (its worker was killed, its machine lost
power) is failed by the next worker that looks and queued again by
``RetryHeartbeatStaleTrialCallback``, with the seeds it had finished (they are user attributes of
the trial, copied to the retry). The search that started the dead worker starts a new one.

Memory: a worker that has grown by more than ``RSS_GROWTH_MB`` since its warm-up (its
first ``WARM_UP`` trials with dropout, which build kernels and caches) ends after the
trial in hand, and its search starts a fresh one (TensorFlow keeps about 12 MB of traced
graphs per trained model; PyTorch stays flat).

Example:
    >>> result = multidrop.search(model, train, validation, where={"all": "activations"},
    ...     rates=[0.0, 0.2], loss="mse", storage="postgresql+psycopg://me@db/search",
    ...     workers=2)
    >>> print(status("postgresql+psycopg://me@db/search"))   # from any machine
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import time
import warnings


# Seconds: a running trial's beat, and how old a beat may get before the trial is queued again.
def _heartbeat(text: str) -> tuple[int, int]:
    try:
        beat, grace = map(int, text.split(","))
    except ValueError:
        raise ValueError(
            f"MULTIDROP_SEARCH_HEARTBEAT={text!r}: give BEAT,GRACE in whole seconds, e.g. 5,20"
        ) from None
    return beat, grace


HEARTBEAT, GRACE = _heartbeat(os.environ.get("MULTIDROP_SEARCH_HEARTBEAT", "5,20"))
RSS_GROWTH_MB = 30  # a worker grown by more than this after its warm-up is replaced
WARM_UP = 2  # trials with dropout trained before the growth counts (JAX: +65 MB in the 2nd)
RECYCLED = 3  # a worker's exit status when it ends to be replaced
POLL = 0.5  # seconds between looks at the workers and the queue


def storage(url: str, heartbeat: int = HEARTBEAT, grace: int = GRACE):
    """Optuna's RDB storage at ``url`` with heartbeats and retries; ``ValueError`` if unusable.

    Connects and creates Optuna's tables at once, so that a malformed or unreachable
    URL, a missing driver or a database without the right to create tables is refused
    before any training. Passwords are not repeated in errors.

    Example:
        >>> storage("sqlite:///search.db")
        <optuna.storages._rdb.storage.RDBStorage object at ...>
    """
    import optuna
    import sqlalchemy

    if not isinstance(url, str):
        raise TypeError(f"storage must be a database URL string or None, got {url!r}.")
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        raise ValueError(
            f"storage={url!r} is not a database URL; e.g. "
            "'postgresql+psycopg://user:password@host:5432/db' or 'sqlite:///search.db'."
        ) from None
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None:
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver multidrop installs
    shown = parsed.render_as_string(hide_password=True)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback
    timeout = {"sqlite": "timeout"}.get(parsed.get_backend_name(), "connect_timeout")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                parsed.render_as_string(hide_password=False),
                engine_kwargs={
                    "connect_args": {timeout: 10 if timeout != "timeout" else 60},
                    "poolclass": sqlalchemy.pool.NullPool,  # no connection left open after use
                },
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=retry(max_retry=3),
            )
    except ModuleNotFoundError as error:
        raise ValueError(
            f"storage={shown!r} needs the database driver {error.name!r}: pip install it "
            "(PostgreSQL: pip install 'multidrop[search]', which brings psycopg)."
        ) from None
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        first = first.replace(parsed.password or "\0", "***")
        raise ValueError(
            f"storage={shown!r} cannot be used: {type(error).__name__}: {first}. Check that "
            "the server is running and reachable, and that this user may create tables there."
        ) from None


def start(job: pathlib.Path, count: int, study, grid: list[tuple], verbose: bool) -> None:
    """Run ``count`` worker processes on ``job`` until every point of ``grid`` is complete.

    A worker that ends to be replaced, or is killed, is replaced while work is left; one
    that fails stops the search with its exit status (its traceback is printed above).
    """
    import keras

    # Threads as in this process: fewer threads per worker would be faster on few cores, but
    # PyTorch's CPU results change with the thread count, and the tables must not.
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    command = [sys.executable, "-c", "import multidrop.search_workers as w; w.main()", job]
    running = [subprocess.Popen(command, env=env) for _ in range(count)]
    replaced = 0
    try:
        while running:
            time.sleep(POLL)
            for worker in [w for w in running if w.poll() is not None]:
                running.remove(worker)
                code = worker.returncode
                if code not in (0, RECYCLED) and code > 0:
                    raise RuntimeError(
                        f"a search worker (pid {worker.pid}) failed with exit status {code}; "
                        "its error is printed above."
                    )
                if code != 0 and missing(study, grid):
                    replaced += 1
                    if verbose:
                        why = "replaced" if code == RECYCLED else f"killed ({code}), replaced"
                        print(f"worker {worker.pid} {why}", flush=True)
                    running.append(subprocess.Popen(command, env=env))
    finally:
        for worker in running:
            worker.terminate()
        for worker in running:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def missing(study, grid: list[tuple]) -> list[tuple]:
    """The (placement, rate) points of ``grid`` without a complete trial in ``study``."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done = {point(t) for t in complete}
    return [p for p in grid if p not in done]


def point(trial) -> tuple | None:
    """A trial's (placement, rate): its parameters, or those it was queued with; else None."""
    params = trial.params if len(trial.params) == 2 else trial.system_attrs.get("fixed_params", {})
    return (params["placement"], params["rate"]) if len(params) == 2 else None


def enqueue(study, grid: list[tuple]) -> None:
    """Queue each point of ``grid`` that has no waiting, running or complete trial yet."""
    import optuna

    State = optuna.trial.TrialState
    states = (State.WAITING, State.RUNNING)
    live = {point(t) for t in study.get_trials(deepcopy=False, states=states)}
    for placement, rate in missing(study, grid):
        if (placement, rate) not in live:
            study.enqueue_trial({"placement": placement, "rate": rate})


def write_job(folder: pathlib.Path, run, url: str, name: str, call: str) -> pathlib.Path:
    """Write what a worker needs into ``folder``: the model, the data and the settings."""
    import keras

    from multidrop.search import _code

    run.model.save(folder / "model.keras")
    with open(folder / "data.pkl", "wb") as file:
        pickle.dump((run.train, run.validation), file)
    serialize = keras.saving.serialize_keras_object
    metrics = run.metrics if isinstance(run.metrics, tuple) else (run.metrics,)
    settings = {
        "where": {name: _code(spec) for name, spec in run.where.items()},
        "rates": list(run.rates),
        "kind": _code(run.kind),
        "loss": serialize(run.loss),
        "optimizer": serialize(run.optimizer),
        "metrics": [serialize(m) for m in metrics],
        "objective": run.objective,
        "maximize": run.maximize,
        "epochs": run.epochs,
        "seeds": run.seeds,
        "batch_size": run.batch_size,
        "verbose": run.verbose,
        "storage": url,
        "study": name,
        "call": call,
        "heartbeat": HEARTBEAT,
        "grace": GRACE,
    }
    try:
        (folder / "job.json").write_text(json.dumps(settings))
    except TypeError as error:
        raise ValueError(
            f"workers need loss, optimizer and metrics that Keras can serialize ({error}); "
            "pass names or Keras objects."
        ) from None
    return folder


def read_job(folder: pathlib.Path):
    """The `_Search` of a job written by `write_job`, with its settings."""
    import keras

    import multidrop
    from multidrop import select
    from multidrop.search import _Search

    job = json.loads((folder / "job.json").read_text())
    with open(folder / "data.pkl", "rb") as file:
        train, validation = pickle.load(file)
    scope = {"select": select, "keras": keras, "multidrop": multidrop}
    deserialize = keras.saving.deserialize_keras_object
    run = _Search(
        keras.saving.load_model(folder / "model.keras"),
        train,
        validation,
        {name: eval(code, scope) for name, code in job["where"].items()},
        tuple(job["rates"]),
        eval(job["kind"], scope),
        deserialize(job["loss"]),
        deserialize(job["optimizer"]),
        tuple(deserialize(m) for m in job["metrics"]),
        job["objective"],
        job["maximize"],
        job["epochs"],
        job["seeds"],
        job["batch_size"],
        job["verbose"],
    )
    return run, job


def work(folder: pathlib.Path) -> int:
    """One worker: take queued trials until the grid is complete (0) or memory grew (3)."""
    import optuna

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run, job = read_job(folder)
    study = optuna.load_study(
        study_name=job["study"],
        storage=storage(job["storage"], job["heartbeat"], job["grace"]),
        sampler=optuna.samplers.RandomSampler(),
    )
    grid = [(p, r) for p in run.where for r in run.rates]
    run.note, run.call, run.warm = f"  (worker {os.getpid()})", job["call"], 0
    run.shared = lambda trial: wait_and_read(run, study, trial)
    first = None
    while True:
        optuna.storages.fail_stale_trials(study)  # re-queues the trials of dead workers
        trials = study.get_trials(deepcopy=False)
        left = missing(study, grid)
        if not left:
            return 0
        states = {t.state for t in trials}
        if optuna.trial.TrialState.WAITING in states:
            study.optimize(lambda trial: queued_only(run, study, trial), n_trials=1)
            if first is None and run.warm >= WARM_UP:  # kernels and caches built
                first = rss_mb()
            elif first is not None and rss_mb() - first > RSS_GROWTH_MB:
                return RECYCLED
        elif optuna.trial.TrialState.RUNNING not in states:
            print(f"search worker: {left} failed too often; see the errors above", flush=True)
            return 1
        else:
            time.sleep(POLL)  # the last trials are running elsewhere; one may die


def queued_only(run, study, trial) -> float:
    """Run a queued trial. One that Optuna sampled because another worker took the last
    queued trial first is pruned: the grid is the queue."""
    import optuna

    if "fixed_params" not in study._storage.get_trial_system_attrs(trial._trial_id):
        raise optuna.TrialPruned()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trained = run.trained
    value = run.trial(trial)
    run.warm += run.trained > trained and trial.params["rate"] > 0
    trial.set_user_attr("rss_mb", round(rss_mb(), 1))  # for benchmarks/search_memory.py
    return value


def wait_and_read(run, study, trial) -> None:
    """Before a trial trains: wait while an earlier running trial trains the same model (the
    baseline is one model for every placement), then read every finished seed."""
    import optuna

    from multidrop.search import _key

    State = optuna.trial.TrialState
    mine = _key(trial.params["placement"], trial.params["rate"], 0)
    while True:
        trials = study.get_trials(deepcopy=False)
        earlier = [
            t
            for t in trials
            if t.state == State.RUNNING
            and t.number < trial.number
            and point(t) is not None
            and _key(*point(t), 0) == mine
        ]
        if not earlier:
            break
        time.sleep(POLL)
    run.read(trials)


def rss_mb() -> float:
    """This process's resident memory in MB (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status(url: str, name: str | None = None):
    """``(table, finished)``: a ``rich`` table of the study ``name`` on ``url`` (points done,
    trials running, queued and failed, the best so far, what each worker does), and whether
    every point of its grid is done.

    Example:
        >>> table, finished = status("sqlite:///search/search.db")
        >>> print(multidrop.render.text(table))
    """
    store = storage(url)
    try:
        return _status(store, url, name)
    finally:
        store.engine.dispose()


def _status(store, url: str, name: str | None):
    import optuna

    from multidrop import render
    from multidrop.search import STUDY_NAME

    State = optuna.trial.TrialState
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    name = name or (STUDY_NAME if STUDY_NAME in names or not names else names[0])
    if name not in names:
        raise ValueError(f"{url} holds no study {name!r}; it holds {names}.")
    study = optuna.load_study(study_name=name, storage=store)
    trials = study.get_trials(deepcopy=False)
    settings = study.user_attrs.get("settings", {})
    grid = len(settings.get("where", {})) * len(settings.get("rates", []))
    count = {s: sum(t.state == s for t in trials) for s in State}
    done = {(t.params["placement"], t.params["rate"]) for t in trials if t.state == State.COMPLETE}
    best = ""
    if any(t.state == State.COMPLETE for t in trials):
        top = study.best_trial
        best = (
            f"best so far: {top.params['placement']}, rate {top.params['rate']:g}: {top.value:.4f}"
        )
    table = render.table(
        f"study {name!r}: {len(done)} of {grid} (placement, rate) done, "
        f"{count[State.RUNNING]} running, {count[State.WAITING]} queued, "
        f"{count[State.FAIL]} failed (re-queued)",
        ["worker", "#trials done", "now", "#seeds done", "#since"],
        caption=best or "nothing complete yet",
    )
    now = time.time()
    workers: dict[str, list] = {}
    for t in trials:
        if "worker" in t.user_attrs and t.state in (State.COMPLETE, State.RUNNING, State.FAIL):
            workers.setdefault(t.user_attrs["worker"], []).append(t)
    for worker, mine in workers.items():
        running = [t for t in mine if t.state == State.RUNNING]
        last = max(mine, key=lambda t: t.datetime_complete or t.datetime_start)
        when = last.datetime_complete or last.datetime_start
        table.add_row(
            worker,
            str(sum(t.state == State.COMPLETE for t in mine)),
            ("{}, rate {:g}".format(*point(running[0])) if point(running[0]) else "starting")
            if running
            else ("killed" if last.state == State.FAIL else "idle or ended"),
            str(sum(k.startswith("seed ") for k in running[0].user_attrs)) if running else "",
            f"{now - when.timestamp():.0f} s",
        )
    return table, grid > 0 and len(done) == grid


def main() -> None:
    """``python -c "import multidrop.search_workers as w; w.main()" JOB``: one worker."""
    code = 130
    with contextlib.suppress(KeyboardInterrupt):
        code = work(pathlib.Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # now: an exit through the interpreter's shutdown can abort in a C++ thread
