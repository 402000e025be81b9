"""Uncertainty measures: each one against a hand computation on small arrays, temperature
scaling on a toy with a known temperature, and evaluate_uncertainty on a trained digits model."""

import math

import keras
import numpy as np
import pytest
from keras import layers

import multidrop
from multidrop import uncertainty as u


def rows(confidences, predicted, classes=4):
    """Probabilities whose top class is ``predicted`` with probability ``confidence``,
    the rest shared evenly."""
    p = np.empty((len(confidences), classes))
    for i, (c, k) in enumerate(zip(confidences, predicted)):
        p[i] = (1 - c) / (classes - 1)
        p[i, k] = c
    return p


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# -- without labels ------------------------------------------------------------------------------


def test_entropies_mutual_information_and_variation_ratio_by_hand():
    # input 0: two confident samples that disagree; input 1: two equal, unsure samples
    samples = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.1, 0.9], [0.5, 0.5]]])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    np.testing.assert_allclose(u.predictive_entropy(samples.mean(0)), [math.log(2)] * 2)
    np.testing.assert_allclose(u.expected_entropy(samples), [h, math.log(2)])
    np.testing.assert_allclose(u.mutual_information(samples), [math.log(2) - h, 0], atol=1e-15)
    np.testing.assert_allclose(u.variation_ratio(samples), [0.5, 0])
    assert u.predictive_entropy([[1.0, 0.0]])[0] == 0


def test_bald_is_zero_when_every_sample_agrees_and_positive_when_they_disagree():
    rng = np.random.default_rng(0)
    one = softmax(rng.normal(size=(6, 5)))
    agree = np.stack([one] * 8)
    np.testing.assert_allclose(u.mutual_information(agree), 0, atol=1e-12)
    assert np.all(u.variation_ratio(agree) == 0)

    disagree = softmax(3 * rng.normal(size=(8, 6, 5)))
    bald = u.mutual_information(disagree)
    assert bald.shape == (6,) and np.all(bald > 0.05) and np.all(bald <= math.log(5))
    np.testing.assert_allclose(  # the decomposition: total = aleatoric + epistemic
        u.predictive_entropy(disagree.mean(0)), u.expected_entropy(disagree) + bald
    )
    # votes 0, 0, 1 -> one of three samples against the majority
    votes = np.array([[[0.8, 0.2]], [[0.6, 0.4]], [[0.3, 0.7]]])
    np.testing.assert_allclose(u.variation_ratio(votes), [1 / 3])


def test_measures_keep_extra_axes_between_inputs_and_classes():
    samples = softmax(np.random.default_rng(1).normal(size=(4, 3, 7, 5)))  # per-pixel classes
    assert u.mutual_information(samples).shape == (3, 7)
    assert u.variation_ratio(samples).shape == (3, 7)


# -- with labels ---------------------------------------------------------------------------------


def test_accuracy_nll_and_brier_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    y = np.array([0, 2, 1])
    assert u.accuracy(p, y) == pytest.approx(1 / 3)
    assert u.nll(p, y) == pytest.approx(-(math.log(0.7) + math.log(0.1) + math.log(0.25)) / 3)
    brier = (0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.8**2 + 0.9**2) + (0.5**2 + 0.75**2 + 0.25**2)
    assert u.brier(p, y) == pytest.approx(brier / 3)
    assert u.brier(np.eye(3), [0, 1, 2]) == 0 and u.brier(np.eye(3), [1, 2, 0]) == 2
    assert u.nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(np.finfo("float64").tiny))


