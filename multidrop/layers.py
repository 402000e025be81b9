"""The always-on wrapper of Monte Carlo dropout.

`MonteCarlo` is used with ``mc=True`` and by ``mc_predict``; it is registered
for serialization, so a model saved with ``mc=True`` loads after ``import multidrop``.

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
