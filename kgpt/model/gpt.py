"""The GPT model: embeddings -> decoder blocks -> final LayerNorm -> tied output head.

`GPT`, a registered `keras.Model` whose config is the `ModelConfig` fields, with the cached
decoding entry points `initial_cache` and `call_with_cache`; `build_model`, `count_parameters`.
"""

import math

import keras
from keras import ops

from kgpt.config import ModelConfig
from kgpt.model.layers import DecoderBlock, TokenAndPositionEmbedding, get_position_embedding


@keras.saving.register_keras_serializable(package="kgpt")
class GPT(keras.Model):
    """A GPT-2 style decoder-only language model: token ids `(batch, length)` -> float32 logits.

    Takes the fields of `ModelConfig`, validated the same way; `length <= sequence_length`.

    Example:
        model = GPT.from_config_object(ModelConfig(vocabulary_size=32, sequence_length=8))
        logits = model(np.zeros((2, 8), "int32"))
    """

    def __init__(
        self,
        vocabulary_size,
        sequence_length,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=None,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        normalize_first=True,
        use_bias=True,
        initializer_range=0.02,
        position_embedding="learned",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model_config = config = ModelConfig(
            vocabulary_size=vocabulary_size,
            sequence_length=sequence_length,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            dropout=dropout,
            layer_norm_epsilon=layer_norm_epsilon,
            normalize_first=normalize_first,
            use_bias=use_bias,
            initializer_range=initializer_range,
            position_embedding=position_embedding,
        )
        initializer = keras.initializers.RandomNormal(stddev=config.initializer_range)
        output_initializer = keras.initializers.RandomNormal(
            stddev=config.initializer_range / math.sqrt(2 * config.num_layers)
        )
        self.embeddings = TokenAndPositionEmbedding(
            config.vocabulary_size,
            config.sequence_length,
            config.hidden_dim,
            embeddings_initializer=initializer,
            position_embedding=config.position_embedding,
            dtype=self.dtype_policy,
            name="embeddings",
        )
        self.embeddings_dropout = keras.layers.Dropout(
            config.dropout, dtype=self.dtype_policy, name="embeddings_dropout"
        )
        # A position kind may act inside attention instead of adding a table (ALiBi).
        position_bias = getattr(get_position_embedding(config.position_embedding), "attention_bias", None)
        self.blocks = [
            DecoderBlock(
                config.num_heads,
                config.intermediate_dim,
                dropout=config.dropout,
                layer_norm_epsilon=config.layer_norm_epsilon,
                normalize_first=config.normalize_first,
                position_bias=position_bias,
                use_bias=config.use_bias,
                kernel_initializer=initializer,
                output_kernel_initializer=output_initializer,
                dtype=self.dtype_policy,
                name=f"block_{index}",
            )
            for index in range(config.num_layers)
        ]
        # Post-LayerNorm blocks already end in a LayerNorm; GPT-2's pre-LN stack needs a final one.
        self.final_norm = None
        if config.normalize_first:
            self.final_norm = keras.layers.LayerNormalization(
                epsilon=config.layer_norm_epsilon, dtype=self.dtype_policy, name="final_norm"
            )
        self.build((None, config.sequence_length))

    @classmethod
    def from_config_object(cls, config, **kwargs):
        """Builds a model from a `ModelConfig` (the one place a config dataclass is unpacked)."""
        return cls(**config.to_dict(), **kwargs)

    def build(self, input_shape):
        self.embeddings.build(input_shape)
        hidden_shape = tuple(input_shape) + (self.model_config.hidden_dim,)
        for block in self.blocks:
            block.build(hidden_shape)
        if self.final_norm is not None:
            self.final_norm.build(hidden_shape)

    @property
    def token_embeddings(self):
        """The `(vocabulary_size, hidden_dim)` token table, shared with the output head."""
        return self.embeddings.token_embedding.embeddings

    def _head(self, hidden):
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        # Tied head: logits = hidden @ token_embeddings^T, computed in float32.
        hidden = ops.cast(hidden, "float32")
        table = ops.cast(self.token_embeddings, "float32")
        return ops.matmul(hidden, ops.transpose(table))

    def call(self, token_ids, training=None):
        x = self.embeddings_dropout(self.embeddings(token_ids), training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return self._head(x)

    def initial_cache(self, batch_size, max_length=None):
        """An all-zero cache of `max_length` positions (default: `sequence_length`), a nest of tensors.

        One `(key, value)` pair per layer, each `(batch, num_heads, max_length, head_dim)`.
        """
        config = self.model_config
        max_length = config.sequence_length if max_length is None else max_length
        shape = (batch_size, config.num_heads, max_length, config.head_dim)
        return tuple(
            (ops.zeros(shape, dtype=self.compute_dtype), ops.zeros(shape, dtype=self.compute_dtype))
            for _ in range(config.num_layers)
        )

    def call_with_cache(self, token_ids, cache, start_index):
        """The decoding step: new `token_ids` at positions from `start_index` on, against `cache`.

        `cache` comes from `initial_cache` or a previous call and holds positions `< start_index`;
        `start_index + length` must not exceed its length. Returns `(logits, cache)`: the logits of
        a full pass over the same prefix, and the cache with these tokens added.
        """
        x = self.embeddings(token_ids, start_index=start_index)
        updated = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, cache=layer_cache, start_index=start_index)
            updated.append(layer_cache)
        return self._head(x), tuple(updated)

    def get_config(self):
        return {**super().get_config(), **self.model_config.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_model(config, **kwargs):
    """Returns a built `GPT` for a `ModelConfig` (or a dict of its fields)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return GPT.from_config_object(config, **kwargs)


def count_parameters(config):
    """Closed-form parameter count of `GPT` for a `ModelConfig` (tied head counted once).

    Per block: two LayerNorms (`4h`), fused QKV (`3h^2 + 3h`), output (`h^2 + h`), MLP (`2hi + i + h`),
    biases only when `use_bias`; plus the token table, the position kind's `parameter_count` and,
    for pre-LayerNorm models, the final LayerNorm.
    """
    h, i = config.hidden_dim, config.intermediate_dim
    bias = 1 if config.use_bias else 0
    block = 4 * h + (3 * h * h + bias * 3 * h) + (h * h + bias * h) + (2 * h * i + bias * (i + h))
    positions = get_position_embedding(config.position_embedding).parameter_count(config.sequence_length, h)
    total = config.vocabulary_size * h + positions + config.num_layers * block
    if config.normalize_first:
        total += 2 * h
    return total
