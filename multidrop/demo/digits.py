"""The demo's data and model: scikit-learn's handwritten digits and a small CNN trained on them.

The digits (1,797 grey 8x8 images, 10 classes) ship inside scikit-learn, so
nothing is downloaded. ``python -m multidrop.demo.digits`` retrains the CNN and
rewrites ``multidrop/demo/digits_cnn.keras``; with the same backend and versions it
writes the same weights (the split, the initial weights and the batch order
all come from fixed seeds).

Example:
    >>> from multidrop import digits
    >>> (x_train, y_train), (x_val, y_val), (x_test, y_test) = digits.load()
    >>> x_train.shape
    (1078, 8, 8, 1)
    >>> model = keras.saving.load_model(digits.MODEL_PATH)
"""

from __future__ import annotations

import pathlib

import keras
import numpy as np

MODEL_PATH = pathlib.Path(__file__).with_name("digits_cnn.keras")
SHAPE = (8, 8, 1)
CLASSES = 10


def load(seed: int = 0):
    """The digits as ``(x, y)`` train, validation and test splits (60/20/20).

    Images are float32 in [0, 1], shaped ``(n, 8, 8, 1)``; labels are int 0-9.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = np.cumsum([int(0.6 * len(x)), int(0.2 * len(x))])
    return tuple((x[part], y[part]) for part in np.split(order, cut))


def build() -> keras.Model:
    """Two conv blocks with BatchNormalization, then a small dense head (about 14k weights).

    BatchNormalization's momentum is 0.9, not 0.99: with 34 steps an epoch its
    moving statistics would otherwise lag far behind the weights.
    """
    x = inputs = keras.Input(SHAPE, name="image")
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def train(epochs: int = 4, seed: int = 0) -> keras.Model:
    """Build and train the CNN on the train split.

    Only a few epochs, on purpose: the model is good but not finished, and the
    demo's fine-tuning has something left to do.
    """
    keras.utils.set_random_seed(seed)
    (x, y), validation, _ = load()
    model = build()
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(x, y, batch_size=32, epochs=epochs, validation_data=validation, verbose=2)
    return model


if __name__ == "__main__":
    trained = build()  # saved uncompiled, without the optimizer's state: a third of the size
    trained.set_weights(train().get_weights())
    trained.save(MODEL_PATH)
    size = MODEL_PATH.stat().st_size / 1024
    print(f"wrote {MODEL_PATH} ({size:.0f} KiB) on {keras.backend.backend()}")
