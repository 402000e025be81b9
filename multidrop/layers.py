"""The always-on dropout wrapper of Monte Carlo dropout.

`MonteCarlo` is used with ``mc=True`` and by ``mc_predict``; it is registered
for serialization, so a model saved with ``mc=True`` loads after ``import multidrop``.

Example:
    >>> layer = MonteCarlo(keras.layers.Dropout(0.1), name="fc1_multidrop")
    >>> layer(x, training=False)       # still drops 10% of x
"""

import keras


@keras.saving.register_keras_serializable(package="multidrop")
class MonteCarlo(keras.layers.Wrapper):
    """Runs the wrapped dropout layer in training mode on every call (Monte Carlo dropout)."""

    def call(self, inputs, training=None):
        return self.layer(inputs, training=True)

    def compute_output_shape(self, input_shape):
        return input_shape
