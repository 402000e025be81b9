"""The benchmarked Keras models, and the dropout variants built from each.

Every model is Functional (``keras.models.clone_model`` refuses a
``call_function`` for Sequential models) and ends in a linear classifier, so
the dropout sites are exactly its hidden activations.

Example:
    >>> from benchmarks import models
    >>> spec = models.SPECS["mlp"]
    >>> model = spec.build(spec.sizes["cpu"])
    >>> variants = models.keras_variants(model, rate=0.2)   # {"none": ..., "keras": ..., ...}
"""

from __future__ import annotations

import dataclasses

import keras
from keras import layers

import multidrop

CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Size:
    """One size of a benchmarked model: its batch, its input shape (no batch) and width."""

    batch: int
    input_shape: tuple
    width: int
    depth: int


@dataclasses.dataclass(frozen=True)
class Spec:
    """A benchmarked model: its builder and a size per profile (quick, cpu, gpu)."""

    build: object
    sizes: dict


def mlp(size: Size) -> keras.Model:
    """``depth`` Dense(width, relu) layers and a linear classifier."""
    x = inputs = keras.Input(size.input_shape, name="features")
    for i in range(size.depth):
        x = layers.Dense(size.width, activation="relu", name=f"fc{i + 1}")(x)
    return keras.Model(inputs, layers.Dense(CLASSES, name="logits")(x), name="mlp")


def cnn(size: Size) -> keras.Model:
    """A stem conv and ``depth`` residual blocks (conv-relu-conv, add, relu), pooled."""
    inputs = keras.Input(size.input_shape, name="images")
    x = layers.Conv2D(size.width, 3, padding="same", activation="relu", name="stem")(inputs)
    for i in range(size.depth):
        y = layers.Conv2D(size.width, 3, padding="same", activation="relu", name=f"b{i}_conv1")(x)
        y = layers.Conv2D(size.width, 3, padding="same", name=f"b{i}_conv2")(y)
        x = layers.Activation("relu", name=f"b{i}_relu")(layers.Add(name=f"b{i}_add")([x, y]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(CLASSES, name="logits")(x), name="cnn")


def transformer(size: Size) -> keras.Model:
    """``depth`` post-norm encoder blocks (4-head self-attention, a gelu MLP of 4x width)."""
    inputs = keras.Input(size.input_shape, name="tokens")
    x = inputs
    for i in range(size.depth):
        a = layers.MultiHeadAttention(4, size.width // 4, name=f"b{i}_attention")(x, x)
        x = layers.LayerNormalization(name=f"b{i}_norm1")(layers.Add(name=f"b{i}_add1")([x, a]))
        f = layers.Dense(4 * size.width, activation="gelu", name=f"b{i}_ff1")(x)
        f = layers.Dense(size.width, name=f"b{i}_ff2")(f)
        x = layers.LayerNormalization(name=f"b{i}_norm2")(layers.Add(name=f"b{i}_add2")([x, f]))
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(CLASSES, name="logits")(x), name="transformer")


def resnet50(size: Size) -> keras.Model:
    """``keras.applications.ResNet50``, random weights, with a linear classifier."""
    return keras.applications.ResNet50(
        weights=None, input_shape=size.input_shape, classes=CLASSES, classifier_activation=None
    )


SPECS = {
    "mlp": Spec(
        mlp,
        {
            "quick": Size(8, (32,), 32, 2),
            "cpu": Size(128, (1024,), 1024, 4),
            "gpu": Size(1024, (1024,), 1024, 4),
        },
    ),
    "cnn": Spec(
        cnn,
        {
            "quick": Size(2, (8, 8, 3), 4, 1),
            "cpu": Size(16, (32, 32, 3), 32, 3),
            "gpu": Size(128, (32, 32, 3), 64, 3),
        },
    ),
    "transformer": Spec(
        transformer,
        {
            "quick": Size(2, (8, 16), 16, 1),
            "cpu": Size(16, (64, 128), 128, 2),
            "gpu": Size(64, (256, 512), 512, 4),
        },
    ),
    "resnet50": Spec(
        resnet50,
        {
            "quick": Size(2, (32, 32, 3), 0, 0),
            "cpu": Size(8, (64, 64, 3), 0, 0),
            "gpu": Size(64, (224, 224, 3), 0, 0),
        },
    ),
}


def keras_variants(model: keras.Model, rate: float) -> dict[str, keras.Model]:
    """The model without dropout, and with dropout after every hidden activation
    placed three ways: Keras' own Dropout through ``clone_model``, multidrop
    unseeded, multidrop seeded."""
    return {
        "none": model,
        "keras": keras_dropout(model, rate),
        "multidrop": multidrop.insert_dropout(model, rate),
        "multidrop seeded": multidrop.insert_dropout(model, rate, seed=0),
    }


def keras_dropout(model: keras.Model, rate: float) -> keras.Model:
    """Keras' documented recipe: ``clone_model`` with a ``call_function`` that
    puts a ``keras.layers.Dropout`` after each of multidrop's sites."""
    names = {site.call.name for site in multidrop.plan(model, rate)}

    def call_function(layer, *args, **kwargs):
        output = layer(*args, **kwargs)
        return layers.Dropout(rate)(output) if layer.name in names else output

    return keras.models.clone_model(model, call_function=call_function)


def sites(model: keras.Model, rate: float) -> list[tuple]:
    """The output shape (batch excluded) of every dropout site."""
    return [site.shape[1:] for site in multidrop.plan(model, rate)]
