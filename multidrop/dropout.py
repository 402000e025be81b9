"""Keras' Dropout with a counter-based mask: the same masks on every backend.

`Dropout` is what ``kind="dropout"`` inserts. It *is* a ``keras.layers.Dropout``
(same arguments, config, variables and inference behaviour) and it is saved as
one, so a rewired model still loads with plain Keras; only its training-mode
mask is computed differently: from (seed, call count, element index), by `words`.

Example:
    >>> Dropout(0.2, seed=7)(x, training=True)   # the same masks on every run and backend

How the mask is drawn (`words`). Call ``count`` of a layer seeded ``seed`` first
derives its key ``(k0, k1)``: Threefry-2x32 (20 rounds: Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", 2011; the generator behind ``jax.random``) of
the counter ``(0, 0)`` under the key ``(seed, count)``, so seed and count enter
together through full rounds and two calls' keys are unrelated. Element ``j``
(row-major order over the input's shape, or over ``noise_shape`` and then
broadcast) then gets the word ``mix(mix(j + k0) ^ k1)``, with ``mix`` MurmurHash3's
32-bit finaliser (two multiplies, three xor-shifts: every input bit flips each
output bit with probability close to 1/2): a keyed two-round hash, a uniform
32-bit integer, about a third of Threefry's arithmetic per element. It is kept
when that word, read as a signed int32, is at least ``cutoff - 2**31`` with
``cutoff = round(rate * 2**32)``, and scaled by ``2**32 / (2**32 - cutoff)``: one
over the keep probability the threshold realises, so the output's expectation is
the input at every rate (rounded to float32, then to the input's dtype). This is
pure int32 addition, multiplication, xor and shifts, so every backend computes the
same bits. (Outputs agree bitwise too; a whole training step only within float
tolerance, since each backend sums its matrix products in its own order.) Masks
differ from earlier multidrop versions' (a counter hash with 16-bit thresholds,
then Threefry-2x32 per pair of elements). Indices wrap at 2**32 elements per call.

On PyTorch the layer runs a `torch.autograd.Function` that keeps no mask for
backward: it saves its call's ``[seed, count]`` (8 bytes) and draws the mask
again. Its hash, threshold and multiply are one function, `_kernel`. On a CPU it
runs compiled ahead of time by `multidrop.prebuilt` (one vectorised loop, loaded in
milliseconds from a per-machine cache; built once, in a background process, while the
first steps run it as eager int32 tensor ops: the same bits). On a GPU it is
``torch.compile``-d on the first training call (one Triton kernel); where compiling
fails it warns once and runs as eager tensor ops. Under
``jit_compile=True`` the function is traced into the model's graph instead. On JAX and TensorFlow
the mask is a few ``keras.ops`` integer ops in one XLA-compiled function
(``jax.jit``, ``tf.function(jit_compile=True)``), fused with the multiply even
outside a compiled train step; there autodiff keeps what XLA decides (no
mask-free backward).
"""

from __future__ import annotations

import math
import operator
import warnings

import keras
import numpy as np

from multidrop import _keras, distributed

BACKEND = keras.backend.backend()
if BACKEND == "torch":
    import torch

# Threefry-2x32's rotations and key-schedule parity constant (Random123, jax.random)
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = 0x1BD11BDA


def threefry(x0, x1, k0, k1, shl=operator.lshift, shr=operator.rshift):
    """Threefry-2x32 (20 rounds) of the counter ``(x0, x1)`` under the key ``(k0, k1)``.

    Works on int32 tensors of any backend, or numpy, with wrap-around addition:
    ``shl``/``shr`` are the backend's left and (arithmetic) right shifts; a
    rotation masks the arithmetic shift into a logical one. Bitwise the same as
    ``jax.random``'s ``threefry_2x32`` on the same words read as uint32.

    Example:
        >>> threefry(np.int32(0), np.int32(0), np.int32(0), np.int32(0))  # (0x6B200159, 0x99BA4EFE)
    """
    keys = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for i in range(20):
        r = _ROTATIONS[i % 8]
        x0 = x0 + x1
        x1 = (shl(x1, r) | shr(x1, 32 - r) & ((1 << r) - 1)) ^ x0
        if i % 4 == 3:  # key injection s
            s = i // 4 + 1
            x0, x1 = x0 + keys[s % 3], x1 + keys[(s + 1) % 3] + s
    return x0, x1


