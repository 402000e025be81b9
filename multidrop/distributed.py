"""Which process this is, so that each replica of a data-parallel run draws its own masks.

Under PyTorch's ``DistributedDataParallel`` every process runs the same model on
its own shard of the batch. DDP copies rank 0's variables to every rank when it
wraps the model, dropout's ``[seed, count]`` state included, so without help
every rank would draw the same masks. Multi-process JAX without a Keras
distribution is the same. `fold` gives each process its own masks from the one
seed the user set: it XORs a number derived from the process's rank into the
seed word, the first word of the dropout kernel's key, and leaves rank 0 (and a
single process) exactly as it is.

Folding twice restores the state (XOR), so the kernel folds the state it reads
and the state it writes back: the stored ``[seed, count]`` stays the user's on
every rank, and a checkpoint from any rank holds the same seed.

Under a ``keras.distribution`` (``DataParallel`` on JAX) nothing is folded: the
mask is drawn for the global batch, and each device already gets its own rows.

Example:
    >>> from multidrop import distributed
    >>> distributed.rank()                      # 0 outside torchrun / jax.distributed
    0
    >>> keys = distributed.fold(state)          # [seed ^ f(rank), count]; state itself at rank 0
"""

from __future__ import annotations

import keras

# An odd 32-bit constant (2^32 / golden ratio): rank r folds in r * _GOLDEN mod 2^32,
# distinct for every rank below 2^32 and 0 for rank 0.
_GOLDEN = 0x9E3779B9


def rank() -> int:
    """This process's rank among those training one model, 0 when there is only one.

    The rank of ``torch.distributed`` once its process group is initialized (DDP,
    ``torchrun``); ``jax.process_index()`` when JAX runs several processes and no
    ``keras.distribution`` is set; else 0.

    Returns:
        The rank, an int >= 0.

    Example:
        >>> dist.init_process_group("gloo")     # under torchrun --nproc_per_node=2
        >>> multidrop.distributed.rank()        # 0 on one process, 1 on the other
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if backend == "jax":
        import jax

        if jax.process_count() > 1 and keras.distribution.distribution() is None:
            return jax.process_index()
    return 0


def fold(state):
    """``state`` (a dropout's int32 ``[seed, count]`` tensor, any backend) with this
    process's rank folded into the seed word; ``state`` itself on rank 0.

    Args:
        state: an int32 tensor of shape ``(2,)``.

    Returns:
        ``[seed ^ f(rank), count]``, a tensor of ``state``'s backend and dtype.

    Example:
        >>> words(index, *distributed.fold(state))   # the dropout kernel's words
    """
    word = rank() * _GOLDEN % 2**32
    if word == 0:
        return state
    word -= 2**32 * (word >= 2**31)  # as int32
    return keras.ops.bitwise_xor(state, keras.ops.convert_to_tensor([word, 0], dtype=state.dtype))
