"""mc_predict: dropout on, BatchNormalization in inference mode, the model untouched,
samples vectorized."""

import time

import keras
import numpy as np
import pytest
from conftest import assert_snapshot_equal, snapshot, to_numpy
from keras import layers
from models import randomize

import multidrop

X = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")


def mlp_bn(seed=0):
    """An MLP whose BatchNormalization has moving statistics far from any batch's."""
    x = keras.Input((16,), name="features")
    h = layers.Dense(32, activation="relu", name="fc1")(x)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Dense(32, activation="relu", name="fc2")(h)
    out = layers.Dense(4, activation="softmax", name="probs")(h)
    return randomize(keras.Model(x, out, name="mlp_bn"), seed)


def test_mean_approaches_the_deterministic_output_as_the_rate_shrinks():
    model = mlp_bn()
    plain = to_numpy(model(X, training=False))
    gaps = {}
    for rate in (0.01, 0.1):
        rewired = multidrop.insert_dropout(model, rate)
        mean, std = multidrop.mc_predict(rewired, X, samples=200, seed=0)
        assert mean.shape == std.shape == plain.shape
        assert np.all(std > 0)
        gaps[rate] = np.max(np.abs(mean - plain))
    assert 0 < gaps[0.01] < 0.05
    assert gaps[0.01] < gaps[0.1] / 2


def test_batch_normalization_stays_in_inference_mode_and_nothing_changes():
    model = mlp_bn()
    rewired = multidrop.insert_dropout(model, 1e-6)  # dropout all but off: only BN could differ
    before = snapshot(rewired)
    mean, _ = multidrop.mc_predict(rewired, X, samples=4, seed=0)
    assert_snapshot_equal(before, snapshot(rewired))
    np.testing.assert_allclose(mean, to_numpy(model(X, training=False)), atol=1e-5)
    training_mode = to_numpy(rewired(X, training=True))  # the usual recipe: BN uses batch stats
    assert np.max(np.abs(training_mode - mean)) > 1e-2


def test_a_seed_reproduces_the_samples():
    rewired = multidrop.insert_dropout(mlp_bn(), 0.3)
    first = multidrop.mc_predict(rewired, X, samples=8, seed=7, return_samples=True)[2]
    again = multidrop.mc_predict(rewired, X, samples=8, seed=7, return_samples=True)[2]
    other = multidrop.mc_predict(rewired, X, samples=8, seed=8, return_samples=True)[2]
    fresh = multidrop.mc_predict(rewired, X, samples=8, return_samples=True)[2]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, fresh)


def test_mc_true_and_plain_dropout_models_give_the_same_samples():
    model = mlp_bn()
    on = multidrop.insert_dropout(model, 0.3, mc=True)
    off = multidrop.insert_dropout(model, 0.3)
    a = multidrop.mc_predict(on, X, samples=6, seed=1, return_samples=True)[2]
    b = multidrop.mc_predict(off, X, samples=6, seed=1, return_samples=True)[2]
    assert np.array_equal(a, b)
    assert len({s.tobytes() for s in a}) == 6  # six different samples


def test_user_sequential_model_with_its_own_dropout():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(3),
        ],
        name="user",
    )
    mean, std, samples = multidrop.mc_predict(model, X, samples=5, seed=0, return_samples=True)
    assert samples.shape == (5, 8, 3) and mean.shape == std.shape == (8, 3)
    np.testing.assert_allclose(mean, samples.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, samples.std(axis=0), rtol=1e-6)
    assert np.all(std > 0)


def test_chunked_calls_and_multiple_inputs_and_outputs():
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    h = layers.Dense(16, activation="relu", name="trunk")(layers.Concatenate()([a, b]))
    outputs = {
        "label": layers.Dense(3, activation="softmax", name="label")(h),
        "score": layers.Dense(1, name="score")(h),
    }
    model = randomize(keras.Model({"a": a, "b": b}, outputs, name="two_heads"))
    rewired = multidrop.insert_dropout(model, 0.2)
    rng = np.random.default_rng(1)
    x = {
        "a": rng.normal(size=(5, 6)).astype("float32"),
        "b": rng.normal(size=(5, 4)).astype("float32"),
    }
    mean, std, samples = multidrop.mc_predict(  # 12 calls of 3 rows for 35 rows
        rewired, x, samples=7, batch_size=3, seed=0, return_samples=True
    )
    assert set(mean) == set(std) == {"label", "score"}
    assert mean["label"].shape == (5, 3) and std["score"].shape == (5, 1)
    assert samples["score"].shape == (7, 5, 1)
    assert len({s.tobytes() for s in samples["score"]}) == 7 and np.all(std["label"] > 0)
    np.testing.assert_allclose(mean["label"].sum(axis=-1), 1, atol=1e-5)


def test_a_mask_shared_across_the_batch_still_varies_between_samples():
    x = keras.Input((16,))
    h = layers.Dense(32, activation="relu")(x)
    h = layers.Dropout(0.5, noise_shape=(1, 32))(h)  # one mask for the whole batch
    model = keras.Model(x, layers.Dense(2)(h))
    same_rows = np.repeat(X[:1], 4, axis=0)
    samples = multidrop.mc_predict(model, same_rows, samples=6, seed=0, return_samples=True)[2]
    assert all(np.array_equal(s[0], s[i]) for s in samples for i in range(4))
    assert len({s[0].tobytes() for s in samples}) == 6