# MurmurHash3's 32-bit finaliser's multipliers, as int32
_MIX = (0x85EBCA6B - 2**32, 0xC2B2AE35 - 2**32)


def words(index, seed, count, shl=operator.lshift, shr=operator.rshift):
    """The uniform int32 word of element ``index`` in call ``count`` of a layer seeded
    ``seed``: ``mix(mix(index + k0) ^ k1)`` with ``(k0, k1)`` the call's `threefry` key.

    Works on int32 tensors of any backend, or numpy arrays (give numpy ``seed`` and
    ``count`` as one-element arrays: array arithmetic wraps without a warning).

    Example:
        >>> words(np.arange(4, dtype=np.int32), np.array([7], np.int32), np.array([0], np.int32))
    """
    return _hash(index, *threefry(0, 0, seed, count, shl, shr), shr)


def _hash(index, k0, k1, shr=operator.rshift):
    """`words` of ``index`` under the call's key ``(k0, k1)``."""

    def mix(x):  # MurmurHash3's fmix32; a logical shift is the arithmetic one, masked
        x = x ^ shr(x, 16) & 0xFFFF
        x = x * _MIX[0]
        x = x ^ shr(x, 13) & 0x7FFFF
        x = x * _MIX[1]
        return x ^ shr(x, 16) & 0xFFFF

    return mix(mix(index + k0) ^ k1)


def threshold(rate: float) -> tuple[int, float]:
    """``(t, scale)``: a uniform int32 word ``w`` keeps its element when ``w >= t``, with
    probability ``p = 1 - round(rate * 2**32) / 2**32``, and ``scale = 1 / p``, so that
    the output's expectation is the input (to float32 rounding) at every rate in (0, 1).

    Example:
        >>> threshold(0.5)
        (0, 2.0)
    """
    cutoff = min(round(rate * 2**32), 2**32 - 1)
    return cutoff - 2**31, 2**32 / (2**32 - cutoff)


