"""multidrop's Dropout: its masks, gradients, memory and inference, on every backend.

``reference_mask`` is the mask written from its definition in numpy, on unsigned words (the
call's key by Threefry-2x32-20, checked against Random123's known answers and ``jax.random``'s
own threefry; each element's word by MurmurHash3's finaliser, checked against its published
values): every backend, eager or compiled, must give exactly its bits.
"""

import json
import math
import zipfile

import keras
import numpy as np
import pytest
from conftest import assert_identical, to_numpy

import multidrop
from multidrop.dropout import Dropout

BACKEND = keras.backend.backend()
TORCH = BACKEND == "torch"
torch_only = pytest.mark.skipif(not TORCH, reason="PyTorch's autograd and torch.compile")


def _threefry(x0, x1, k0, k1):
    """Threefry-2x32, 20 rounds, on uint64 numpy arrays holding 32-bit words."""
    mask, rotations = 0xFFFFFFFF, (13, 15, 26, 6, 17, 29, 16, 24)
    keys = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
    x0, x1 = (x0 + k0) & mask, (x1 + k1) & mask
    for i in range(20):
        r = rotations[i % 8]
        x0 = (x0 + x1) & mask
        x1 = (((x1 << r) | (x1 >> (32 - r))) & mask) ^ x0
        if i % 4 == 3:
            s = i // 4 + 1
            x0 = (x0 + keys[s % 3]) & mask
            x1 = (x1 + keys[(s + 1) % 3] + s) & mask
    return x0, x1


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint64 numpy arrays holding 32-bit words."""
    mask = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & mask
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & mask
    return x ^ (x >> 16)


def reference_mask(shape, rate, seed, count):
    """The float32 mask (0 or the scale) of call ``count`` of a layer seeded ``seed``:
    with ``(k0, k1)`` = Threefry((0, 0), key (seed, count)), element ``j`` keeps when
    ``fmix32(fmix32(j + k0) ^ k1)``, read as a signed int32, is at least
    ``round(rate * 2**32) - 2**31``; kept ones scale by 1 / (keep probability)."""
    size = math.prod(shape)
    k0, k1 = _threefry(
        np.uint64(0), np.uint64(0), np.uint64(seed % 2**32), np.uint64(count % 2**32)
    )
    index = np.arange(size, dtype=np.uint64)
    words = _fmix32(_fmix32((index + k0) & 0xFFFFFFFF) ^ k1).reshape(shape)
    cutoff = min(round(rate * 2**32), 2**32 - 1)
    scale = np.float32(2**32 / (2**32 - cutoff))
    signed = words.astype(np.int64) - (words >= 2**31).astype(np.int64) * 2**32
    return np.where(signed >= cutoff - 2**31, scale, np.float32(0))


def test_reference_is_murmur3s_finaliser():
    """fmix32's published values (0 is its fixed point; MurmurHash3_x86_32 of the empty
    string with seed 1 is fmix32(1) = 0x514E28B7), and the layer's `words` on numpy is the
    reference's unsigned arithmetic."""
    u = np.uint64
    assert _fmix32(u(0)) == 0 and _fmix32(u(1)) == 0x514E28B7
    index = np.arange(-5, 1000, dtype=np.int32)
    seed, count = np.array([-3], np.int32), np.array([2**31 - 1], np.int32)  # arrays wrap quietly
    mine = multidrop.dropout.words(index, seed, count)
    k0, k1 = _threefry(u(0), u(0), u(2**32 - 3), u(2**31 - 1))
    theirs = _fmix32(_fmix32((index.astype(np.uint64) % 2**32 + k0) & 0xFFFFFFFF) ^ k1)
    assert np.array_equal(mine.view(np.uint32), theirs.astype(np.uint32))


