"""A rewired model under the distributed engines: keras.distribution.DataParallel on JAX
(two virtual CPU devices), PyTorch DistributedDataParallel (two processes under torchrun)
and two JAX processes (jax.distributed on CPU).

All run in fresh subprocesses on their own backend, whatever backend this
session tests: XLA reads ``XLA_FLAGS`` once, when jax is imported, and DDP
needs a process per replica. Under DDP and multi-process JAX, each process
gets its own masks from the user's one seed with no user code
(`multidrop.distributed.fold`, applied where the dropout kernel reads its state).
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import multidrop

SCRIPT = r"""
import json
import jax, keras, numpy as np
import multidrop

distribution = keras.distribution.DataParallel(devices=jax.devices())
keras.distribution.set_distribution(distribution)

inputs = keras.Input((16,), name="features")
h = keras.layers.Dense(32, activation="relu", name="fc1")(inputs)
h = keras.layers.BatchNormalization(name="bn")(h)
model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="probs")(h))
original = [np.array(w) for w in model.get_weights()]
rewired = multidrop.insert_dropout(model, 0.5, seed=0)
rewired.compile("sgd", "sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x, y = rng.normal(size=(8, 16)).astype("float32"), rng.integers(0, 4, size=8)
before = [np.array(w) for w in rewired.get_weights()]
loss = rewired.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"]

# The dropout output on 8 copies of one input, in a jitted training-mode call on
# data sharded like fit shards it: each replica holds 4 rows and draws its own mask.
probe = keras.Model(rewired.inputs, rewired.get_layer("fc1_multidrop").output)
same = np.repeat(x[:1], 8, axis=0)
data = jax.device_put(same, distribution.get_data_layout(same.shape).backend_layout)
state = ([v.value for v in probe.trainable_variables],
         [v.value for v in probe.non_trainable_variables])
step = jax.jit(lambda t, n, d: probe.stateless_call(t, n, d, training=True)[0])
shards = sorted(step(*state, data).addressable_shards, key=lambda s: s.index[0].start)
print(json.dumps({
    "devices": len(jax.devices()),
    "loss": loss,
    "trained": [not np.array_equal(a, b) for a, b in zip(before, rewired.get_weights())],
    "original_untouched": all(np.array_equal(a, b) for a, b in zip(original, model.get_weights())),
    "kernel_replicated": rewired.get_layer("fc1").kernel.value.sharding.is_fully_replicated,
    "shard_devices": [str(s.device) for s in shards],
    "shard_masks": [(np.asarray(s.data) != 0).astype(int).tolist() for s in shards],
    "relu_zeros": (np.asarray(probe.layers[1](same)) == 0).astype(int).tolist(),
}))
"""


# Each runs in its own backend's nox session (every session installs all backends; one run
# is enough).
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs in the jax session")
def test_rewired_model_trains_under_data_parallel_with_a_mask_per_replica():
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["devices"] == 2
    assert np.isfinite(result["loss"][0])
    assert all(result["trained"])  # kernels, biases and BN statistics all moved
    assert result["original_untouched"]
    assert result["kernel_replicated"]
    assert len(set(result["shard_devices"])) == 2
    first, second = (np.array(mask) for mask in result["shard_masks"])
    assert first.shape == second.shape == (4, 32)
    assert not np.array_equal(first, second)  # same input, different masks per replica
    alive = np.array(result["relu_zeros"][:4]) == 0  # units the ReLU left non-zero
    assert 0.2 < first[alive].mean() < 0.8 and 0.2 < second[alive].mean() < 0.8  # rate 0.5


DDP_SCRIPT = r"""
import json, os, sys
import keras, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import multidrop
from multidrop import distributed

dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE and the rendezvous address
rank = dist.get_rank()
keras.utils.set_random_seed(0)  # the same starting model and data on every rank
inputs = keras.Input((16,))
h = keras.layers.Dense(32, activation="relu", name="fc1")(inputs)
model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
rewired = multidrop.insert_dropout(model, 0.5, seed=7)
ddp = DistributedDataParallel(rewired)  # copies rank 0's variables, dropout state included
# No reseed: multidrop folds the rank into the masks itself.
masks = [(multidrop.insert_dropout(model, 0.5, seed=7) if i else rewired).get_layer(
    "fc1_multidrop")(torch.ones(4, 32), training=True).ne(0).int().tolist() for i in range(2)]
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
ddp(torch.randn(8, 16), training=True).square().mean().backward()
optimizer.step()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": distributed.rank(), "masks": masks,
               "weights": [w.tolist() for w in rewired.get_weights()]}, f)
dist.destroy_process_group()
"""


def site_mask(seed=7):
    """The training mask of a fresh seeded dropout site on ones, in this (single) process."""
    inputs = keras.Input((16,))
    model = keras.Model(
        inputs, keras.layers.Dense(4)(keras.layers.Dense(32, activation="relu", name="fc1")(inputs))
    )
    layer = multidrop.insert_dropout(model, 0.5, seed=seed).get_layer("fc1_multidrop")
    return np.asarray(
        keras.ops.convert_to_numpy(layer(np.ones((4, 32), "float32"), training=True)) != 0
    ).astype(int)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="runs in the torch session")
def test_rewired_model_trains_under_torch_ddp_with_a_mask_per_rank(tmp_path):
    """Each rank draws its own masks with no user code, reproducibly from the seed; rank 0
    draws what a single process draws."""
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert [r["rank"] for r in ranks] == [0, 1]
    first, second = (np.array(r["masks"]) for r in ranks)
    assert np.array_equal(first[0], first[1]) and np.array_equal(second[0], second[1])  # seeded
    assert not np.array_equal(first[0], second[0])  # same input and seed, a mask per rank
    assert np.array_equal(first[0], site_mask())  # rank 0 is what one process draws
    assert 0.3 < second[0].mean() < 0.7  # rate 0.5 on rank 1 too
    trained = [np.array(w) for w in ranks[0]["weights"]]
    for mine, theirs in zip(trained, ranks[1]["weights"]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6)  # gradients averaged: replicas agree


JAX_PROCESS_SCRIPT = r"""
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import keras, numpy as np
import multidrop
from multidrop import distributed

inputs = keras.Input((16,))
h = keras.layers.Dense(32, activation="relu", name="fc1")(inputs)
model = keras.Model(inputs, keras.layers.Dense(4)(h))
layer = multidrop.insert_dropout(model, 0.5, seed=7).get_layer("fc1_multidrop")
mask = np.asarray(layer(np.ones((4, 32), "float32"), training=True)) != 0
print(json.dumps({"rank": distributed.rank(), "mask": mask.astype(int).tolist()}))
"""


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs in the jax session")
def test_each_jax_process_draws_its_own_masks(tmp_path):
    """Two JAX processes (jax.distributed on CPU, no keras.distribution), one seed: rank 0
    draws what a single process draws, rank 1 other masks, with no user code."""
    with socket.socket() as free:
        free.bind(("localhost", 0))
        address = f"localhost:{free.getsockname()[1]}"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", JAX_PROCESS_SCRIPT, address, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        done = [process.communicate(timeout=1800) for process in processes]
    finally:
        for process in processes:
            process.kill()  # one failed: the other waits for it forever
    for process, (_, err) in zip(processes, done):
        assert process.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in done]

    assert [r["rank"] for r in results] == [0, 1]
    first, second = (np.array(r["mask"]) for r in results)
    assert np.array_equal(first, site_mask())
    assert not np.array_equal(first, second)
    assert 0.3 < second.mean() < 0.7
