"""Subclassed models and custom layers, re-typed from keras-io examples and keras-hub.

Each factory returns ``(model, x)``: a built model with seeded weights and a batch it
takes. The classes are registered (package ``corpus``), as Keras requires for saving
any subclassed model, so their ``.keras`` files load while this module is imported.

Example:
    >>> model, x = FACTORIES["mlp"]()
    >>> model(x, training=False)
"""

import keras
import keras_hub
import numpy as np
from keras import layers, ops
from models import randomize, tiny_hub

register = keras.saving.register_keras_serializable(package="corpus")


@register
class MLP(keras.Model):
    """keras-io "Making new layers and models via subclassing": an MLP as a Model."""

    def __init__(self, units=16, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.units, self.classes = units, classes
        self.linear_1 = layers.Dense(units, activation="relu")
        self.linear_2 = layers.Dense(units, activation="relu")
        self.out = layers.Dense(classes)

    def call(self, x):
        return self.out(self.linear_2(self.linear_1(x)))

    def get_config(self):
        return {**super().get_config(), "units": self.units, "classes": self.classes}


@register
class ConvBlock(layers.Layer):
    """Conv, BatchNormalization, ReLU: a block holding a BatchNormalization."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = layers.Conv2D(filters, 3, padding="same", use_bias=False)
        self.bn = layers.BatchNormalization()
        self.act = layers.ReLU()

    def call(self, x, training=None):
        return self.act(self.bn(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@register
class CNN(keras.Model):
    """A subclassed CNN of two ConvBlocks, pooling and a head."""

    def __init__(self, classes=4, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.block_1 = ConvBlock(8)
        self.block_2 = ConvBlock(8)
        self.pool = layers.GlobalAveragePooling2D()
        self.head = layers.Dense(classes)

    def call(self, x, training=None):
        x = self.block_2(self.block_1(x, training=training), training=training)
        return self.head(self.pool(x))

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


@register
class TransformerBlock(layers.Layer):
    """keras-io "Text classification with Transformer": its TransformerBlock, verbatim in
    structure (a keras.Sequential feed-forward inside a custom layer)."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.ff_dim, self.rate = embed_dim, num_heads, ff_dim, rate
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs, training=None):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output, training=training)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output, training=training)
        return self.layernorm2(out1 + ffn_output)

    def get_config(self):
        names = ("embed_dim", "num_heads", "ff_dim", "rate")
        return {**super().get_config(), **{n: getattr(self, n) for n in names}}


@register
class TokenAndPositionEmbedding(layers.Layer):
    """keras-io's token and position embedding, summed."""

    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.maxlen, self.vocab_size, self.embed_dim = maxlen, vocab_size, embed_dim
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = self.pos_emb(ops.arange(0, ops.shape(x)[-1], 1))
        return self.token_emb(x) + positions

    def get_config(self):
        names = ("maxlen", "vocab_size", "embed_dim")
        return {**super().get_config(), **{n: getattr(self, n) for n in names}}


@register
class Encoder(layers.Layer):
    """An encoder layer: self-attention, residual, layer norm."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.attention = layers.MultiHeadAttention(num_heads=2, key_dim=dim)
        self.norm = layers.LayerNormalization()

    def call(self, x):
        return self.norm(x + self.attention(x, x))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@register
class Decoder(layers.Layer):
    """A decoder layer: cross-attention on the encoder's output, then a GELU feed-forward."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.cross = layers.MultiHeadAttention(num_heads=2, key_dim=dim)
        self.norm = layers.LayerNormalization()
        self.ffn = layers.Dense(2 * dim, activation="gelu")
        self.proj = layers.Dense(dim)

    def call(self, x, context):
        x = self.norm(x + self.cross(x, context))
        return x + self.proj(self.ffn(x))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@register