class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` with a counter-based mask, identical on every backend.

    The mask is a function of (seed, call count, element index, rate): a given
    seed gives the same masks eager or compiled, run after run, on PyTorch, JAX
    and TensorFlow. The seed and the count live in the layer's
    ``seed_generator`` variable, as in Keras' Dropout, so there is no host read
    and no graph break, and under JAX's ``jit`` the count is carried as Keras
    carries any non-trainable state. An unseeded layer (``seed=None``) draws its
    seed once, at construction, from Python's ``random`` (as Keras'
    ``SeedGenerator`` does), so ``keras.utils.set_random_seed`` makes it
    reproducible too. The rate is resolved to a multiple of 2**-32 and the kept
    elements are scaled by one over the resolved keep probability: unbiased at
    every rate. Under DistributedDataParallel or several JAX processes each
    process folds its rank into the seed (`multidrop.distributed`), so replicas
    draw different masks.

    On PyTorch nothing of size of the input is kept for backward (the mask is
    drawn again), and the mask and multiply are one fused kernel. It is saved as
    ``keras.layers.Dropout``, so a saved model loads with plain Keras (and then
    runs Keras' own dropout).

    Example:
        >>> layer = Dropout(0.2, seed=7)
        >>> y = layer(x, training=True)     # ~20% zeros, the rest scaled by 1/0.8
        >>> z = layer(x, training=False)    # inference: x, unchanged
    """

    def call(self, inputs, training=False):
        if not training or not 0 < self.rate < 1:
            return super().call(inputs, training=training)
        if BACKEND != "torch":
            return _portable(self, inputs)
        if inputs.device.type == "meta":  # symbolic build
            return super().call(inputs, training=training)
        state = self.seed_generator.state
        value = distributed.fold(state.value)  # each process its own masks (rank 0: as is)
        if self.noise_shape is None:
            outputs, after = _MaskedMultiply.apply(inputs, value, self.rate)
        else:  # a small mask, broadcast: autograd keeps only it
            shape = [d if n is None else n for d, n in zip(inputs.shape, self.noise_shape)]
            ones = torch.ones(math.prod(shape), dtype=inputs.dtype, device=inputs.device)
            with torch.no_grad():
                mask, after, _ = _run(ones, value, *_constants(self.rate, ones))
            outputs = inputs * mask.view(shape)
        state.assign(distributed.fold(after))  # the user's seed stays in the variable
        return outputs


_keras.save_as(Dropout, "keras.layers.Dropout")  # a saved model loads without multidrop


def _portable(layer: Dropout, inputs):
    """``inputs * mask`` on JAX or TensorFlow, the layer's state advanced."""
    ops = keras.ops
    state = ops.cast(layer.seed_generator.next(), "int32")  # [seed, count]; count + 1
    state = distributed.fold(state)  # each process its own masks (rank 0: as is)
    t, scale = threshold(layer.rate)
    t, scale = np.int32(t), np.float32(scale)
    if layer.noise_shape is None:
        return _fused()(inputs, state, t, scale)
    shape = [d if n is None else n for d, n in zip(ops.shape(inputs), layer.noise_shape)]
    ones = ops.ones((math.prod(shape),), inputs.dtype)
    return inputs * ops.reshape(_masked(ones, state, t, scale), shape)  # small, broadcast


def _masked(x, state, t, scale):
    """In ``keras.ops``: ``x * mask`` for the call ``state = [seed, count]``, any shape."""
    ops = keras.ops
    if BACKEND == "tensorflow":  # any shape, known or not
        import tensorflow as tf

        shape, size = tf.shape(x), tf.size(x)
    else:
        shape, size = x.shape, math.prod(x.shape)
    index = ops.reshape(ops.arange(size, dtype="int32"), shape)  # row-major element order
    keep = words(index, state[0], state[1], ops.left_shift, ops.right_shift) >= t
    return x * ops.where(keep, ops.cast(scale, x.dtype), ops.zeros((), x.dtype))


_FUSED: list = []


def _fused():
    """`_masked` compiled by XLA, so that the hash, threshold and multiply fuse even outside
    a compiled train step (``jax.jit``; ``tf.function(jit_compile=True)``, which TensorFlow
    runs through XLA inside a plain ``tf.function`` too); inlined inside a compiled one.
    TensorFlow traces it once per dtype (any shape: XLA compiles each shape it meets)."""
    if not _FUSED:
        if BACKEND == "jax":
            import jax

            _FUSED.append(jax.jit(_masked))
        else:
            import tensorflow as tf

            functions = {}

            def per_dtype(x, state, t, scale):
                if x.dtype not in functions:
                    spec = [
                        tf.TensorSpec(None, x.dtype),
                        tf.TensorSpec([2], tf.int32),
                        tf.TensorSpec([], tf.int32),
                        tf.TensorSpec([], tf.float32),
                    ]
                    functions[x.dtype] = tf.function(
                        _masked, jit_compile=True, input_signature=spec
                    )
                return functions[x.dtype](x, state, t, scale)

            _FUSED.append(per_dtype)
    return _FUSED[0]


# ---- PyTorch ----------------------------------------------------------------------------------

_CONSTANTS: dict = {}


def _constants(rate: float, x) -> tuple:
    """``(t, scale)`` of `threshold` for ``x``: ``t`` a 0-d int32 tensor, ``scale`` rounded to
    float32 then to ``x``'s dtype, a 0-d tensor (cached; tensors, not numbers, so that a new
    rate needs no new kernel)."""
    key = (rate, x.dtype, x.device)
    constants = _CONSTANTS.get(key)
    if constants is None:
        t, scale = threshold(rate)
        t = torch.tensor(t, dtype=torch.int32, device=x.device)
        scale = torch.tensor(scale, dtype=torch.float32, device=x.device).to(x.dtype)
        constants = t, scale
        if not torch.compiler.is_compiling():
            _CONSTANTS[key] = constants
    return constants


def _kernel(x, state, t, scale, key=None):
    """``(x * mask, state + [0, 1], a copy of state)`` for a flat ``x`` and the call
    ``state = [seed, count]``: the hash, the threshold and the multiply in one pass. ``key``:
    the call's key, where the caller has it already (else derived from ``state``)."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).to(torch.int32)
    keep = (words(index, state[0], state[1]) if key is None else _hash(index, *key)) >= t
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    step = torch.tensor([0, 1], dtype=state.dtype, device=state.device)
    return x * torch.where(keep, scale, zero), state + step, state.clone()


_SMALL = 1 << 15  # elements: below this, one thread (as PyTorch's own grain size)
_COMPILED: list = []


def _run(x, state, t, scale):
    """`_kernel` by the function `_pick` chooses for ``x``."""
    return _pick(x)(x, state, t, scale)


def _pick(x):
    """What runs `_kernel` for a flat ``x``: traced into the graph under torch.compile; on a
    CPU the kernel `prebuilt` compiles ahead of time (eager tensor ops until it is built: the
    same bits); on other devices `_kernel` compiled once by torch.compile."""
    if torch.compiler.is_compiling():
        return _traced
    if x.device.type == "cpu":
        from multidrop import prebuilt

        threads = 1 if x.numel() < _SMALL else torch.get_num_threads()
        return (prebuilt.kernel(x.dtype, threads) if x.numel() >= 2 else None) or _eager
    if not _COMPILED:
        _COMPILED.append(_Fallback(torch.compile(_kernel, dynamic=True)))
    return _COMPILED[0]


def _eager(x, state, t, scale):
    """`_kernel` as eager tensor ops on a CPU, the call's key derived on the host (its 20
    rounds as ~200 numpy operations on one word, not as that many tensor operations)."""
    seed, count = state.numpy().reshape(2, 1)  # one-element arrays wrap without a warning
    key = tuple(int(k[0]) for k in threefry(0, 0, seed, count))
    return _kernel(x, state, t, scale, key)


def _traced(x, state, t, scale):
    return _kernel(x, _snapshot(state), t, scale)


class _Fallback:
    """Call a compiled `_kernel`; should compiling it fail, warn once and run `_kernel` as
    eager tensor ops (the same masks, slower)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # no Triton, an unsupported device...
                self.compiled = None
                warnings.warn(
                    f"multidrop: torch.compile of the dropout kernel failed ({error!r:.300}); "
                    "running it as slower eager tensor ops.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _kernel(*args)


if BACKEND == "torch":

    @torch.library.custom_op("multidrop::snapshot", mutates_args=())
    def _snapshot(state: torch.Tensor) -> torch.Tensor:
        """A copy of ``state``, opaque to torch.compile. The layer advances ``state`` in
        place after reading it; were the mask derived from ``state`` itself, AOTAutograd's
        partitioner could recompute it in backward from the advanced state (it recomputes
        reads of mutated inputs: pytorch/pytorch#197039). It does not recompute this op: it
        saves its 8 bytes."""
        return state.clone()

    @_snapshot.register_fake
    def _(state):
        return torch.empty_like(state)

    class _MaskedMultiply(torch.autograd.Function):
        """``x * mask`` that keeps only its call's [seed, count] for backward, not the mask."""

        @staticmethod
        def forward(ctx, x, state, rate):
            """``(x * mask, next state)``."""
            # detached: the kernel is compiled for tensors that do not require grad; the state
            # (8 bytes) goes where x is, as Keras' own ops take a CPU tensor on a GPU machine
            state = state.detach().to(x.device)
            flat = x.detach().reshape(-1)
            kernel, constants = _pick(flat), _constants(rate, x)
            y, after, before = kernel(flat, state, *constants)
            ctx.save_for_backward(before)
            ctx.kernel, ctx.constants, ctx.shape = kernel, constants, x.shape
            ctx.mark_non_differentiable(after)
            return y.view(x.shape), after

        @staticmethod
        def backward(ctx, dy, _):
            (before,) = ctx.saved_tensors
            dx = ctx.kernel(dy.reshape(-1), before, *ctx.constants)[0]
            return dx.view(ctx.shape), None, None