def test_reference_is_threefry_2x32():
    """Random123's known-answer vectors (kat_vectors, threefry2x32_20), and jax.random's own
    threefry_2x32 on random keys and counters."""
    u = np.uint64
    assert _threefry(u(0), u(0), u(0), u(0)) == (0x6B200159, 0x99BA4EFE)
    assert _threefry(u(2**32 - 1), u(2**32 - 1), u(2**32 - 1), u(2**32 - 1)) == (
        0x1CB996FC,
        0xBB002BE7,
    )
    assert _threefry(u(0x243F6A88), u(0x85A308D3), u(0x13198A2E), u(0x03707344)) == (
        0xC4923A9C,
        0x483DF7A0,
    )
    import jax.extend.random
    import jax.numpy as jnp

    words = np.random.default_rng(0).integers(0, 2**32, size=(4, 8), dtype=np.uint64)
    theirs = jax.extend.random.threefry_2x32(
        jnp.asarray(words[0, :2], jnp.uint32), jnp.asarray(words[1:3].ravel(), jnp.uint32)
    )
    mine = _threefry(words[1], words[2], words[0, 0], words[0, 1])
    assert np.array_equal(np.asarray(theirs, np.uint64), np.concatenate(mine))


def _inputs(shape, seed=0):
    """Values of both signs, so that a product's sign of zero counts too."""
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _bits(x):
    return np.asarray(to_numpy(x)).view(np.int32)


# 38,700 elements: PyTorch's kernel for large inputs (more than one thread); the rest: small
@pytest.mark.parametrize(
    "shape, rate, seed",
    [((7,), 0.2, 0), ((3, 5), 0.5, 7), ((4, 9, 3), 0.1, 123456789), ((300, 129), 0.77, 2**31 - 1)],
)
def test_masks_are_the_reference_bit_for_bit(shape, rate, seed):
    x = _inputs(shape)
    layer = Dropout(rate, seed=seed)
    for count in range(2):
        expected = x * reference_mask(shape, rate, seed, count)
        assert np.array_equal(_bits(layer(x, training=True)), expected.view(np.int32))


def test_bfloat16_scales_by_the_rounded_float32_scale():
    x = keras.ops.cast(_inputs((8, 33)), "bfloat16")
    y = Dropout(0.3, seed=1, dtype="bfloat16")(x, training=True)
    expected = x * keras.ops.cast(reference_mask((8, 33), 0.3, 1, 0), "bfloat16")
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert_identical(keras.ops.cast(y, "float32"), keras.ops.cast(expected, "float32"))


def test_compiled_masks_are_the_eager_ones_and_advance_the_count():
    """Under jax.jit (Keras' stateless call), tf.function with XLA, torch.compile."""
    x, layer = _inputs((6, 33)), Dropout(0.3, seed=5)
    layer.build(x.shape)
    if BACKEND == "jax":
        import jax

        step = jax.jit(lambda state, x: layer.stateless_call([], state, x, training=True))
        state, outputs = [v.value for v in layer.non_trainable_variables], []
        for _ in range(3):
            y, state = step(state, x)
            outputs.append(y)
        layer.seed_generator.state.assign(state[0])
    else:
        if BACKEND == "tensorflow":
            import tensorflow as tf

            step = tf.function(
                lambda x: layer(x, training=True),
                jit_compile=True,
                input_signature=[tf.TensorSpec([None, 33], tf.float32)],
            )
        else:
            import torch

            step = torch.compile(lambda x: layer(x, training=True), fullgraph=True)
            x = torch.from_numpy(x)
        outputs = [step(x) for _ in range(3)]
    for count, y in enumerate(outputs):
        expected = to_numpy(x) * reference_mask((6, 33), 0.3, 5, count)
        assert np.array_equal(_bits(y), expected.view(np.int32))
    assert to_numpy(layer.seed_generator.state).tolist() == [5, 3]


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_training_drops_rate_and_scales_the_rest(rate):
    x = np.random.default_rng(0).uniform(1, 2, size=(200, 500)).astype("float32")
    y = to_numpy(Dropout(rate, seed=3)(x, training=True))
    dropped = y == 0
    # 50k draws per part: 5 standard deviations stay below 0.011; even and odd
    # columns come from the two halves of one hash
    for part in (dropped[:100], dropped[100:], dropped[:, ::2], dropped[:, 1::2]):
        assert abs(part.mean() - rate) < 0.011
    np.testing.assert_allclose(y[~dropped], x[~dropped] / (1 - rate), rtol=1e-6)


