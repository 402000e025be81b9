"""Search where dropout goes and at what rate, by fine-tuning clones of one loaded model.

Every trial is a fresh `multidrop.insert_dropout` clone of the same model (never a
reload; the model itself is never trained), fine-tuned once per seed and scored on
the validation data. Optuna proposes the trials (a grid, random draws, or TPE, its
Bayesian sampler) and keeps the books: with ``directory=`` they live in a SQLite
file there, so a second call resumes where the first stopped and trains nothing
twice.

Rate 0.0 is the baseline: the model without added dropout, the same for every
placement, so it is trained once per seed and shown on every placement's row.

Each (placement, rate, seed) training runs, in this order::

    keras.utils.set_random_seed(seed)
    clone = multidrop.insert_dropout(model, rate, where=placement, kind=kind, seed=seed)
    clone.compile(optimizer, loss, metrics); clone.fit(*train, epochs=epochs, batch_size=...)

so pasting `SearchResult.best_call` after the same ``set_random_seed`` and training
it the same way gives back the same model and score.

With ``storage=`` (a database URL) or ``workers=`` above 1, the trainings run in worker
processes that share one Optuna study: on this machine, and on any other machine that
makes the same call on the same URL (see `multidrop.search_workers`). The result is the
one a single process gives.

Each clone is freed when its trial ends; ``benchmarks/search_memory.py`` measures the
resident memory over 60 trials. It stays flat on PyTorch and JAX. On TensorFlow every
newly trained Keras model leaves about 12 MB of traced graphs behind, whoever builds
the model (``keras.models.clone_model`` too) and whether or not
``keras.backend.clear_session()`` is called; a worker process is replaced once it has
grown by 30 MB, so for long searches on TensorFlow pass ``workers=1`` with a ``storage``.

Example:
    >>> from multidrop import select
    >>> result = multidrop.search(
    ...     model, (x, y), (x_val, y_val), where={"head": select.last(2), "all": "activations"},
    ...     rates=[0.0, 0.2, 0.5], loss="sparse_categorical_crossentropy", seeds=5,
    ...     directory="search")
    >>> print(result)                 # placement x rate -> val_loss mean ± std, gap
    >>> result.best_call
    "multidrop.insert_dropout(model, 0.2, where=select.last(2), seed=0)"
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import math
import numbers
import os
import pathlib
import tempfile
import time
import tokenize
import uuid
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np

import multidrop
from multidrop import render, search_workers, select
from multidrop.kinds import check_kind, check_rate_value
from multidrop.options import check_int

STRATEGIES = ("grid", "random", "bayes")
STUDY_NAME = "multidrop-search"
DATABASE, BEST_MODEL, HEATMAP = "search.db", "best.keras", "heatmap.png"
_MINIMIZED = ("loss", "error", "mae", "mse", "crossentropy")
_MAXIMIZED = ("accuracy", "auc", "precision", "recall", "score")


def search(
    model,
    train,
    validation,
    *,
    where: Mapping,
    rates: Sequence[float],
    kind="dropout",
    loss,
    optimizer="adam",
    metrics=("accuracy",),
    objective: str | tuple[str, str] = "val_loss",
    epochs: int = 3,
    seeds: int = 1,
    batch_size: int = 32,
    directory: str | os.PathLike | None = None,
    strategy: str = "grid",
    n_trials: int | None = None,
    storage: str | None = None,
    workers: int = 1,
    study: str = STUDY_NAME,
    verbose: bool = False,
) -> SearchResult:
    """Fine-tune ``model`` with dropout at each placement and rate; find the best on validation.

    All arguments are checked, every placement is planned on ``model`` and one
    batch is evaluated before any training, so bad input fails at once.

    Args:
        model: a built Keras model (Functional, Sequential or subclassed); only read.
        train: ``(x, y)`` arrays, or a dataset yielding ``(x, y)`` batches
            (``tf.data.Dataset``, torch ``DataLoader``, ``keras.utils.PyDataset``).
        validation: the same, scored after training.
        where: named placements, ``{"head": select.last(2), "all": "activations"}``;
            each value is anything `multidrop.insert_dropout` takes as ``where``.
        rates: dropout rates in [0, 1); 0.0 is the baseline without added dropout.
        kind: the dropout kind, as in `multidrop.insert_dropout`.
        loss, optimizer, metrics: passed to ``compile``; an optimizer or metric
            object is copied from its config for every training.
        objective: ``"val_loss"`` (minimized), ``"val_accuracy"`` (maximized) or
            another ``"val_<metric>"`` the compiled model reports; a name whose
            direction cannot be guessed is given as ``("val_auc", "max")``.
        epochs: training epochs per trial.
        seeds: trainings per (placement, rate), with seeds 0, 1, ..., seeds - 1.
        batch_size: for ``(x, y)`` arrays (datasets bring their own batches).
        directory: where the Optuna study (``search.db``), the best model
            (``best.keras``) and the heat map (``heatmap.png``) go. A second call
            with the same directory and settings resumes: finished trainings are
            read back, not rerun. None keeps everything in memory.
        strategy: ``"grid"`` (every placement x rate), ``"random"`` or ``"bayes"``
            (Optuna's TPE) for ``n_trials`` proposals.
        n_trials: trials for ``random`` and ``bayes`` (default: the grid's size);
            a pair proposed again is read back, not retrained.
        storage: a database URL for the Optuna study, e.g.
            ``"postgresql+psycopg://user:password@host/db"``, shared by every worker
            and every machine that makes the same call on it (each (placement, rate,
            seed) is trained once among them; the result is the one a single process
            gives). None: ``search.db`` in ``directory`` (or a temporary file).
        workers: processes that train on this machine. With ``workers=1`` and no
            ``storage`` the trainings run in this process; otherwise in worker
            processes that take queued trials from the study, are replaced when
            killed (their trial is queued again) or when their memory has grown, and
            need ``(x, y)`` arrays, ``strategy="grid"`` and placements written with
            ``select``, layer names or ``"activations"``.
        study: the study's name in ``storage``: searches with other names on one
            storage are kept apart; one name with other settings or data is refused.
        verbose: print one line per training.

    Returns:
        A `SearchResult`: ``print()`` it for the table; ``.best_call`` to paste.

    Example:
        >>> result = multidrop.search(model, (x, y), (xv, yv), where={"all": "activations"},
        ...                           rates=[0.0, 0.3], loss="mse", objective="val_loss")
        >>> result.best_call
        'multidrop.insert_dropout(model, 0.3, where=select.activations(), seed=0)'
    """
    try:
        import optuna
    except ImportError as error:
        raise ImportError(
            "multidrop.search needs Optuna: pip install 'multidrop[search]'"
        ) from error
    run = _Search(
        model,
        _check_data(train, "train"),
        _check_data(validation, "validation"),
        _check_where(where),
        _check_rates(rates),
        kind,
        loss,
        optimizer,
        tuple(metrics) if isinstance(metrics, (list, tuple)) else metrics,
        *_check_objective(objective),
        epochs,
        seeds,
        batch_size,
        verbose,
    )
    run.check(strategy, n_trials, directory)
    apart = run.check_workers(workers, storage, study, strategy)
    folder = None if directory is None else pathlib.Path(directory)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with contextlib.ExitStack() as stack:
            if apart and storage is None:
                where = folder or pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
                where.mkdir(parents=True, exist_ok=True)
                storage = f"sqlite:///{(where / DATABASE).resolve()}"
            store = None if storage is None else search_workers.storage(storage)
            if store is not None:
                stack.callback(store.engine.dispose)  # closes the pool's connections
            run.preflight()
            found = run.study(optuna, strategy, folder, store, study)
            if apart:
                run.in_workers(found, storage, workers, stack)
            else:
                run.optimize(found, strategy, n_trials)
            return run.result(found, folder)
    finally:
        optuna.logging.set_verbosity(verbosity)


@dataclasses.dataclass
class SearchResult:
    """What `search` found.

    Attributes:
        rows: one dict per (placement, rate) tried: ``placement``, ``where`` (its
            code), ``sites`` (dropout layers added), ``rate``, ``mean`` and
            ``std`` of the objective over seeds (std is nan for one seed),
            ``gap`` (mean of training minus validation value, both in inference
            mode), ``n`` (seeds) and ``scores`` (one per seed, seed 0 first).
        best: the row with the best mean.
        best_call: the ``insert_dropout`` call that makes the best configuration,
            to paste with ``multidrop``, ``select`` and ``model`` in scope (its seed
            is 0); for the baseline, ``model`` itself.
        best_model: the best configuration fine-tuned with seed 0.
        objective: the validation metric; ``maximize`` tells its direction.
        trained: trainings this call ran (0 when a resumed search was complete).
    """

    rows: list[dict]
    best: dict
    best_call: str
    best_model: keras.Model = dataclasses.field(repr=False)
    objective: str
    maximize: bool
    trained: int

    def table(self):
        """The rows as a ``rich`` table, the best marked with ``*``."""
        base = {r["placement"]: r["mean"] for r in self.rows if r["rate"] == 0}
        n = max(r["n"] for r in self.rows)
        metric = self.objective.removeprefix("val_")
        table = render.table(
            f"multidrop search: {self.objective} ({'higher' if self.maximize else 'lower'} "
            f"is better), mean ± std over {n} seed{'s' * (n != 1)}",
            [
                "",
                "placement",
                "where",
                "#sites",
                "#rate",
                f"#{self.objective}",
                "#vs no dropout",
                "#gap",
            ],
            caption=f"gap: training {metric} minus {self.objective}; sites: dropout layers added",
        )
        for row in self.rows:
            versus = row["mean"] - base[row["placement"]] if row["placement"] in base else None
            table.add_row(
                "*" if row is self.best else "",
                row["placement"],
                row["where"],
                str(row["sites"]),
                f"{row['rate']:g}",
                _plus_minus(row["mean"], row["std"]),
                "-" if versus is None or row["rate"] == 0 else f"{versus:+.4f}",
                f"{row['gap']:+.4f}",
            )
        return table

    def __str__(self) -> str:
        return render.text(self.table(), f"best: {self.best_call}")

    def save_heatmap(self, path: str | os.PathLike) -> pathlib.Path:
        """Draw placement x rate, coloured by the mean objective, into a PNG at ``path``."""
        from matplotlib.figure import Figure

        places = list(dict.fromkeys(r["placement"] for r in self.rows))
        rates = sorted({r["rate"] for r in self.rows})
        means = np.full((len(places), len(rates)), np.nan)
        figure = Figure(
            figsize=(2.2 + 1.3 * len(rates), 1.4 + 0.6 * len(places)), layout="constrained"
        )
        axes = figure.add_subplot()
        for row in self.rows:
            means[places.index(row["placement"]), rates.index(row["rate"])] = row["mean"]
        image = axes.imshow(
            np.ma.masked_invalid(means),
            aspect="auto",
            cmap="viridis" if self.maximize else "viridis_r",
        )
        for row in self.rows:
            red, green, blue, _ = image.cmap(image.norm(row["mean"]))
            std = "" if math.isnan(row["std"]) else f"\n± {row['std']:.3f}"
            axes.text(
                rates.index(row["rate"]),
                places.index(row["placement"]),
                f"{row['mean']:.3f}{std}",
                ha="center",
                va="center",
                fontsize=9,
                fontweight="bold" if row is self.best else "normal",
                color="black" if 0.3 * red + 0.6 * green + 0.1 * blue > 0.5 else "white",
            )
        axes.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        axes.set_yticks(range(len(places)), places)
        axes.set_xlabel("dropout rate")
        axes.set_ylabel("placement")
        figure.colorbar(image, label=self.objective)
        figure.suptitle(
            f"{self.objective}: mean ± std over seeds (brighter is better)", fontsize=10
        )
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        return path


@dataclasses.dataclass
class _Search:
    """One search: the checked arguments, the results so far, and the training of one trial."""

    model: keras.Model
    train: tuple | object
    validation: tuple | object
    where: dict
    rates: tuple[float, ...]
    kind: object
    loss: object
    optimizer: object
    metrics: object
    objective: str
    maximize: bool
    epochs: int
    seeds: int
    batch_size: int
    verbose: bool
    sites: dict = dataclasses.field(default_factory=dict)
    done: dict = dataclasses.field(default_factory=dict)  # (placement, rate, seed) -> scores
    trained: int = 0
    shared: Callable | None = None  # in a worker: wait for the same model, read finished seeds
    note: str = ""  # added to verbose lines
    call: str = ""  # the search call that trains, in worker processes

    def check(self, strategy, n_trials, directory) -> None:
        check_kind(self.kind)
        check_int(self.epochs, "epochs", minimum=1)
        check_int(self.seeds, "seeds", minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_int(n_trials, "n_trials", minimum=1, none=True)
        if strategy not in STRATEGIES:
            choices = ", ".join(map(repr, STRATEGIES))
            raise ValueError(f"strategy={strategy!r} is not one of {choices}.")
        if strategy == "grid" and n_trials is not None:
            raise ValueError(
                f"n_trials={n_trials} is for strategy='random' or 'bayes'; the grid tries "
                f"every placement x rate ({len(self.where) * len(self.rates)} trials)."
            )
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path or None, got {directory!r}.")
        for name, spec in self.where.items():
            self.sites[name] = len(multidrop.plan(self.model, 0.5, where=spec, kind=self.kind))

    def check_workers(self, workers, storage, study, strategy) -> bool:
        """Whether the trainings run in worker processes; refuses what they cannot take."""
        check_int(workers, "workers", minimum=1)
        if not isinstance(study, str) or not study:
            raise ValueError(f"study must be a non-empty name, got {study!r}.")
        if storage is not None and not isinstance(storage, str):
            raise TypeError(f"storage must be a database URL string or None, got {storage!r}.")
        if workers == 1 and storage is None:
            return False
        if strategy != "grid":
            raise ValueError(
                f"strategy={strategy!r} runs in one process; workers and storage share a "
                "grid: use strategy='grid', or workers=1 without storage."
            )
        for name, data in (("train", self.train), ("validation", self.validation)):
            if not isinstance(data, tuple):
                raise TypeError(
                    f"{name} is a {type(data).__name__}; worker processes need {name}=(x, y) "
                    "arrays (or use workers=1 without storage)."
                )
        scope = {"select": select, "keras": keras, "multidrop": multidrop}
        for name, spec in self.where.items():
            names = [s.name for s in multidrop.plan(self.model, 0.5, where=spec, kind=self.kind)]
            try:
                again = eval(_code(spec), scope)
                again = multidrop.plan(self.model, 0.5, where=again, kind=self.kind)
                same = names == [s.name for s in again]
            except Exception:
                same = False
            if not same:
                raise ValueError(
                    f"where[{name!r}] = {spec!r} cannot be sent to worker processes; write it "
                    "with select (e.g. select.last(2)), layer names or 'activations'."
                )
        if _code(self.kind) != repr(self.kind) and not isinstance(self.kind, type):
            raise ValueError(
                f"kind={self.kind!r} cannot be sent to worker processes; pass its name."
            )
        return True

    def in_workers(self, study, url: str, workers: int, stack) -> None:
        """Queue the grid's missing points; train them in ``workers`` processes."""
        grid = [(p, r) for p in self.where for r in self.rates]
        search_workers.enqueue(study, grid)
        self.call = uuid.uuid4().hex[:12]
        if search_workers.missing(study, grid):
            folder = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
            job = search_workers.write_job(folder, self, url, study.study_name, self.call)
            search_workers.start(job, workers, study, grid, self.verbose)
        trials = study.get_trials(deepcopy=False)
        self.read(trials)
        self.trained = sum(
            len(t.user_attrs.get(f"trained {self.call}", ()))
            for t in trials
            if t.state.name == "COMPLETE"
        )

    def read(self, trials) -> None:
        """Every finished training recorded in ``trials`` (of any state) into ``done``."""
        for trial in trials:
            for name, scores in trial.user_attrs.items():
                if name.startswith("seed ") and len(trial.params) == 2:
                    key = _key(trial.params["placement"], trial.params["rate"], int(name[5:]))
                    self.done[key] = tuple(scores)

    def preflight(self) -> None:
        """Compile a copy and evaluate one batch: the loss, metrics, data and objective fit."""
        net = _copy(self.model)
        self.compile(net)
        for data in (self.train, self.validation):
            if isinstance(data, tuple):
                x, y = (
                    keras.tree.map_structure(lambda a: a[: self.batch_size], part) for part in data
                )
                logs = net.evaluate(x, y, verbose=0, return_dict=True)
            else:
                logs = net.evaluate(data, steps=1, verbose=0, return_dict=True)
        metric = self.objective.removeprefix("val_")
        if metric not in logs:
            raise ValueError(
                f"objective={self.objective!r}, but the compiled model reports "
                f"{sorted(logs)}; use objective='val_<one of these>' or add the metric to "
                "metrics=."
            )

    def compile(self, net) -> None:
        metrics = self.metrics
        if isinstance(metrics, tuple):
            metrics = [_fresh(m) for m in metrics]
        net.compile(optimizer=_fresh(self.optimizer), loss=self.loss, metrics=metrics)

    def settings(self) -> dict:
        """What a resumed search must share with the one it resumes."""
        return {
            "model": f"{self.model.count_params()} weights, "
            f"sha256 {_digest(self.model.get_weights())}",
            "data": ", ".join(
                f"{name} {_rows(data)} sha256 {_digest(keras.tree.flatten(data))}"
                if isinstance(data, tuple)
                else f"{name} {type(data).__name__}"
                for name, data in (("train", self.train), ("validation", self.validation))
            ),
            "where": {name: _code(spec) for name, spec in self.where.items()},
            "rates": list(self.rates),
            "kind": _code(self.kind),
            "objective": self.objective,
            "epochs": self.epochs,
            "seeds": self.seeds,
            "batch_size": self.batch_size,
        }

    def study(
        self, optuna, strategy: str, folder: pathlib.Path | None, store=None, name=STUDY_NAME
    ):
        space = {"placement": list(self.where), "rate": list(self.rates)}
        sampler = {
            "grid": lambda: optuna.samplers.GridSampler(space, seed=0),
            "random": lambda: optuna.samplers.RandomSampler(seed=0),
            "bayes": lambda: optuna.samplers.TPESampler(seed=0),
        }[strategy]()
        storage, place = store, "this storage"
        if store is not None:
            place = f"storage={_shown(store)!r} (study {name!r})"
        elif folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            storage, place = (
                f"sqlite:///{(folder / DATABASE).resolve()}",
                f"directory={str(folder)!r}",
            )
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            load_if_exists=True,
            sampler=sampler,
            direction="maximize" if self.maximize else "minimize",
        )
        mine = json.loads(json.dumps(self.settings()))  # as the database gives it back
        theirs = study.user_attrs.get("settings")
        if theirs is None:
            study.set_user_attr("settings", mine)
        elif theirs != mine:
            changed = [
                f"{k}: {theirs.get(k)!r} there, {mine[k]!r} now"
                for k in mine
                if theirs.get(k) != mine[k]
            ]
            raise ValueError(
                f"{place} holds a search with other settings "
                f"({'; '.join(changed)}). Pass the same settings and data to resume it, or "
                "another directory or study name to start a new search."
            )
        self.read(study.get_trials(deepcopy=False))
        return study

    def optimize(self, study, strategy: str, n_trials: int | None) -> None:
        import optuna

        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if strategy == "grid":
            # A resumed grid asks for exactly the pairs not finished yet. (GridSampler counts a
            # failed or interrupted trial's point as visited and would not offer it again.)
            finished = {(t.params["placement"], t.params["rate"]) for t in complete}
            missing = [(p, r) for p in self.where for r in self.rates if (p, r) not in finished]
            if trials:
                for placement, rate in missing:
                    study.enqueue_trial({"placement": placement, "rate": rate})
            left = len(missing)
        else:
            left = (n_trials or len(self.where) * len(self.rates)) - len(complete)
        if left > 0:
            study.optimize(self.trial, n_trials=left)

    def trial(self, trial) -> float:
        """One Optuna trial: a (placement, rate), trained once per seed not trained yet."""
        placement = trial.suggest_categorical("placement", list(self.where))
        rate = trial.suggest_categorical("rate", list(self.rates))
        if self.shared is not None:
            self.shared(trial)
        trained = list(trial.user_attrs.get(f"trained {self.call}", ()))  # a retry's inheritance
        for seed in range(self.seeds):
            key = _key(placement, rate, seed)
            if key not in self.done:
                net, scores = self.fit(placement, rate, seed, self.note)
                del net
                gc.collect()
                self.done[key] = scores
                self.trained += 1
                trained.append(seed)
            trial.set_user_attr(f"seed {seed}", list(self.done[key]))  # stored at once
            if self.call and trained:
                trial.set_user_attr(f"trained {self.call}", trained)
        return float(np.mean([self.done[_key(placement, rate, s)][0] for s in range(self.seeds)]))

    def fit(self, placement: str, rate: float, seed: int, note: str = ""):
        """Train one clone; return it with its (validation, training) objective values."""
        start = time.perf_counter()
        keras.utils.set_random_seed(seed)
        if rate == 0:
            net = _copy(self.model)
        else:
            net = multidrop.insert_dropout(
                self.model, rate, where=self.where[placement], kind=self.kind, seed=seed
            )
        self.compile(net)
        if isinstance(self.train, tuple):
            net.fit(*self.train, batch_size=self.batch_size, epochs=self.epochs, verbose=0)
        else:
            net.fit(self.train, epochs=self.epochs, verbose=0)
        scores = (self.score(net, self.validation), self.score(net, self.train))
        if self.verbose:
            print(
                f"{placement if rate else 'no dropout':>12}  rate {rate:<5g} seed {seed:<3d} "
                f"{self.objective} {scores[0]:.4f}  ({time.perf_counter() - start:.1f} s){note}",
                flush=True,
            )
        return net, scores

    def score(self, net, data) -> float:
        metric = self.objective.removeprefix("val_")
        if isinstance(data, tuple):
            logs = net.evaluate(*data, batch_size=self.batch_size, verbose=0, return_dict=True)
        else:
            logs = net.evaluate(data, verbose=0, return_dict=True)
        return float(logs[metric])

    def result(self, study, folder: pathlib.Path | None) -> SearchResult:
        tried = {
            (t.params["placement"], t.params["rate"])
            for t in study.get_trials(deepcopy=False)
            if len(t.params) == 2
        }
        rows = [
            self.row(p, r)
            for p in self.where
            for r in self.rates
            if all(_key(p, r, s) in self.done for s in range(self.seeds)) and (p, r) in tried
        ]
        pick = max if self.maximize else min
        best = pick(rows, key=lambda row: row["mean"])
        model = None
        saved = None if folder is None else folder / BEST_MODEL
        if (
            saved is not None
            and saved.is_file()
            and study.user_attrs.get("best") == [best["placement"], best["rate"]]
        ):
            model = keras.saving.load_model(saved)
        if model is None:
            model, _ = self.fit(best["placement"], best["rate"], 0, "  best_model, trained again")
            if saved is not None:
                model.save(saved)
                study.set_user_attr("best", [best["placement"], best["rate"]])
        call = (
            "model  # no dropout (rate 0) scored best: fine-tune the model as it is"
            if best["rate"] == 0
            else f"multidrop.insert_dropout(model, {best['rate']!r}, where={best['where']}"
            + (f", kind={_code(self.kind)}" if self.kind != "dropout" else "")
            + ", seed=0)"
        )
        result = SearchResult(rows, best, call, model, self.objective, self.maximize, self.trained)
        if folder is not None:
            result.save_heatmap(folder / HEATMAP)
        return result

    def row(self, placement: str, rate: float) -> dict:
        runs = [self.done[_key(placement, rate, s)] for s in range(self.seeds)]
        values = np.array([value for value, _ in runs])
        return {
            "placement": placement,
            "where": _code(self.where[placement]),
            "sites": 0 if rate == 0 else self.sites[placement],
            "rate": rate,
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "gap": float(np.mean([train - value for value, train in runs])),
            "n": len(values),
            "scores": [float(v) for v in values],
        }


def _key(placement: str, rate: float, seed: int) -> tuple:
    """The baseline (rate 0) is the same model for every placement: one key for all."""
    return ("" if rate == 0 else placement, rate, seed)


def _digest(arrays) -> str:
    """The first 12 hex digits of the SHA-256 of arrays' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(array))
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:12]


def _rows(data: tuple) -> int:
    return len(keras.tree.flatten(data[0])[0])


def _shown(store) -> str:
    """A storage's URL without its password."""
    import sqlalchemy

    return sqlalchemy.engine.make_url(str(store.engine.url)).render_as_string(hide_password=True)


def _copy(model) -> keras.Model:
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def _fresh(thing):
    """A new optimizer or metric from the config of one (strings and functions as they are)."""
    if isinstance(thing, (keras.optimizers.Optimizer, keras.metrics.Metric)):
        return thing.__class__.from_config(thing.get_config())
    return thing


def _plus_minus(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _check_data(data, name: str):
    """``(x, y)`` with as many x as y, or a dataset; anything else is refused."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(
                f"{name} must be an (x, y) pair, got a {type(data).__name__} of {len(data)} items."
            )
        lengths = [len(keras.tree.flatten(part)[0]) for part in data]
        if lengths[0] != lengths[1] or lengths[0] == 0:
            raise ValueError(f"{name}=(x, y) needs as many x as y, and some: got {lengths}.")
        return tuple(data)
    if isinstance(data, (np.ndarray, Mapping, str)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"{name} must be an (x, y) tuple or a dataset of (x, y) batches (tf.data.Dataset, "
            f"torch DataLoader, keras.utils.PyDataset), got {type(data).__name__}; "
            f"for arrays pass {name}=(x, y)."
        )
    return data


def _check_where(where) -> dict:
    if not isinstance(where, Mapping):
        raise TypeError(
            f"where must be a dict of named placements, e.g. "
            f"where={{'all': {where!r}}} or {{'head': select.last(2), 'all': 'activations'}}; "
            f"got {type(where).__name__}."
        )
    if not where:
        raise ValueError("where={} names no placement; give e.g. {'all': 'activations'}.")
    for name in where:
        if not isinstance(name, str) or not name:
            raise TypeError(f"where's keys name the placements and must be strings, got {name!r}.")
    return dict(where)


def _check_rates(rates) -> tuple[float, ...]:
    if isinstance(rates, (numbers.Real, str)) or not isinstance(rates, Sequence):
        raise TypeError(f"rates must be a list of floats, e.g. [0.0, 0.2, 0.5]; got {rates!r}.")
    if not rates:
        raise ValueError("rates=[] is empty; give the rates to try, e.g. rates=[0.0, 0.2, 0.5].")
    checked = tuple(check_rate_value(r, f" in rates={list(rates)!r}") for r in rates)
    if len(set(checked)) != len(checked):
        raise ValueError(f"rates={list(rates)!r} repeats a rate; give each rate once.")
    return checked


def _check_objective(objective) -> tuple[str, bool]:
    """``(name, maximize)`` for ``"val_loss"`` or ``("val_auc", "max")``."""
    if isinstance(objective, tuple) and len(objective) == 2 and objective[1] in ("min", "max"):
        name, maximize = objective[0], objective[1] == "max"
    elif isinstance(objective, str):
        name, maximize = objective, None
    else:
        raise TypeError(
            f"objective must be 'val_<metric>' or ('val_<metric>', 'min' | 'max'), "
            f"got {objective!r}."
        )
    if not isinstance(name, str) or not name.startswith("val_"):
        raise ValueError(f"objective={name!r} must name a validation metric, e.g. 'val_loss'.")
    if maximize is None:
        metric = name.removeprefix("val_")
        if any(word in metric for word in _MINIMIZED):
            maximize = False
        elif any(word in metric for word in _MAXIMIZED):
            maximize = True
        else:
            raise ValueError(
                f"objective={name!r}: say whether it is better higher or lower, "
                f"objective=({name!r}, 'max') or ({name!r}, 'min')."
            )
    return name, maximize


def _code(spec) -> str:
    """Python source for a ``where`` (or ``kind``) value, to paste where ``select`` is in scope."""
    if isinstance(spec, select.Selector):
        return _selector_code(spec.text)
    if isinstance(spec, type):
        return (
            f"keras.layers.{spec.__name__}"
            if getattr(keras.layers, spec.__name__, None) is spec
            else f"{spec.__module__}.{spec.__qualname__}"
        )
    if isinstance(spec, tuple) and spec and all(isinstance(s, type) for s in spec):
        return f"({', '.join(map(_code, spec))},)"
    if isinstance(spec, (str, list, tuple)):
        return repr(spec)
    return getattr(spec, "__name__", repr(spec))


def _selector_code(text: str) -> str:
    """``(activations() & last(2))`` -> ``(select.activations() & select.last(2))``;
    the classes in ``layers(Dense)`` become ``keras.layers.Dense``."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.string]
    inserts, depth, layers_depth = {}, 0, None
    for before, token, after in zip([None, *tokens], tokens, [*tokens[1:], None]):
        if token.string == "(":
            depth += 1
        elif token.string == ")":
            depth -= 1
            if layers_depth is not None and depth < layers_depth:
                layers_depth = None
        elif token.type == tokenize.NAME and (before is None or before.string != "."):
            if after is not None and after.string == "(":
                inserts[token.start[1]] = "select."
                if token.string == "layers":
                    layers_depth = depth + 1
            elif layers_depth is not None:
                inserts[token.start[1]] = "keras.layers."
    return "".join(inserts.get(i, "") + char for i, char in enumerate(text))
