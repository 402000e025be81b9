"""Keras' Dropout made cheap on PyTorch: a counter-based hash mask, sync-free and seedable.

`Dropout` is what ``kind="dropout"`` inserts on the PyTorch backend. It *is* a
``keras.layers.Dropout`` (same arguments, config, variables and inference
behaviour) and it is saved as one, so a rewired model still loads with plain
Keras; only its training-mode mask is computed differently (see its docstring).

Example:
    >>> Dropout(0.2, seed=7)(x, training=True)   # same masks on every run
"""

import math

import keras

from multidrop import _keras

if keras.backend.backend() == "torch":
    import torch

# lowbias32 (C. Wellons' integer hash), its multipliers as int32
_M1, _M2 = 0x7FEB352D, 0x846CA68B - (1 << 32)
_SALT = 0x2545F491


class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose training path on PyTorch is cheap and sync-free.

    Keras' Dropout on PyTorch calls ``torch.nn.functional.dropout`` when unseeded
    (on CPU, a slow Bernoulli draw), and when seeded builds a new
    ``torch.Generator`` from the seed read back to the host on every call: a
    device sync, and a graph break under ``jit_compile=True``. This layer draws
    its mask from a counter-based hash of (seed, call count, element index),
    computed with a few int32 tensor ops: the seed and the count stay in the
    layer's seed-generator variable on the device, so there is no host read, no
    graph break, and a given seed gives the same masks eager or compiled, run
    after run. The rate is resolved to a multiple of 1/65536.

    Unseeded on a GPU it calls PyTorch's fused dropout kernel, as ``nn.Dropout``
    does. On the other backends it is Keras' Dropout unchanged. It is saved as
    ``keras.layers.Dropout``, so a saved model loads with plain Keras (and then
    runs Keras' own dropout).

    Example:
        >>> layer = Dropout(0.2, seed=7)
        >>> y = layer(x, training=True)     # ~20% zeros, the rest scaled by 1/0.8
        >>> z = layer(x, training=False)    # inference: x, unchanged
    """

    def call(self, inputs, training=False):
        if (
            not training
            or not 0 < self.rate < 1
            or keras.backend.backend() != "torch"
            or inputs.device.type == "meta"  # symbolic build
        ):
            return super().call(inputs, training=training)
        if self.seed is None and self.noise_shape is None and inputs.device.type != "cpu":
            return torch.nn.functional.dropout(inputs, self.rate, training=True)
        shape = inputs.shape
        if self.noise_shape is not None:
            shape = [d if n is None else n for d, n in zip(shape, self.noise_shape, strict=True)]
        state = self.seed_generator.state
        seed_and_count = state.value
        mask = _scaled_mask(shape, self.rate, seed_and_count).to(inputs.dtype)
        step = torch.arange(2, dtype=seed_and_count.dtype, device=seed_and_count.device)  # [0, 1]
        state.assign(seed_and_count + step)
        return inputs * mask


_keras.save_as(Dropout, "keras.layers.Dropout")  # a saved model loads without multidrop


def _mix(h, key=0):
    """lowbias32 on an int32 tensor, with ``key`` xor-ed in between its two rounds."""
    h = (h ^ (h >> 16) & 0xFFFF) * _M1 ^ key
    h = (h ^ (h >> 15) & 0x1FFFF) * _M2
    return h ^ (h >> 16) & 0xFFFF


def _scaled_mask(shape, rate: float, state):
    """A float32 tensor of ``shape``: 0 with probability ``rate``, else 1 / (1 - rate).

    ``state`` is ``[seed, call count]``. Each int32 hash gives two 16-bit draws,
    kept when at least a threshold; a clamp rather than a comparison does the
    thresholding, since bool tensors take slow paths on CPU.
    """
    size = math.prod(shape)
    keys = _mix(state ^ _SALT)
    index = torch.arange((size + 1) // 2, dtype=torch.int32, device=state.device)
    draws = _mix(index ^ keys[0], keys[1] ^ keys[0]).view(torch.int16)[:size].reshape(shape)
    threshold = round(rate * 65536) - 32768  # uniform int16 draws: P(draw >= threshold) = 1 - rate
    keep = (draws.to(torch.float32) - (threshold - 1)).clamp_(0, 1)
    return keep.mul_(1 / (1 - rate))