def test_varying_batch_sizes_and_rates_trace_nothing_again():
    """Eager calls with a new batch size, rank or rate each time: the right masks, and on
    TensorFlow no retracing warning (one trace per dtype; XLA compiles each shape)."""
    import io
    import logging

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for i, batch in enumerate(range(1, 13)):  # the previous kernel logged retracing here
            shape, rate = (batch, 5) if i % 2 else (batch, 3, 2), 0.1 + 0.05 * i
            x = _inputs(shape)
            y = Dropout(rate, seed=i)(x, training=True)
            expected = x * reference_mask(shape, rate, i, 0)
            assert np.array_equal(_bits(y), expected.view(np.int32))
    finally:
        logger.removeHandler(handler)
    assert "retracing" not in log.getvalue()


def test_inference_is_the_identity_bit_for_bit():
    x = _inputs((16, 40))
    assert_identical(Dropout(0.5, seed=1)(x, training=False), x)
    assert_identical(Dropout(0.5)(x), x)
    model = _mlp()
    rewired = multidrop.insert_dropout(model, 0.3, seed=2)
    inputs = _inputs((4, 8))
    assert_identical(rewired(inputs, training=False), model(inputs, training=False))
    assert_identical(rewired.predict(inputs, verbose=0), model.predict(inputs, verbose=0))


def test_noise_shape_shares_the_mask_along_its_unit_axes():
    x = np.ones((4, 6, 32), "float32")
    y = to_numpy(Dropout(0.5, noise_shape=(None, 1, 32), seed=0)(x, training=True))
    assert (y == y[:, :1, :]).all() and 0 < (y == 0).mean() < 1
    assert np.array_equal(y[:, 0, :], reference_mask((4, 1, 32), 0.5, 0, 0)[:, 0, :])


def test_seeded_masks_repeat_run_to_run_and_change_call_to_call():
    x = np.ones((32, 64), "float32")

    def two_calls(seed):
        layer = Dropout(0.5, seed=seed)
        return [to_numpy(layer(x, training=True)) for _ in range(2)]

    first, second = two_calls(7), two_calls(7)
    assert_identical(first, second)
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], two_calls(8)[0])


def test_unseeded_layers_follow_keras_global_seed():
    x = np.ones((32, 64), "float32")

    def masks():
        keras.utils.set_random_seed(3)
        return [to_numpy(Dropout(0.5)(x, training=True)) for _ in range(2)]

    first, second = masks(), masks()
    assert_identical(first, second)
    assert not np.array_equal(first[0], first[1])  # each unseeded layer draws its own seed


# Keras' own compiled train step on PyTorch reads a non-leaf .grad (with or without dropout)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_seeded_model_trains_the_same_way_eager_and_compiled():
    model, x = _mlp(), _inputs((16, 8))
    y = np.arange(16) % 3

    def train(jit_compile):
        rewired = multidrop.insert_dropout(model, 0.5, seed=11)
        rewired.compile("sgd", "sparse_categorical_crossentropy", jit_compile=jit_compile)
        for _ in range(2):
            rewired.train_on_batch(x, y)
        return rewired.get_weights()

    for mine, compiled in zip(train(False), train(True)):  # same masks; fused math may round
        np.testing.assert_allclose(mine, compiled, rtol=1e-5, atol=1e-6)


