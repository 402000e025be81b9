"""The same seed gives the same dropout masks on PyTorch, JAX and TensorFlow, bit for bit.

One subprocess per backend (run with ``nox -s crossbackend``) runs this file as a
script: it draws masks from seeded layers, their gradients, and one training
step of a small seeded model, and writes them to an ``.npz`` file; the tests
compare the three files. Masks and the gradients of a dropout alone are exact;
a training step agrees within float32 tolerance (matrix products sum in a
backend's own order).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.crossbackend

BACKENDS = ("torch", "jax", "tensorflow")
# (shape, rate, seed, noise_shape): 38,700 elements take PyTorch's large-input kernel
CASES = [
    ((2, 3, 5), 0.2, 0, None),
    ((64, 129), 0.5, 7, None),
    ((300, 129), 0.1, 2**31 - 1, None),
    ((4, 6, 32), 0.3, 11, (None, 1, 32)),
]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """``{backend: {name: array}}``, each backend's draws from its own subprocess."""
    out = tmp_path_factory.mktemp("masks")
    results = {}
    for backend in BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        path = out / f"{backend}.npz"
        run = subprocess.run(
            [sys.executable, __file__, str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert run.returncode == 0, f"{backend}: {run.stderr[-3000:]}"
        with np.load(path) as arrays:
            results[backend] = dict(arrays)
    return results


def test_masks_and_their_gradients_are_bitwise_equal_on_every_backend(drawn):
    from test_dropout import reference_mask

    torch = drawn["torch"]
    names = [n for n in torch if n.startswith(("out", "grad"))]
    assert len(names) == 3 * len(CASES)
    for backend in ("jax", "tensorflow"):
        assert sorted(drawn[backend]) == sorted(torch)
        for name in names:
            mine, theirs = drawn[backend][name].view(np.int32), torch[name].view(np.int32)
            assert np.array_equal(mine, theirs), f"{name}: {backend} differs from torch"
    for i, (shape, rate, seed, noise_shape) in enumerate(CASES):
        for count in range(2):
            mask_shape = [s if n is None else n for s, n in zip(shape, noise_shape or shape)]
            expected = _inputs(i, shape) * reference_mask(mask_shape, rate, seed, count)
            assert np.array_equal(torch[f"out{i}_{count}"].view(np.int32), expected.view(np.int32))


def test_one_training_step_agrees_and_advances_every_seed(drawn):
    for backend in ("jax", "tensorflow"):
        np.testing.assert_array_equal(drawn[backend]["step_state"], drawn["torch"]["step_state"])
        for name in ("step_loss", "step_weights"):  # weights up to ~10: float32 ulp ~1e-6
            np.testing.assert_allclose(
                drawn[backend][name], drawn["torch"][name], rtol=1e-5, atol=1e-5
            )
    assert drawn["torch"]["step_state"].tolist() == [[5, 1], [6, 1]]


def _draw(path: pathlib.Path) -> None:
    """Run in a subprocess, with ``KERAS_BACKEND`` set: write this backend's draws to ``path``."""
    import keras

    import multidrop
    from multidrop.dropout import Dropout

    arrays = {}
    for i, (shape, rate, seed, noise_shape) in enumerate(CASES):
        x = _inputs(i, shape)
        layer = Dropout(rate, seed=seed, noise_shape=noise_shape)
        for count in range(2):
            arrays[f"out{i}_{count}"] = keras.ops.convert_to_numpy(layer(x, training=True))
        arrays[f"grad{i}"] = _gradient(layer, x)  # call count 2

    rng = np.random.default_rng(0)
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    hidden = keras.layers.Dense(16, activation="relu", name="fc2")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden))
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    rewired = multidrop.insert_dropout(model, 0.4, seed=5)
    rewired.compile(keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError())
    x, y = rng.normal(size=(8, 12)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
    arrays["step_loss"] = np.asarray(rewired.train_on_batch(x, y))
    arrays["step_weights"] = np.concatenate([w.ravel() for w in rewired.get_weights()])
    arrays["step_state"] = np.array(
        [
            keras.ops.convert_to_numpy(v)
            for v in rewired.variables
            if v.path.endswith("seed_generator_state")
        ],
        np.int64,
    )
    np.savez(path, **arrays)


def _inputs(case: int, shape) -> np.ndarray:
    return np.random.default_rng(case).normal(size=shape).astype("float32")


def _gradient(layer, x):
    """d/dx sum(layer(x) * w) with w = 1..n: w times the mask, exactly, on any backend."""
    import keras

    w = np.arange(1, x.size + 1, dtype="float32").reshape(x.shape)
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        t = torch.from_numpy(x).requires_grad_()
        (layer(t, training=True) * torch.from_numpy(w)).sum().backward()
        return t.grad.numpy()
    if backend == "jax":
        import jax

        state = [v.value for v in layer.non_trainable_variables]

        def loss(t):
            y, _ = layer.stateless_call([], state, t, training=True)
            return (y * w).sum()

        return np.asarray(jax.grad(loss)(x))
    import tensorflow as tf

    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        total = tf.reduce_sum(layer(t, training=True) * w)
    return tape.gradient(total, t).numpy()


if __name__ == "__main__":
    _draw(pathlib.Path(sys.argv[1]))
