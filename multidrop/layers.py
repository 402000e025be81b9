"""multidrop's two wrappers: always-on Monte Carlo dropout, and "this layer, then that one".

`MonteCarlo` is used with ``mc=True`` and by ``mc_predict``; `Then` puts a dropout
after a sublayer inside a ``call()`` (see `multidrop.surgery`). Both are registered
for serialization, so a model that holds them loads after ``import multidrop``.

Example:
    >>> layer = MonteCarlo(keras.layers.Dropout(0.1), name="fc1_multidrop")
    >>> layer(x, training=False)       # still drops 10% of x
"""

import keras

from multidrop import _keras


@keras.saving.register_keras_serializable(package="multidrop")
class MonteCarlo(keras.layers.Wrapper):
    """Calls the wrapped layer in training mode on every call (Monte Carlo dropout).

    It wraps a dropout layer (``mc=True``), or, in `multidrop.mc_predict`, a layer
    whose own dropout is set (attention, recurrent or a keras-hub block's), and
    passes every argument through, with ``training=True``.
    """

    def call(self, *args, **kwargs):
        kwargs["training"] = True
        with _keras.training_kept():  # the layers after this one keep the model's mode
            return self.layer(*args, **kwargs)


@keras.saving.register_keras_serializable(package="multidrop")
class Then(keras.layers.Wrapper):
    """Calls the wrapped layer, then ``after`` on its output: how multidrop puts a layer
    after a sublayer inside a ``call()`` it cannot rewrite.

    Every argument goes to the wrapped layer; ``after`` gets its output (one tensor) and
    the same ``training``. In inference a dropout passes its input through, so the
    result is bitwise the wrapped layer's.

    Example:
        >>> block.ffn = Then(block.ffn, multidrop.dropout.Dropout(0.1))  # on a copy, by surgery
    """

    def __init__(self, layer, after, **kwargs):
        kwargs.setdefault("name", f"{layer.name}_then")
        super().__init__(layer, **kwargs)
        self.after = after

    def build(self, input_shape=None):
        self.built = True  # made around a built layer, with an ``after`` that has no weights

    def call(self, *args, **kwargs):
        outputs = self.layer(*args, **kwargs)
        training = {"training": kwargs["training"]} if "training" in kwargs else {}
        return self.after(outputs, **training)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "after": keras.saving.serialize_keras_object(self.after)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("layer", "after"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