def test_saved_as_keras_dropout_and_loads_without_multidrop(tmp_path):
    model = _mlp()
    rewired = multidrop.insert_dropout(model, 0.3, seed=5)
    assert [type(layer) for layer in rewired.layers if "multidrop" in layer.name] == [Dropout] * 2
    path = tmp_path / "rewired.keras"
    rewired.save(path)
    saved = json.loads(zipfile.ZipFile(path).read("config.json"))["config"]["layers"]
    added = [layer for layer in saved if layer["config"]["name"].endswith("_multidrop")]
    assert [(s["module"], s["class_name"], s["registered_name"]) for s in added] == [
        ("keras.layers", "Dropout", None)
    ] * 2
    assert [layer["config"]["seed"] for layer in added] == [5, 6]

    loaded = keras.saving.load_model(path)
    assert [type(layer) for layer in loaded.layers if "multidrop" in layer.name] == [
        keras.layers.Dropout
    ] * 2
    x = _inputs((4, 8), seed=1)
    assert_identical(loaded(x, training=False), rewired(x, training=False))
    for plain in (multidrop.remove_dropout(rewired), multidrop.remove_dropout(loaded)):
        assert [layer.name for layer in plain.layers] == [layer.name for layer in model.layers]


# ---- PyTorch: gradients, memory, compilation -------------------------------------------------


@torch_only
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradient_is_the_reference_mask_bit_for_bit(compiled):
    import torch

    layer = Dropout(0.25, seed=9)
    forward = lambda t: layer(t, training=True)  # noqa: E731
    forward = torch.compile(forward, fullgraph=True) if compiled else forward
    shapes = [(64, 100)] + [(300, 129)] * (not compiled)  # eager: the large-input kernel too
    for count, shape in enumerate(shapes):
        x = torch.from_numpy(_inputs(shape)).requires_grad_()
        dy = torch.from_numpy(_inputs(shape, seed=1))
        (dx,) = torch.autograd.grad(forward(x), x, dy)
        expected = dy.numpy() * reference_mask(shape, 0.25, 9, count)
        assert np.array_equal(dx.numpy().view(np.int32), expected.view(np.int32))


@torch_only
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_dropout_keeps_no_mask_for_backward(compiled):
    """Dense -> dropout -> Dense: the dropout adds only its output (4 bytes per element,
    which the next Dense keeps) and its 8-byte [seed, count]; nn.Dropout keeps a mask too."""
    import torch

    x = torch.from_numpy(_inputs((64, 256)))
    dense1 = keras.layers.Dense(256, activation="relu")
    dense2 = keras.layers.Dense(256)
    dense2(dense1(x))  # built outside torch.compile
    layer = Dropout(0.2, seed=1)
    drops = {"none": lambda h: h, "multidrop": lambda h: layer(h, training=True)}
    if not compiled:  # (compiled, Inductor keeps a 1-byte mask for nn.Dropout)
        drops["native"] = lambda h: torch.nn.functional.dropout(h, 0.2, True)
    saved = {}
    x.requires_grad_()
    for name, drop in drops.items():
        chain = lambda x, drop=drop: dense2(drop(dense1(x)))  # noqa: E731
        chain = torch.compile(chain) if compiled else chain
        saved[name] = [saved_bytes(lambda f=chain: f(x)) for _ in range(2)][-1]
    alone = lambda x, drop=drops["multidrop"]: drop(x * 1)  # noqa: E731
    assert saved_bytes(lambda: (torch.compile(alone) if compiled else alone)(x)) <= 8
    elements = x.numel()
    assert saved["multidrop"] - saved["none"] <= 4 * elements + 8  # its output, 4 B/element
    if not compiled:  # a float mask and the output
        assert saved["native"] - saved["none"] >= 8 * elements


@torch_only
def test_no_graph_break_or_host_read_under_torch_compile():
    import torch

    x = torch.ones(8, 16)

    def graph_breaks(layer):
        return torch._dynamo.explain(lambda t: layer(t, training=True))(x).graph_break_count

    # Keras' seeded Dropout reads its seed back to the host: that is a graph break
    assert graph_breaks(keras.layers.Dropout(0.5, seed=1)) > 0
    assert graph_breaks(Dropout(0.5, seed=1)) == 0
    assert graph_breaks(Dropout(0.5)) == 0
    assert graph_breaks(Dropout(0.5, noise_shape=(None, 1), seed=1)) == 0


