"""How far to trust Monte Carlo predictions: uncertainty measures, calibration and one report.

Without labels, the samples of `multidrop.mc_predict` (``return_samples=True``,
shaped ``(samples, inputs, classes)``) give the predictive entropy of their mean,
its split into the expected entropy of each sample (noise the network sees in
the data) and the mutual information between prediction and weights (BALD:
disagreement between samples, the model's own doubt), and the variation ratio.

With integer class labels, the mean gives accuracy, negative log-likelihood,
Brier score, expected calibration error (equal-width and equal-mass bins), a
reliability diagram, the selective-prediction curve (accuracy when the least
confident inputs are refused) and its area (AURC); temperature scaling, fitted
on held-out data, corrects over- or under-confidence without changing any
prediction. `evaluate_uncertainty` does all of it in one call.

All arithmetic is float64 NumPy; matplotlib is imported only to draw.

Example:
    >>> report = multidrop.evaluate_uncertainty(rewired, x_test, y_test, seed=0,
    ...                                         calibration_data=(x_val, y_val))
    >>> print(report)                        # accuracy, NLL, Brier, ECE, AURC, temperature
    >>> report.save_plots("plots")           # reliability.png, selective.png
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import pathlib
from collections.abc import Mapping

import numpy as np

from multidrop import render
from multidrop.mc import mc_predict

BINS = 15  # calibration bins, as in Guo et al. (2017)
TEMPERATURES = (1e-2, 1e2)  # the range temperature scaling searches
_ATOL = 1e-3  # how far from 1 a row of probabilities may sum (float32 softmax is well within)


# -- without labels ------------------------------------------------------------------------------


def predictive_entropy(mean_probs, axis=-1):
    """Entropy (in nats) of averaged class probabilities: 0 when certain, log(k) at most.

    Args:
        mean_probs: class probabilities, e.g. the ``mean`` of `mc_predict` on a
            model that ends in a softmax.
        axis: the class axis.

    Example:
        >>> mean, _ = multidrop.mc_predict(model, x)
        >>> multidrop.predictive_entropy(mean).argmax()      # the least certain input
    """
    p = np.asarray(mean_probs, dtype="float64")
    if p.size == 0 or np.any(p < 0) or not np.allclose(p.sum(axis=axis), 1, atol=1e-3):
        raise ValueError(
            "predictive_entropy needs probabilities that sum to 1 along axis "
            f"{axis}; got values in [{p.min() if p.size else 'empty'}, "
            f"{p.max() if p.size else 'empty'}]. If the model outputs logits, "
            "apply keras.ops.softmax (or end the model in a softmax) first."
        )
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=axis)


def expected_entropy(samples) -> np.ndarray:
    """The mean over samples of each sample's entropy (in nats): the aleatoric part.

    Args:
        samples: class probabilities shaped ``(samples, inputs, ..., classes)``, as
            ``mc_predict(..., return_samples=True)`` gives them.

    Returns:
        An array shaped ``samples.shape[1:-1]``, e.g. ``(inputs,)``.

    Example:
        >>> _, _, s = multidrop.mc_predict(model, x, return_samples=True)
        >>> multidrop.expected_entropy(s)
    """
    s = _probabilities(samples, "expected_entropy", samples=True)
    return predictive_entropy(s).mean(axis=0)


def mutual_information(samples) -> np.ndarray:
    """BALD: predictive entropy of the mean minus the expected entropy, in nats.

    It is 0 when every sample gives the same probabilities and grows as they
    disagree (at most ``log(classes)``); the inputs where it is highest are the ones
    the model would learn most from (Houlsby et al., 2011).

    Args:
        samples: class probabilities shaped ``(samples, inputs, ..., classes)``.

    Returns:
        An array shaped ``samples.shape[1:-1]``, e.g. ``(inputs,)``; never negative.

    Example:
        >>> _, _, s = multidrop.mc_predict(model, x_pool, samples=20, return_samples=True)
        >>> to_label = multidrop.mutual_information(s).argsort()[-10:]
    """
    s = _probabilities(samples, "mutual_information", samples=True)
    return np.maximum(predictive_entropy(s.mean(axis=0)) - predictive_entropy(s).mean(axis=0), 0)


def variation_ratio(samples) -> np.ndarray:
    """The share of samples whose top class is not the most common top class.

    0 when all samples agree on the class, ``1 - 1/classes`` at most.

    Args:
        samples: class probabilities shaped ``(samples, inputs, ..., classes)``.

    Returns:
        An array shaped ``samples.shape[1:-1]``, e.g. ``(inputs,)``.

    Example:
        >>> multidrop.variation_ratio(s)          # 0.4: 2 of 5 samples voted otherwise
    """
    s = _probabilities(samples, "variation_ratio", samples=True)
    votes = (s.argmax(axis=-1)[..., None] == np.arange(s.shape[-1])).sum(axis=0)
    return 1 - votes.max(axis=-1) / s.shape[0]


# -- with labels ---------------------------------------------------------------------------------


def accuracy(probs, y) -> float:
    """The share of inputs whose most probable class is the label.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``, e.g. the MC mean.
        y: integer class labels shaped ``(inputs,)``.

    Example:
        >>> multidrop.accuracy(mean, y_test)
    """
    p, y = _labelled(probs, y, "accuracy")
    return float(np.mean(p.argmax(axis=1) == y))


def nll(probs, y) -> float:
    """Mean negative log-likelihood of the labels, in nats (lower is better).

    A probability of 0 for the true class counts as the smallest positive float64,
    so one confident mistake costs about 708 nats instead of infinity.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``.
        y: integer class labels shaped ``(inputs,)``.

    Example:
        >>> multidrop.nll(mean, y_test)
    """
    p, y = _labelled(probs, y, "nll")
    return float(-np.mean(_log(p[np.arange(len(y)), y])))


def brier(probs, y) -> float:
    """Brier score: mean squared distance between probabilities and the one-hot label.

    The sum runs over classes (Brier, 1950), so it lies in [0, 2]; lower is better.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``.
        y: integer class labels shaped ``(inputs,)``.

    Example:
        >>> multidrop.brier(mean, y_test)
    """
    p, y = _labelled(probs, y, "brier")
    return float(np.mean(np.sum((p - np.eye(p.shape[1])[y]) ** 2, axis=1)))


def ece(probs, y, bins: int = BINS) -> float:
    """Expected calibration error over equal-width confidence bins.

    Confidence is the top probability; bin ``i`` holds the confidences in
    ``(i/bins, (i+1)/bins]``. The error is the mean over inputs of
    ``|accuracy - mean confidence|`` of their bin (Guo et al., 2017).

    Args:
        probs: class probabilities shaped ``(inputs, classes)``.
        y: integer class labels shaped ``(inputs,)``.
        bins: how many bins.

    Example:
        >>> multidrop.ece(mean, y_test)           # 0.05: 5 points over- or under-confident
    """
    return _ece(*_labelled(probs, y, "ece"), bins, equal_mass=False)


def adaptive_ece(probs, y, bins: int = BINS) -> float:
    """Expected calibration error over equal-mass bins (Nixon et al., 2019).

    The inputs, sorted by confidence, are cut into ``bins`` groups whose sizes
    differ by at most one; with fewer inputs than bins, each input is a bin. Less
    biased than `ece` when most confidences crowd near 1.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``.
        y: integer class labels shaped ``(inputs,)``.
        bins: how many bins.

    Example:
        >>> multidrop.adaptive_ece(mean, y_test)
    """
    return _ece(*_labelled(probs, y, "adaptive_ece"), bins, equal_mass=True)


def selective_curve(probs, y) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy against coverage when the least confident inputs are refused.

    Inputs are ranked by top probability (ties keep their order); point ``k`` is
    the accuracy on the ``k`` most confident inputs, at coverage ``k / inputs``.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``.
        y: integer class labels shaped ``(inputs,)``.

    Returns:
        ``(coverage, accuracy)``, two arrays shaped ``(inputs,)``; coverage rises to 1.

    Example:
        >>> coverage, acc = multidrop.selective_curve(mean, y_test)
        >>> acc[coverage >= 0.8][0]                # accuracy when 20% are refused
    """
    p, y = _labelled(probs, y, "selective_curve")
    order = np.argsort(-p.max(axis=1), kind="stable")
    correct = (p.argmax(axis=1) == y)[order]
    k = np.arange(1, len(y) + 1)
    return k / len(y), np.cumsum(correct) / k


