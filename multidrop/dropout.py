"""Keras' Dropout with a counter-based hash mask: the same masks on every backend, cheap everywhere.

`Dropout` is what ``kind="dropout"`` inserts. It *is* a ``keras.layers.Dropout``
(same arguments, config, variables and inference behaviour) and it is saved as
one, so a rewired model still loads with plain Keras; only its training-mode
mask is computed differently: from a hash of (seed, call count, element index).

Example:
    >>> Dropout(0.2, seed=7)(x, training=True)   # the same masks on every run and backend

How the mask is drawn. Element ``j`` of a call (row-major order over the
input's shape, or over ``noise_shape`` and then broadcast) reads the 16-bit half
``j % 2`` of ``lowbias32(j // 2 ^ k0, key k1 ^ k0)`` (C. Wellons' integer hash, a
key xor-ed between its rounds), where ``k0, k1 = lowbias32([seed, count] ^ salt)``;
it is kept when that half, its top bit flipped, is at least
``round(rate * 65536)``, and scaled by ``1 / (1 - rate)`` (rounded to float32,
then to the input's dtype). This is pure int32 arithmetic, so every backend
computes the same bits. (Outputs agree bitwise too; a whole training step only
within float tolerance, since each backend sums its matrix products in its own
order.)

On PyTorch the layer runs a `torch.autograd.Function` that keeps no mask for
backward: it saves its call's ``[seed, count]`` (8 bytes) and draws the mask
again. Its hash, threshold and multiply are one ``torch.compile``-d function (one
vectorised loop on CPU, one Triton kernel on a GPU), called from eager code and
compiled on the first training call in a process (seconds; Inductor caches it on
disk for the next process); where compiling fails it warns once and runs the
same mask as a few int32 tensor ops. Under ``jit_compile=True`` the function is
traced into the model's graph instead. On JAX and TensorFlow the mask is a few
``keras.ops`` integer ops in one XLA-compiled function (``jax.jit``,
``tf.function(jit_compile=True)``), fused with the multiply even outside a compiled
train step; there autodiff keeps what XLA decides (no mask-free backward).
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

# lowbias32's multipliers as int32, and the salt that keeps the keys of small seeds apart
_M1, _M2 = 0x7FEB352D, 0x846CA68B - (1 << 32)
_SALT = 0x2545F491


def _mix(h, key=0, shr=operator.rshift):
    """lowbias32 on an int32 tensor (torch, jax, tensorflow or numpy), ``key`` xor-ed
    between its two rounds; ``shr`` is the backend's arithmetic right shift."""
    h = (h ^ shr(h, 16) & 0xFFFF) * _M1 ^ key
    h = (h ^ shr(h, 15) & 0x1FFFF) * _M2
    return h ^ shr(h, 16) & 0xFFFF


def _keep(pair, odd, keys, cutoff, shr=operator.rshift):
    """True where an element is kept; element ``j`` has ``pair = j // 2`` and ``odd = j % 2``
    (int32), ``keys`` are ``_mix([seed, count] ^ _SALT)`` and ``cutoff = round(rate * 65536)``."""
    h = _mix(pair ^ keys[0], keys[1] ^ keys[0], shr)
    return ((shr(h, odd * 16) & 0xFFFF) ^ 0x8000) >= cutoff