@torch_only
@pytest.mark.parametrize("threads", [1, "all"])
def test_the_prebuilt_kernel_draws_the_reference_masks(threads):
    """The kernel compiled ahead of time (`multidrop.prebuilt`), on one thread (small tensors)
    and on all of PyTorch's (large ones), forward and backward, in a size that is not a
    multiple of its vector width."""
    import torch

    from multidrop import dropout, prebuilt

    threads = 1 if threads == 1 else torch.get_num_threads()
    kernel = prebuilt.wait(torch.float32, threads)
    shape = (7, 999) if threads == 1 else (9, dropout._SMALL // 8 + 1)
    x = torch.from_numpy(_inputs(shape))
    layer = Dropout(0.3, seed=11)
    assert prebuilt.kernel(torch.float32, threads) is kernel  # the layer calls it
    y = layer(x, training=True)
    assert np.array_equal(_bits(y), (x.numpy() * reference_mask(shape, 0.3, 11, 0)).view(np.int32))
    x.requires_grad_()
    layer(x, training=True).sum().backward()  # an expanded gradient: one element, stride 0
    assert np.array_equal(x.grad.numpy(), reference_mask(shape, 0.3, 11, 1))


@torch_only
@pytest.mark.parametrize(
    "why", ["the build fails", "the cache is not writable", "stale lock", "a damaged file"]
)
def test_without_a_built_kernel_it_warns_once_and_draws_the_same_masks(why, monkeypatch, tmp_path):
    """A build that fails (here: a dtype the script does not know, so the real build script
    fails in its subprocess), a cache folder that cannot be made, a lock left by a build that
    died (it is built again) and a file that does not load: the layer warns once, naming the
    cause, and runs the same kernel as eager ops."""
    import socket
    import subprocess
    import sys

    import torch

    from multidrop import prebuilt

    monkeypatch.setattr(prebuilt, "_BUILDS", {})
    cache = tmp_path / "cache"
    if why == "the cache is not writable":
        cache.write_text("a file where the folder should be")
    monkeypatch.setenv("MULTIDROP_CACHE", str(cache))
    real = prebuilt._command
    monkeypatch.setattr(prebuilt, "_command", lambda f, d, t: real(f, "no_such_dtype", t))
    if why == "stale lock":
        cache.mkdir()
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        prebuilt.path(torch.float32, 1).with_suffix(".lock").write_text(
            f"{socket.gethostname()} {gone.pid}"
        )
    if why == "a damaged file":
        cache.mkdir()
        prebuilt.path(torch.float32, 1).write_bytes(b"not a package")
    causes = {"the cache is not writable": "cannot write to the cache folder"}
    cause = causes.get(why, "cannot load .* delete it" if "damaged" in why else "no_such_dtype")
    with pytest.warns(RuntimeWarning, match=cause), pytest.raises(RuntimeError, match=cause):
        prebuilt.wait(torch.float32, 1, timeout=1800)
    layer = Dropout(0.4, seed=3)
    x = torch.from_numpy(_inputs((20, 30))).requires_grad_()
    y = layer(x, training=True)  # no second warning: filterwarnings turns one into an error
    (dx,) = torch.autograd.grad(layer(x, training=True), x, torch.ones(20, 30))
    assert np.array_equal(
        _bits(y), (x.detach().numpy() * reference_mask((20, 30), 0.4, 3, 0)).view(np.int32)
    )
    assert np.array_equal(dx.numpy(), reference_mask((20, 30), 0.4, 3, 1))


def saved_bytes(forward) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs, each
    storage once (as `benchmarks.timing.saved_bytes` counts them)."""
    import torch

    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


def _mlp():
    x = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="fc1")(x)
    h = keras.layers.Dense(16, activation="relu", name="fc2")(h)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax", name="out")(h))