def aurc(probs, y) -> float:
    """Area under the risk-coverage curve (Geifman et al., 2019): the mean error rate
    over every coverage of `selective_curve`. Lower is better; 0 only without errors.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``.
        y: integer class labels shaped ``(inputs,)``.

    Example:
        >>> multidrop.aurc(mean, y_test)
    """
    _, acc = selective_curve(probs, y)
    return float(np.mean(1 - acc))


# -- temperature scaling -------------------------------------------------------------------------


def fit_temperature(probs, y) -> float:
    """The temperature ``T`` whose `temperature_scale` minimizes the NLL of ``y``.

    ``T > 1`` softens over-confident probabilities, ``T < 1`` sharpens them; the
    predicted classes never change. Fit on held-out data, not on the data you
    report on. A golden-section search over ``log T`` in `TEMPERATURES` (the NLL
    is convex in ``1/T``, so it has one minimum); a result at an end of that range
    means the data asked for more.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``, e.g. the MC mean
            on a validation set.
        y: integer class labels shaped ``(inputs,)``.

    Returns:
        ``T``, a float in `TEMPERATURES`.

    Example:
        >>> t = multidrop.fit_temperature(mean_val, y_val)
        >>> calibrated = multidrop.temperature_scale(mean_test, t)
    """
    p, y = _labelled(probs, y, "fit_temperature")
    logits, rows = _log(p), np.arange(len(y))

    def loss(log_t: float) -> float:
        return -np.mean(_log_softmax(logits / math.exp(log_t))[rows, y])

    low, high = (math.log(t) for t in TEMPERATURES)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > 1e-6:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(math.exp((low + high) / 2))