class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` with a counter-based hash mask, identical on every backend.

    The mask is a function of (seed, call count, element index, rate): a given
    seed gives the same masks eager or compiled, run after run, on PyTorch, JAX
    and TensorFlow. The seed and the count live in the layer's
    ``seed_generator`` variable, as in Keras' Dropout, so there is no host read
    and no graph break, and under JAX's ``jit`` the count is carried as Keras
    carries any non-trainable state. An unseeded layer (``seed=None``) draws its
    seed once, at construction, from Python's ``random`` (as Keras'
    ``SeedGenerator`` does), so ``keras.utils.set_random_seed`` makes it
    reproducible too. The rate is resolved to a multiple of 1/65536. Under
    DistributedDataParallel or several JAX processes each process folds its rank
    into the seed (`multidrop.distributed`), so replicas draw different masks.

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
            outputs, after = _HashDropout.apply(inputs, value, self.rate)
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
    if layer.noise_shape is None:
        return _fused()(inputs, state, layer.rate)
    shape = [d if n is None else n for d, n in zip(ops.shape(inputs), layer.noise_shape)]
    index = ops.reshape(ops.arange(math.prod(shape), dtype="int32"), shape)
    return inputs * _mask(index, state, layer.rate, inputs.dtype)  # small, broadcast


def _mask(index, state, rate: float, dtype):
    """In ``keras.ops``: the mask (0 or the scale) of elements ``index`` (int32) in the call
    ``state = [seed, count]``."""
    ops = keras.ops
    keys = _mix(state ^ _SALT, shr=ops.right_shift)
    keep = _keep(ops.right_shift(index, 1), index & 1, keys, round(rate * 65536), ops.right_shift)
    return ops.cast(ops.cast(keep, "float32") * np.float32(1 / (1 - rate)), dtype)


def _masked(x, state, rate: float):
    if BACKEND == "tensorflow":  # any shape, known or not
        import tensorflow as tf

        index = tf.reshape(tf.range(tf.size(x)), tf.shape(x))
    else:
        index = keras.ops.reshape(keras.ops.arange(x.size, dtype="int32"), x.shape)
    return x * _mask(index, state, rate, x.dtype)


_FUSED: list = []


def _fused():
    """`_masked` compiled by XLA, so that the hash, threshold and multiply fuse even outside
    a compiled train step (``jax.jit``; ``tf.function(jit_compile=True)``, which TensorFlow
    runs through XLA inside a plain ``tf.function`` too); inlined inside a compiled one."""
    if not _FUSED:
        if BACKEND == "jax":
            import jax

            _FUSED.append(jax.jit(_masked, static_argnums=2))
        else:
            import tensorflow as tf

            _FUSED.append(tf.function(_masked, jit_compile=True, reduce_retracing=True))
    return _FUSED[0]


# ---- PyTorch ----------------------------------------------------------------------------------

_SCALES: dict = {}
_SMALL = 1 << 15  # elements: below this, one thread (as PyTorch's own grain size)


def _constants(rate: float, x) -> tuple:
    """``(cutoff, scale)`` for ``x``: ``round(rate * 65536)``, and ``1 / (1 - rate)`` rounded
    to float32 then to ``x``'s dtype, a 0-d tensor (cached; a tensor, not a float, so that a
    new rate does not compile the kernel again)."""
    key = (rate, x.dtype, x.device)
    scale = _SCALES.get(key)
    if scale is None:
        scale = torch.tensor(1 / (1 - rate), dtype=torch.float32, device=x.device).to(x.dtype)
        if not torch.compiler.is_compiling():
            _SCALES[key] = scale
    return round(rate * 65536), scale


def _kernel(x, state, cutoff: int, scale):
    """``(x * mask, state + [0, 1], a copy of state)`` for a flat ``x`` and the call
    ``state = [seed, count]``: the hash, the threshold and the multiply in one pass."""
    keys = _mix(state ^ _SALT)
    index = torch.arange(x.numel(), device=x.device)
    keep = _keep((index >> 1).to(torch.int32), (index & 1).to(torch.int32), keys, cutoff)
    step = torch.tensor([0, 1], dtype=state.dtype, device=state.device)
    return x * torch.where(keep, scale, 0), state + step, state.clone()


def _kernel_eager(x, state, cutoff: int, scale):
    """`_kernel` in a few full-size int32 passes, for where ``torch.compile`` fails: one
    hash gives two 16-bit draws, and a clamp rather than a comparison thresholds them
    (bool tensors take slow paths on CPU)."""
    keys = _mix(state ^ _SALT)
    size = x.numel()
    pair = torch.arange((size + 1) // 2, dtype=torch.int32, device=x.device)
    draws = _mix(pair ^ keys[0], keys[1] ^ keys[0]).view(torch.int16)[:size]
    keep = (draws.to(torch.float32) - (cutoff - 0x8000 - 1)).clamp_(0, 1)
    step = torch.arange(2, dtype=state.dtype, device=state.device)  # [0, 1]
    return x * keep.mul_(scale.to(torch.float32)).to(x.dtype), state + step, state.clone()


def _one_thread(*args):  # two code objects, so that torch.compile keeps two kernels
    return _kernel(*args)


def _threads(*args):
    return _kernel(*args)


_COMPILED: dict = {}


def _run(x, state, cutoff: int, scale):
    """`_kernel`: traced into the graph under torch.compile; else compiled once (one kernel
    for small ``x`` on one thread, one for large ``x`` on all of PyTorch's threads)."""
    if torch.compiler.is_compiling():
        return _kernel(x, _snapshot(state), cutoff, scale)
    small = x.numel() < _SMALL and x.device.type == "cpu"
    kernel = _COMPILED.get(small)
    if kernel is None:
        options = {"cpp.threads": 1} if small else {}
        function = _one_thread if small else _threads
        kernel = _COMPILED[small] = _Fallback(
            torch.compile(function, dynamic=True, options=options)
        )
    return kernel(x, state, cutoff, scale)


class _Fallback:
    """Call a compiled `_kernel`; should compiling it fail, warn once and run `_kernel_eager`."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # no C++ compiler, no Triton, an unsupported device...
                self.compiled = None
                warnings.warn(
                    f"multidrop: torch.compile of the dropout kernel failed ({error!r:.300}); "
                    "running it as slower eager tensor ops.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _kernel_eager(*args)


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

    class _HashDropout(torch.autograd.Function):
        """``x * mask`` that keeps only its call's [seed, count] for backward, not the mask."""

        @staticmethod
        def forward(ctx, x, state, rate):
            """``(x * mask, next state)``."""
            # detached: the kernel is compiled for tensors that do not require grad
            y, after, before = _run(x.detach().reshape(-1), state.detach(), *_constants(rate, x))
            ctx.save_for_backward(before)
            ctx.rate, ctx.shape = rate, x.shape
            ctx.mark_non_differentiable(after)
            return y.view(x.shape), after

        @staticmethod
        def backward(ctx, dy, _):
            (before,) = ctx.saved_tensors
            dx = _run(dy.reshape(-1), before, *_constants(ctx.rate, dy))[0]
            return dx.view(ctx.shape), None, None