def test_predictive_entropy():
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(multidrop.predictive_entropy(probs), [0, np.log(4), np.log(2)])
    with pytest.raises(ValueError, match="softmax"):
        multidrop.predictive_entropy(np.array([[2.0, -1.0, 0.5]]))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"no dropout layers.*insert_dropout"):
        multidrop.mc_predict(mlp_bn(), X)
    rewired = multidrop.insert_dropout(mlp_bn(), 0.1)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        multidrop.mc_predict(rewired, X, samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        multidrop.mc_predict(rewired, X, batch_size=-1)
    with pytest.raises(TypeError, match="seed"):
        multidrop.mc_predict(rewired, X, seed="7")


def test_vectorized_sampling_is_at_least_3x_faster_than_a_loop():
    """32 samples at batch 8: one tiled call against 32 calls of the same MC model."""
    model = multidrop.insert_dropout(mlp_bn(), 0.2, mc=True)

    def seconds(run):
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def loop():
        return [model.predict_on_batch(X) for _ in range(32)]

    def vectorized():
        return multidrop.mc_predict(model, X, samples=32)

    loop(), vectorized()  # compile (JAX, TensorFlow) and build the MC view
    # Interleaved rounds: a busy moment of the machine slows both sides of a round alike.
    rounds = [(seconds(loop), seconds(vectorized)) for _ in range(9)]
    speedup = np.median([a / b for a, b in rounds])
    assert speedup >= 3, f"mc_predict only {speedup:.1f}x faster than a loop: {rounds}"


# ----------------------------------------------------------------- trunk caching, consistent masks


def head_only(model):
    """Dropout after the last activation only: the fine-tuning setup trunk caching is for."""
    return multidrop.insert_dropout(
        model, 0.3, where=multidrop.select.activations() & multidrop.select.last(1), seed=2
    )


def test_cached_trunk_gives_the_uncached_samples():
    """Same seed, same masks: the samples agree up to the float rounding of the trunk, which
    runs on n rows instead of n * samples (BLAS may pick another kernel for another batch)."""
    rewired = head_only(mlp_bn())
    view = multidrop.mc._mc_view(rewired)
    assert view.head is not None and len(view.head.layers) < len(view.model.layers)
    cached = multidrop.mc_predict(rewired, X, 12, seed=3, return_samples=True)[2]
    plain = multidrop.mc_predict(rewired, X, 12, seed=3, return_samples=True, cache=False)[2]
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    assert np.all(cached.std(axis=0) > 0)


def test_dropout_at_the_input_leaves_nothing_to_cache():
    x = keras.Input((16,))
    h = layers.Dropout(0.2, name="input_dropout")(x)
    model = randomize(keras.Model(x, layers.Dense(3)(layers.Dense(8, activation="relu")(h))))
    assert multidrop.mc._mc_view(model).head is None
    assert np.all(multidrop.mc_predict(model, X, 5, seed=0)[1] > 0)


def test_consistent_masks_are_shared_by_inputs_and_differ_between_samples():
    rewired = multidrop.insert_dropout(mlp_bn(), 0.3)
    same = np.repeat(X[:1], 6, axis=0)  # six copies of one input: one answer per network
    samples = multidrop.mc_predict(rewired, same, 5, seed=0, consistent=True, return_samples=True)[
        2
    ]
    for k in range(5):
        np.testing.assert_allclose(
            samples[k], np.broadcast_to(samples[k][0], samples[k].shape), rtol=1e-5, atol=1e-7
        )  # rows of one batch round alike, nearly
    assert not np.allclose(samples[0], samples[1])
    free = multidrop.mc_predict(rewired, same, 5, seed=0, return_samples=True)[2]
    assert not all(np.allclose(free[k], free[k][0]) for k in range(5))


def test_consistent_masks_need_standalone_dropout():
    x = keras.Input((4, 8))
    h = layers.MultiHeadAttention(2, 4, dropout=0.2, name="mha")(x, x)
    model = keras.Model(x, layers.Dense(2)(h))
    with pytest.raises(ValueError, match=r"consistent=True needs standalone dropout.*'mha'"):
        multidrop.mc_predict(model, np.ones((2, 4, 8), "float32"), 3, consistent=True)


class Counting(layers.Layer):
    """The identity, counting how often its ``call()`` runs on real tensors: once per trace
    under JAX's jit and TensorFlow's tf.function, once per call on eager PyTorch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.runs = 0

    def call(self, x):
        if not isinstance(x, keras.KerasTensor):  # not the symbolic build of a graph
            self.runs += 1
        return x


def test_trunk_and_head_are_compiled_once_and_reused_across_samples_and_calls():
    """5 inputs in calls of 3 rows: the trunk's two calls, and the head's twelve (35 rows),
    each get 3 rows, so JAX and TensorFlow trace each part once, and never again for
    another call with the same shapes (another seed). Eager PyTorch runs every call."""
    x = keras.Input((16,))
    trunk = Counting(name="trunk_probe")
    h = layers.Dense(8, activation="relu", name="fc")(trunk(x))
    head = Counting(name="head_probe")
    h = head(layers.Dropout(0.3, name="drop")(h))
    model = randomize(keras.Model(x, layers.Dense(3, name="out")(h)))
    view = multidrop.mc._mc_view(model)
    assert view.head is not None and head in view.head.layers and trunk in view.trunk.layers
    built = (trunk.runs, head.runs)  # the view's own checks run it
    runs = []
    for seed in (0, 1, 0):
        multidrop.mc_predict(model, X[:5], samples=7, batch_size=3, seed=seed)
        runs.append((trunk.runs - built[0], head.runs - built[1]))
    if keras.backend.backend() == "torch":
        assert runs == [(2, 12), (4, 24), (6, 36)]
    else:
        assert runs == [(1, 1)] * 3  # without padding the trunk's last call: (2, 1)
    cached, plain = (
        multidrop.mc_predict(model, X[:5], 7, batch_size=3, seed=0, return_samples=True, cache=c)[2]
        for c in (True, False)
    )
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)  # the padding is dropped