def test_ece_on_a_known_reliability_table():
    # 5 bins of width 0.2. Bin (0.2, 0.4]: confidence 0.3, 1 of 2 right -> gap 0.2;
    # (0.6, 0.8]: 0.7, 2 of 4 right -> gap 0.2; (0.8, 1]: 0.9, 4 of 4 right -> gap 0.1.
    conf = [0.3, 0.3, 0.7, 0.7, 0.7, 0.7, 0.9, 0.9, 0.9, 0.9]
    predicted = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    right = [1, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    y = [k if r else (k + 1) % 4 for k, r in zip(predicted, right)]
    p = rows(conf, predicted)
    assert u.ece(p, y, bins=5) == pytest.approx(2 / 10 * 0.2 + 4 / 10 * 0.2 + 4 / 10 * 0.1)
    count, acc, mean_conf = u._bins(p, np.array(y), 5, equal_mass=False)
    np.testing.assert_allclose(count, [0, 2, 0, 4, 4])
    np.testing.assert_allclose(acc, [0, 0.5, 0, 0.5, 1])
    np.testing.assert_allclose(mean_conf, [0, 0.3, 0, 0.7, 0.9])
    # a confidence on an edge belongs to the bin below it: 0.6 is in (0.4, 0.6]
    count, _, _ = u._bins(rows([0.6, 0.6000001], [0, 0]), np.array([0, 0]), 5, equal_mass=False)
    np.testing.assert_allclose(count, [0, 0, 1, 1, 0])
    assert u.ece(rows([0.9] * 10, [0] * 10), [0] * 9 + [1]) == pytest.approx(0)  # 90% at 0.9


def test_adaptive_ece_uses_equal_mass_bins():
    # sorted confidences 0.5 0.6 | 0.7 0.8 | 0.9 1.0 in three bins of two
    p = rows([0.9, 0.5, 0.7, 1.0, 0.6, 0.8], [0] * 6)
    y = [0, 1, 1, 0, 0, 0]  # right: 0.9, 1.0, 0.6, 0.8
    gaps = [abs(0.5 - 0.55), abs(0.5 - 0.75), abs(1 - 0.95)]
    assert u.adaptive_ece(p, y, bins=3) == pytest.approx(sum(gaps) / 3)
    assert u.ece(p, y, bins=3) != pytest.approx(u.adaptive_ece(p, y, bins=3))

    rng = np.random.default_rng(0)
    many = softmax(4 * rng.normal(size=(100, 3)) ** 2)  # confidences crowd near 1
    count, _, _ = u._bins(many, rng.integers(0, 3, 100), 15, equal_mass=True)
    assert count.sum() == 100 and set(count) == {6, 7}
    count, _, _ = u._bins(many[:4], np.zeros(4, "int64"), 15, equal_mass=True)
    assert sorted(count)[-4:] == [1, 1, 1, 1]  # fewer inputs than bins: one input a bin


def test_selective_curve_and_aurc_of_a_perfect_and_of_a_worst_ranking():
    y = [0, 0, 0, 0]
    perfect = rows([0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1])  # the one mistake is the least confident
    coverage, acc = u.selective_curve(perfect, y)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(acc, [1, 1, 1, 0.75])
    assert u.aurc(perfect, y) == pytest.approx((0 + 0 + 0 + 1 / 4) / 4)
    worst = rows([0.9, 0.8, 0.7, 0.6], [1, 0, 0, 0])  # the mistake is the most confident
    assert u.aurc(worst, y) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert u.aurc(np.eye(4), [0, 1, 2, 3]) == 0


# -- temperature scaling -------------------------------------------------------------------------


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_nll():
    rng = np.random.default_rng(0)
    logits = 2 * rng.normal(size=(4000, 5))
    y = np.array([rng.choice(5, p=q) for q in softmax(logits)])  # calibrated by construction
    over = softmax(2.5 * logits)  # over-confident: temperature 2.5 undoes it
    t = u.fit_temperature(over, y)
    assert t == pytest.approx(2.5, rel=0.08)
    scaled = u.temperature_scale(over, t)
    assert u.nll(scaled, y) < u.nll(over, y) - 0.2
    assert u.ece(scaled, y) < u.ece(over, y) / 3
    np.testing.assert_array_equal(scaled.argmax(1), over.argmax(1))  # predictions unchanged
    assert u.fit_temperature(softmax(0.5 * logits), y) == pytest.approx(0.5, rel=0.08)
    # the fit is the minimum: nearby temperatures do no better
    assert all(u.nll(u.temperature_scale(over, t * f), y) > u.nll(scaled, y) for f in (0.9, 1.1))


def test_temperature_scale_by_hand():
    np.testing.assert_allclose(u.temperature_scale([[0.9, 0.1]], 2.0), [[0.75, 0.25]])
    np.testing.assert_allclose(u.temperature_scale([[0.9, 0.1]], 1), [[0.9, 0.1]])


# -- evaluate_uncertainty on a trained model -----------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """A small classifier trained two epochs on the digits, its logits twin, and data splits."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images / 16).astype("float32")
    keras.utils.set_random_seed(0)
    x = keras.Input((64,))
    h = layers.Dense(32, activation="relu", name="hidden")(x)
    logits = layers.Dense(10, name="logits")(h)
    model = keras.Model(x, layers.Softmax(name="probs")(logits))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(images[:1000], labels[:1000], epochs=2, batch_size=32, verbose=0)
    return {
        "probs": multidrop.insert_dropout(model, 0.2),
        "logits": multidrop.insert_dropout(keras.Model(x, logits), 0.2),
        "cal": (images[1000:1400], labels[1000:1400]),
        "test": (images[1400:], labels[1400:]),
    }


def test_evaluate_uncertainty_on_a_trained_model(digits, tmp_path):
    x, y = digits["test"]
    report = u.evaluate_uncertainty(
        digits["probs"], x, y, samples=10, seed=0, calibration_data=digits["cal"]
    )
    drawn = multidrop.mc_predict(digits["probs"], x, 10, seed=0, return_samples=True)[2]
    mean = drawn.astype("float64").mean(0)
    figures = [
        report.accuracy,
        report.nll,
        report.brier,
        report.ece,
        report.adaptive_ece,
        report.aurc,
        report.temperature,
        report.nll_scaled,
        report.ece_scaled,
    ]
    assert all(math.isfinite(f) for f in figures)
    assert 0.5 < report.accuracy <= 1 and not report.from_logits
    assert report.nll == u.nll(mean, y) and report.ece == u.ece(mean, y)
    assert report.aurc == u.aurc(mean, y) and report.adaptive_ece == u.adaptive_ece(mean, y)
    assert report.mutual_information.shape == y.shape
    assert np.all(report.mutual_information >= 0) and np.any(report.mutual_information > 0)
    assert report.temperature > 0
    assert report.nll_scaled == pytest.approx(
        u.nll(u.temperature_scale(report.mean, report.temperature), y)
    )
    text = str(report)
    assert "accuracy" in text and "AURC" in text and "NLL after temperature scaling" in text
    assert f"{report.ece:.4f}" in text

    paths = report.save_plots(tmp_path / "plots")
    assert [p.name for p in paths] == ["reliability.png", "selective.png"]
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000

    plain = u.evaluate_uncertainty(digits["probs"], x, y, samples=3, seed=0)
    assert plain.temperature is None and plain.nll_scaled is None
    assert "temperature" not in str(plain)


def test_a_model_that_outputs_logits_gets_a_softmax_per_sample(digits):
    x, y = digits["test"]
    report = u.evaluate_uncertainty(digits["logits"], x, y, samples=5, seed=3)
    drawn = multidrop.mc_predict(digits["logits"], x, 5, seed=3, return_samples=True)[2]
    probs = softmax(drawn.astype("float64"))
    assert report.from_logits and "logits" in str(report)
    assert report.nll == pytest.approx(u.nll(probs.mean(0), y), rel=1e-9)
    assert report.brier == pytest.approx(u.brier(probs.mean(0), y), rel=1e-9)
    np.testing.assert_allclose(report.mutual_information, u.mutual_information(probs), atol=1e-12)


# -- bad input -----------------------------------------------------------------------------------

P = np.array([[0.7, 0.3], [0.4, 0.6]])

BAD = [
    (u.ece, (np.array([0.7, 0.3]), [0]), ValueError, r"shaped \(inputs, classes\)"),
    (u.nll, (np.ones((2, 1)), [0, 0]), ValueError, "two classes"),
    (u.brier, ([[2.0, -1.0], [0.5, 0.5]], [0, 1]), ValueError, "apply a softmax"),
    (u.accuracy, ([[0.2, 0.2], [0.5, 0.5]], [0, 1]), ValueError, "summing to 1"),
    (u.ece, ([[np.nan, 1.0], [0.5, 0.5]], [0, 1]), ValueError, "probabilities"),
    (u.accuracy, (P, [0, 2]), ValueError, r"labels must lie in \[0, 1\]"),
    (u.accuracy, (P, [-1, 0]), ValueError, r"labels must lie in \[0, 1\]"),
    (u.nll, (P, [0.0, 1.0]), TypeError, "integer class labels"),
    (u.nll, (P, [0, 1, 1]), ValueError, "one label per input"),
    (u.nll, (P, np.eye(2, dtype="int64")), ValueError, r"y.argmax\(-1\)"),
    (u.ece, (P, [0, 1], 0), ValueError, "bins must be at least 1"),
    (u.adaptive_ece, (P, [0, 1], 2.5), TypeError, "bins must be an int"),
    (u.aurc, ("probs", [0]), TypeError, "array of numbers"),
    (u.mutual_information, (P,), ValueError, "return_samples=True"),
    (
        u.variation_ratio,
        (np.zeros((2, 0, 3)),),
        ValueError,
        r"\(samples, inputs, \.\.\., classes\)",
    ),
    (u.temperature_scale, (P, 0.0), ValueError, "temperature must be positive"),
    (u.temperature_scale, (P, "2"), TypeError, "temperature must be a float"),
    (u.fit_temperature, (P, [0, 5]), ValueError, "labels must lie"),
]


@pytest.mark.parametrize("function, args, error, message", BAD)
def test_bad_input_gets_a_clear_error(function, args, error, message):
    with pytest.raises(error, match=message):
        function(*args)


def test_evaluate_uncertainty_refuses_bad_models_and_data(digits):
    x, y = digits["test"]
    with pytest.raises(TypeError, match=r"calibration_data must be a pair \(x_cal, y_cal\)"):
        u.evaluate_uncertainty(digits["probs"], x, y, 2, calibration_data=x)
    with pytest.raises(ValueError, match="one label per input"):
        u.evaluate_uncertainty(digits["probs"], x, y[:-1], 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        u.evaluate_uncertainty(digits["probs"], x, y, 2, calibration_data=(x, y + 10))
    inputs = keras.Input((64,))
    h = layers.Dropout(0.5)(layers.Dense(8)(inputs))
    sigmoid = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(h))
    with pytest.raises(ValueError, match=r"Dense\(2, activation='softmax'\)"):
        u.evaluate_uncertainty(sigmoid, x, y, 2)
    two = keras.Model(inputs, [layers.Dense(3, activation="softmax")(h), layers.Dense(2)(h)])
    with pytest.raises(TypeError, match="one output"):
        u.evaluate_uncertainty(two, x, y, 2)
