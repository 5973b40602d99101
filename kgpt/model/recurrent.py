"""The GRU-with-attention language model: the recurrent baseline (`[model] kind = "gru"`)."""

import keras
from keras import ops

from kgpt.config import ModelConfig

# The `ModelConfig` fields this model takes; the GPT-only ones (intermediate_dim, ...) are unused.
FIELDS = ("vocabulary_size", "sequence_length", "num_layers", "num_heads", "hidden_dim", "dropout",
          "layer_norm_epsilon", "initializer_range")


@keras.saving.register_keras_serializable(package="kgpt")
class RecurrentLanguageModel(keras.Model):
    """GRU language model with causal attention over its own past states (pre-Transformer LM).

    token embedding -> dropout -> `num_layers` GRUs -> x + MultiHeadAttention(x, causal) ->
    LayerNorm -> tied head (logits = x @ token_embedding^T, float32). The attention lets each
    position look back at every earlier GRU state instead of only the last one.

    Takes the `FIELDS` of `ModelConfig` (`sequence_length` is the training and evaluation window;
    the GRU itself has no length limit); token ids `(batch, length)` -> float32 logits.
    """

    def __init__(self, vocabulary_size, sequence_length, num_layers=1, num_heads=4, hidden_dim=128,
                 dropout=0.0, layer_norm_epsilon=1e-5, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        self.model_config = ModelConfig(
            vocabulary_size=vocabulary_size, sequence_length=sequence_length,
            num_layers=num_layers, num_heads=num_heads, hidden_dim=hidden_dim, dropout=dropout,
            layer_norm_epsilon=layer_norm_epsilon, initializer_range=initializer_range,
        )
        initializer = keras.initializers.RandomNormal(stddev=initializer_range)
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, embeddings_initializer=initializer,
            dtype=self.dtype_policy, name="token_embedding",
        )
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.recurrent_layers = [
            keras.layers.GRU(hidden_dim, return_sequences=True, dropout=dropout,
                             dtype=self.dtype_policy, name=f"gru_{index}")
            for index in range(num_layers)
        ]
        self.attention = keras.layers.MultiHeadAttention(
            num_heads, hidden_dim // num_heads, dropout=dropout, kernel_initializer=initializer,
            dtype=self.dtype_policy, name="attention",
        )
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )
        self.build((None, sequence_length))

    @classmethod
    def from_config_object(cls, config, **kwargs):
        """Builds from a `ModelConfig`'s `FIELDS`."""
        return cls(**{name: getattr(config, name) for name in FIELDS}, **kwargs)

    def build(self, input_shape):
        hidden_shape = tuple(input_shape) + (self.model_config.hidden_dim,)
        self.token_embedding.build(input_shape)
        for layer in self.recurrent_layers:
            layer.build(hidden_shape)
        self.attention.build(hidden_shape, hidden_shape)
        self.norm.build(hidden_shape)

    def call(self, token_ids, training=None):
        x = self.embedding_dropout(self.token_embedding(token_ids), training=training)
        for layer in self.recurrent_layers:
            x = layer(x, training=training)  # (batch, length, hidden)
        x = x + self.attention(x, x, use_causal_mask=True, training=training)
        x = ops.cast(self.norm(x), "float32")
        table = ops.cast(self.token_embedding.embeddings, "float32")
        return ops.matmul(x, ops.transpose(table))  # (batch, length, vocabulary)

    def get_config(self):
        return {**super().get_config(), **{name: getattr(self.model_config, name) for name in FIELDS}}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