def temperature_scale(probs, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)``: the same top classes, with sharper or softer odds.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``.
        temperature: a positive float, e.g. from `fit_temperature`.

    Returns:
        float64 probabilities shaped like ``probs``.

    Example:
        >>> multidrop.temperature_scale([[0.9, 0.1]], 2.0)       # [[0.75, 0.25]]
    """
    p = _probabilities(probs, "temperature_scale")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {temperature!r}.")
    if not (0 < temperature < math.inf):
        raise ValueError(
            f"temperature must be positive and finite, got {temperature!r}; "
            "fit one with multidrop.fit_temperature(probs_val, y_val)."
        )
    return np.exp(_log_softmax(_log(p) / temperature))


# -- drawing -------------------------------------------------------------------------------------


def reliability_diagram(probs, y, bins: int = BINS):
    """Accuracy against confidence per equal-width bin; a calibrated model lies on the diagonal.

    Args:
        probs: class probabilities shaped ``(inputs, classes)``, or a mapping from a
            legend label to such arrays to draw several curves on one plot.
        y: integer class labels shaped ``(inputs,)``.
        bins: how many bins.

    Returns:
        A ``matplotlib.figure.Figure`` (no pyplot state is touched); save it with
        ``figure.savefig("reliability.png")``.

    Example:
        >>> figure = multidrop.reliability_diagram({"MC mean": mean, "scaled": scaled}, y)
        >>> figure.savefig("reliability.png")
    """
    curves = probs if isinstance(probs, Mapping) else {"predictions": probs}
    figure, axes = _figure("Reliability diagram")
    axes.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    for label, p in curves.items():
        count, acc, conf = _bins(*_labelled(p, y, "reliability_diagram"), bins, equal_mass=False)
        error = float(np.sum(count * np.abs(acc - conf)) / np.sum(count))
        kept = count > 0
        axes.plot(conf[kept], acc[kept], "o-", label=f"{label} (ECE {error:.3f})")
    axes.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left")
    return figure


def _selective_diagram(probs, y):
    coverage, acc = selective_curve(probs, y)
    figure, axes = _figure("Selective prediction: refuse the least confident")
    axes.plot(coverage, acc, label=f"MC mean (AURC {aurc(probs, y):.4f})")
    axes.set(xlabel="coverage (share of inputs answered)", ylabel="accuracy", xlim=(0, 1))
    axes.legend(loc="lower left")
    return figure


def _figure(title: str):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Drawing needs matplotlib: pip install matplotlib (or multidrop[demo])."
        ) from error
    figure = Figure(figsize=(5, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return figure, axes


# -- the report ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UncertaintyReport:
    """What `evaluate_uncertainty` measured; ``str()`` gives a table.

    Attributes:
        accuracy, nll, brier, ece, adaptive_ece, aurc: of the MC mean on ``(x, y)``.
        mutual_information: BALD per input, shaped ``(inputs,)``.
        samples: Monte Carlo samples per input.
        from_logits: whether the model's outputs were read as logits (softmax applied).
        temperature, nll_scaled, ece_scaled: the temperature fitted on the
            calibration data and the NLL and ECE on ``(x, y)`` after scaling by it;
            ``None`` without calibration data.
        mean: the MC mean probabilities on ``x``, shaped ``(inputs, classes)``.
        labels: ``y``.
    """

    accuracy: float
    nll: float
    brier: float
    ece: float
    adaptive_ece: float
    aurc: float
    mutual_information: np.ndarray = dataclasses.field(repr=False)
    samples: int
    from_logits: bool
    mean: np.ndarray = dataclasses.field(repr=False)
    labels: np.ndarray = dataclasses.field(repr=False)
    temperature: float | None = None
    nll_scaled: float | None = None
    ece_scaled: float | None = None

    def __str__(self) -> str:
        caption = f"{len(self.labels)} inputs, {self.samples} Monte Carlo samples each" + (
            ", outputs read as logits" if self.from_logits else ""
        )
        table = render.table(
            "Uncertainty (MC mean)", ["metric", "#value", "better"], caption=caption
        )
        rows = [
            ("accuracy", self.accuracy, "higher"),
            ("NLL", self.nll, "lower"),
            ("Brier score", self.brier, "lower"),
            (f"ECE ({BINS} bins)", self.ece, "lower"),
            (f"adaptive ECE ({BINS} bins)", self.adaptive_ece, "lower"),
            ("AURC", self.aurc, "lower"),
            ("mutual information (mean)", float(np.mean(self.mutual_information)), ""),
        ]
        if self.temperature is not None:
            rows += [
                ("temperature (fitted on calibration data)", self.temperature, ""),
                ("NLL after temperature scaling", self.nll_scaled, "lower"),
                ("ECE after temperature scaling", self.ece_scaled, "lower"),
            ]
        for name, value, better in rows:
            table.add_row(name, f"{value:.4f}", better)
        return render.text(table)

    def save_plots(self, directory) -> tuple[pathlib.Path, pathlib.Path]:
        """Write ``reliability.png`` and ``selective.png`` into ``directory`` (made if missing).

        Returns:
            The two paths, reliability first.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        curves = {"MC mean": self.mean}
        if self.temperature is not None:
            curves[f"scaled, T={self.temperature:.2f}"] = temperature_scale(
                self.mean, self.temperature
            )
        paths = directory / "reliability.png", directory / "selective.png"
        reliability_diagram(curves, self.labels).savefig(paths[0], dpi=100)
        _selective_diagram(self.mean, self.labels).savefig(paths[1], dpi=100)
        return paths


