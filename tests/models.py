"""Small model factories shared by the tests. Each returns a fresh, built model.

Weights are drawn from a seeded generator (BatchNormalization statistics
included), so outputs are non-trivial and every test process sees the same model.

Example:
    >>> from models import multi_io
    >>> model = multi_io()
    >>> model({"image": images, "tokens": ids}, training=False)   # {"label": ..., "score": ...}
"""

import keras
import numpy as np


def tiny_hub(cls, **config):
    """A keras-hub transformer backbone ``cls`` from its constructor (no preset): two blocks
    of width 8, sequences of 8 tokens, a vocabulary of 50; ``config`` overrides any of it."""
    defaults = dict(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    return cls(**{**defaults, **config})


def randomize(model, seed: int = 0):
    """Give every weight of ``model`` seeded random values (variances stay positive)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(0.0, 0.5, variable.shape)
        if "variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value.astype(variable.dtype))
    return model


def multi_io(vocab: int = 50, seed: int = 0) -> keras.Model:
    """Two inputs, two outputs: a residual conv block with BatchNormalization on
    ``image`` (16x16x3), an Embedding branch on integer ``tokens`` (8 ids below
    ``vocab``), merged into a head with a ``label`` softmax and a ``score``."""
    image = keras.Input((16, 16, 3), name="image")
    tokens = keras.Input((8,), dtype="int32", name="tokens")

    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(image)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    shortcut = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(shortcut)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="conv2_bn")(x)
    x = keras.layers.Add(name="residual")([x, shortcut])
    x = keras.layers.Activation("relu", name="block_relu")(x)
    pictures = keras.layers.GlobalAveragePooling2D(name="pool")(x)

    t = keras.layers.Embedding(vocab, 8, name="embedding")(tokens)
    t = keras.layers.GlobalAveragePooling1D(name="token_pool")(t)
    words = keras.layers.Dense(8, activation="gelu", name="token_dense")(t)

    h = keras.layers.Concatenate(name="merge")([pictures, words])
    h = keras.layers.Dense(16, activation="relu", name="head")(h)
    outputs = {
        "label": keras.layers.Dense(3, activation="softmax", name="label")(h),
        "score": keras.layers.Dense(1, name="score")(h),
    }
    model = keras.Model({"image": image, "tokens": tokens}, outputs, name="multi_io")
    return randomize(model, seed)


def nested_embedding(vocab: int = 7, seed: int = 0) -> keras.Sequential:
    """A Sequential text classifier whose Embedding sits in a nested Sequential
    encoder, behind a Reshape: integer ids must stay below ``vocab``."""
    encoder = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Reshape((3, 2)),
            keras.layers.Embedding(vocab, 4),
            keras.layers.Reshape((3, 8)),
        ],
        name="encoder",
    )
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            encoder,
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(2),
        ],
        name="nested_embedding",
    )
    return randomize(model, seed)