class Seq2Seq(keras.Model):
    """An encoder-decoder on a dict of ``source`` and ``target`` sequences."""

    def __init__(self, dim=8, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.embed = layers.Dense(dim)
        self.encoder = Encoder(dim)
        self.decoder = Decoder(dim)
        self.head = layers.Dense(5)

    def call(self, inputs):
        context = self.encoder(self.embed(inputs["source"]))
        return self.head(self.decoder(self.embed(inputs["target"]), context))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@register
class VAEEncoder(keras.Model):
    """keras-io "Variational AutoEncoder": the encoder, two outputs (z_mean, z_log_var)."""

    def __init__(self, latent_dim=2, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.conv = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")
        self.flatten = layers.Flatten()
        self.dense = layers.Dense(16, activation="relu")
        self.z_mean = layers.Dense(latent_dim, name="z_mean")
        self.z_log_var = layers.Dense(latent_dim, name="z_log_var")

    def call(self, x):
        h = self.dense(self.flatten(self.conv(x)))
        return self.z_mean(h), self.z_log_var(h)

    def get_config(self):
        return {**super().get_config(), "latent_dim": self.latent_dim}


@register
class WeightedLossModel(keras.Model):
    """keras-io "Customizing what happens in fit()", the backend-independent way: its own
    compute_loss (the loss doubled) and a metric it tracks itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(16, activation="tanh")
        self.out = layers.Dense(1)
        self.loss_tracker = keras.metrics.Mean(name="doubled_loss")

    def call(self, x):
        return self.out(self.hidden(x))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = 2.0 * ops.mean(ops.square(y - y_pred))
        self.loss_tracker.update_state(loss)
        return loss


@register
class ResidualStack(layers.Layer):
    """A layer holding a list of sublayers: residual MLP steps, ``x + dense(x)``."""

    def __init__(self, dim, depth=3, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.depth = dim, depth
        self.steps = [layers.Dense(dim, activation="relu") for _ in range(depth)]

    def call(self, x):
        for step in self.steps:
            x = x + step(x)
        return x

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "depth": self.depth}


@register
class Heads(layers.Layer):
    """A layer holding a dict of sublayers, and one sublayer called twice (tied)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shared = layers.Dense(6, activation="relu")
        self.heads = {"a": layers.Dense(2), "b": layers.Dense(2)}

    def call(self, x):
        h = self.shared(self.shared(x))
        return ops.concatenate([self.heads["a"](h), self.heads["b"](h)], axis=-1)


@register
class TransferModel(keras.Model):
    """keras-io "Transfer learning & fine-tuning", subclassed: a frozen backbone (a nested
    Sequential with BatchNormalization) called with training=False, the keras-io
    dropout with training=training, and a head."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backbone = keras.Sequential(
            [layers.Dense(16, activation="relu"), layers.BatchNormalization()], name="bb"
        )
        self.backbone.trainable = False
        self.drop = layers.Dropout(0.2)
        self.head = layers.Dense(16, activation="relu")
        self.out = layers.Dense(3)

    def call(self, x, training=None):
        h = self.drop(self.backbone(x, training=False), training=training)
        return self.out(self.head(h))


def _built(model, x, seed=0):
    model(x)
    return randomize(model, seed), x


def _floats(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def mlp():
    return _built(MLP(), _floats(4, 10))


def cnn():
    return _built(CNN(), _floats(4, 8, 8, 3))


def transformer_block():
    inputs = keras.Input((8,), dtype="int32")
    x = TokenAndPositionEmbedding(8, 50, 16)(inputs)
    x = TransformerBlock(16, 2, 16, name="block")(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dense(8, activation="relu")(x)
    model = keras.Model(inputs, layers.Dense(2, activation="softmax")(x), name="text")
    ids = np.random.default_rng(0).integers(0, 50, (4, 8)).astype("int32")
    return randomize(model), ids


def seq2seq():
    x = {"source": _floats(4, 6, 3), "target": _floats(4, 5, 3, seed=1)}
    return _built(Seq2Seq(), x)


def vae_encoder():
    return _built(VAEEncoder(), _floats(4, 8, 8, 1))


def custom_loss():
    return _built(WeightedLossModel(), _floats(4, 6))


def residual_stack():
    inputs = keras.Input((8,))
    x = ResidualStack(8, name="stack")(layers.Dense(8, name="stem")(inputs))
    model = keras.Model(inputs, layers.Dense(2, name="out")(x))
    return randomize(model), _floats(4, 8)


def heads():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, layers.Dense(3)(Heads(name="heads")(inputs)))
    return randomize(model), _floats(4, 6)


def transfer():
    return _built(TransferModel(), _floats(4, 6))


def _hub_inputs(segment=True):
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 50, (4, 8)).astype("int32"), "padding_mask": np.ones((4, 8))}
    x["padding_mask"] = x["padding_mask"].astype("int32")
    if segment:
        x["segment_ids"] = np.zeros((4, 8), "int32")
    return x


def bert():
    return randomize(tiny_hub(keras_hub.models.BertBackbone, dropout=0.1)), _hub_inputs()


def gpt2():
    return randomize(tiny_hub(keras_hub.models.GPT2Backbone)), _hub_inputs(segment=False)


def bert_classifier():
    backbone = tiny_hub(keras_hub.models.BertBackbone, dropout=0.1)
    task = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    return randomize(task), _hub_inputs()


FACTORIES = {
    f.__name__: f
    for f in (
        mlp,
        cnn,
        transformer_block,
        seq2seq,
        vae_encoder,
        custom_loss,
        residual_stack,
        heads,
        transfer,
        bert,
        gpt2,
        bert_classifier,
    )
}