def evaluate_uncertainty(
    model, x, y, samples: int = 30, *, seed=None, calibration_data=None, batch_size=None
) -> UncertaintyReport:
    """Monte Carlo predictions on labelled data, measured: accuracy, NLL, Brier, ECE, AURC, BALD.

    The model must have one output of class scores shaped ``(inputs, classes)``.
    Outputs with a negative value or a row not summing to 1 (within 1e-3) are
    read as logits, and a softmax is applied to each sample before averaging.

    Args:
        model: a Keras classifier with dropout layers (see `multidrop.mc_predict`).
        x: the inputs, batch first.
        y: integer class labels shaped ``(inputs,)``.
        samples: Monte Carlo samples per input.
        seed: passed to `mc_predict`: an int makes the report reproducible.
        calibration_data: ``(x_cal, y_cal)``, held-out data on which to fit a
            temperature (`fit_temperature`); the report then also gives the NLL and
            ECE on ``(x, y)`` after scaling.
        batch_size: passed to `mc_predict`.

    Returns:
        An `UncertaintyReport`.

    Example:
        >>> rewired = multidrop.insert_dropout(model, 0.2)
        >>> report = multidrop.evaluate_uncertainty(rewired, x_test, y_test, seed=0,
        ...                                         calibration_data=(x_val, y_val))
        >>> print(report); report.save_plots("plots")
    """
    if calibration_data is not None and (
        not isinstance(calibration_data, (tuple, list)) or len(calibration_data) != 2
    ):
        raise TypeError(
            "calibration_data must be a pair (x_cal, y_cal) of held-out inputs and labels, "
            f"got {type(calibration_data).__name__}."
        )
    test = _mc_samples(model, x, samples, seed, batch_size)
    cal = None
    if calibration_data is not None:
        cal = _mc_samples(model, calibration_data[0], samples, seed, batch_size)
    from_logits = any(_looks_like_logits(s) for s in (test, cal) if s is not None)
    if from_logits:
        test = np.exp(_log_softmax(test))
        cal = None if cal is None else np.exp(_log_softmax(cal))
    mean, y = _labelled(test.mean(axis=0), y, "evaluate_uncertainty")
    temperature = nll_scaled = ece_scaled = None
    if cal is not None:
        temperature = fit_temperature(cal.mean(axis=0), calibration_data[1])
        calibrated = temperature_scale(mean, temperature)
        nll_scaled, ece_scaled = nll(calibrated, y), ece(calibrated, y)
    return UncertaintyReport(
        accuracy=accuracy(mean, y),
        nll=nll(mean, y),
        brier=brier(mean, y),
        ece=ece(mean, y),
        adaptive_ece=adaptive_ece(mean, y),
        aurc=aurc(mean, y),
        mutual_information=mutual_information(test),
        samples=samples,
        from_logits=from_logits,
        mean=mean,
        labels=y,
        temperature=temperature,
        nll_scaled=nll_scaled,
        ece_scaled=ece_scaled,
    )


# -- private helpers -----------------------------------------------------------------------------


def _mc_samples(model, x, samples, seed, batch_size) -> np.ndarray:
    """``mc_predict``'s samples as float64 ``(samples, inputs, classes)``, or a clear error."""

    drawn = mc_predict(model, x, samples, seed=seed, batch_size=batch_size, return_samples=True)[2]
    if not isinstance(drawn, np.ndarray):
        raise TypeError(
            f"evaluate_uncertainty needs a model with one output; model '{model.name}' has "
            "several. Pick one: keras.Model(model.inputs, model.outputs[i])."
        )
    if drawn.ndim != 3 or drawn.shape[-1] < 2:
        raise ValueError(
            "evaluate_uncertainty needs class scores shaped (inputs, classes), classes >= 2; "
            f"model '{model.name}' outputs shape {drawn.shape[1:]}. For one sigmoid unit, "
            "end the model in Dense(2, activation='softmax') instead."
        )
    return drawn.astype("float64")


def _looks_like_logits(s: np.ndarray) -> bool:
    return bool(np.any(s < 0) or not np.allclose(s.sum(axis=-1), 1, atol=_ATOL))


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, np.finfo("float64").tiny))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _probabilities(probs, where: str, *, samples: bool = False) -> np.ndarray:
    """``probs`` as float64, shaped ``(inputs, classes)`` or, with ``samples``,
    ``(samples, inputs, ..., classes)``; else an error naming ``where``, the problem and the fix."""
    try:
        p = np.asarray(probs, dtype="float64")
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{where}: probs must be an array of numbers, got {probs!r:.80}."
        ) from error
    shape = "(samples, inputs, ..., classes)" if samples else "(inputs, classes)"
    if (p.ndim < 3 if samples else p.ndim != 2) or p.size == 0 or p.shape[-1] < 2:
        raise ValueError(
            f"{where} needs class probabilities shaped {shape} with at least one input and "
            f"two classes; got shape {p.shape}."
            + (" Pass the samples of mc_predict(..., return_samples=True)." if samples else "")
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0) or not np.allclose(p.sum(-1), 1, atol=_ATOL):
        raise ValueError(
            f"{where} needs probabilities (non-negative, each row summing to 1 along the last "
            f"axis); got values in [{p.min()}, {p.max()}] and row sums in "
            f"[{p.sum(-1).min()}, {p.sum(-1).max()}]. If these are logits, apply a softmax "
            "first (evaluate_uncertainty does it for you)."
        )
    return p


def _labelled(probs, y, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(inputs, classes)`` and integer labels in range, checked together."""
    p = _probabilities(probs, where)
    labels = np.asarray(y)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"{where} needs integer class labels, got an array of {labels.dtype}; "
            "for one-hot labels pass y.argmax(-1)."
        )
    if labels.shape != p.shape[:1]:
        raise ValueError(
            f"{where} needs one label per input: probs has shape {p.shape}, y has shape "
            f"{labels.shape}; pass y shaped ({p.shape[0]},)"
            + (" (for one-hot labels, y.argmax(-1))." if labels.ndim == 2 else ".")
        )
    if labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(
            f"{where}: labels must lie in [0, {p.shape[1] - 1}] for {p.shape[1]} classes, "
            f"got values in [{labels.min()}, {labels.max()}]."
        )
    return p, labels.astype("int64")


def _check_bins(bins) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
        raise TypeError(f"bins must be an int, got {bins!r}.")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}; {BINS} is the usual choice.")


def _bins(p: np.ndarray, y: np.ndarray, bins: int, *, equal_mass: bool):
    """Per bin: the number of inputs, their accuracy and their mean confidence (0 when empty)."""
    _check_bins(bins)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype("float64")
    if equal_mass:
        groups = np.array_split(np.argsort(confidence, kind="stable"), bins)
        index = np.empty(len(y), dtype="int64")
        for i, group in enumerate(groups):
            index[group] = i
    else:  # bin i holds (i/bins, (i+1)/bins]
        index = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence, side="left")
    count = np.bincount(index, minlength=bins).astype("float64")
    safe = np.maximum(count, 1)
    acc = np.bincount(index, weights=correct, minlength=bins) / safe
    conf = np.bincount(index, weights=confidence, minlength=bins) / safe
    return count, acc, conf


def _ece(p: np.ndarray, y: np.ndarray, bins: int, *, equal_mass: bool) -> float:
    count, acc, conf = _bins(p, y, bins, equal_mass=equal_mass)
    return float(np.sum(count * np.abs(acc - conf)) / len(y))
