"""The GPT model: embeddings -> decoder blocks -> final LayerNorm -> tied output head.

`GPT` is a registered `keras.Model` whose constructor takes the `ModelConfig` fields, so
`get_config` and `.keras` files carry the whole architecture. Besides `call` (a full causal
pass, used by `fit`), it has the cached decoding entry points that generation and export use:
`initial_cache` and `call_with_cache`.
"""

import math

import keras
from keras import ops

from kgpt.config import ModelConfig
from kgpt.layers import DecoderBlock, TokenAndPositionEmbedding, get_position_embedding


@keras.saving.register_keras_serializable(package="kgpt")
class GPT(keras.Model):
    """A GPT-2 style decoder-only language model returning next-token logits.

    Args:
        vocabulary_size, sequence_length, num_layers, num_heads, hidden_dim, intermediate_dim,
        dropout, layer_norm_epsilon, normalize_first, use_bias, initializer_range,
            position_embedding: the fields of `ModelConfig`, validated the same way;
            `position_embedding` names a kind registered in `kgpt.layers`
            (`register_position_embedding`).

    Call args:
        token_ids: int tensor `(batch, length)`, `length <= sequence_length`.
        training: enables dropout.

    Returns:
        float32 logits `(batch, length, vocabulary_size)`.

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
        config = ModelConfig(
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
        self.model_config = config
        initializer = keras.initializers.RandomNormal(stddev=config.initializer_range)
        # GPT-2: residual projections are scaled down so the residual stream's variance does
        # not grow with depth.
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
        self.blocks = [
            DecoderBlock(
                config.num_heads,
                config.intermediate_dim,
                dropout=config.dropout,
                layer_norm_epsilon=config.layer_norm_epsilon,
                normalize_first=config.normalize_first,
                use_bias=config.use_bias,
                kernel_initializer=initializer,
                output_kernel_initializer=output_initializer,
                dtype=self.dtype_policy,
                name=f"block_{index}",
            )
            for index in range(config.num_layers)
        ]
        # Post-LayerNorm blocks already end in a LayerNorm; GPT-2's pre-LN stack needs a final one.
        self.final_norm = (
            keras.layers.LayerNormalization(
                epsilon=config.layer_norm_epsilon, dtype=self.dtype_policy, name="final_norm"
            )
            if config.normalize_first
            else None
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
        self.built = True

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
        """An all-zero key/value cache.

        Args:
            batch_size: rows in the batch (int or scalar tensor).
            max_length: positions the cache holds; defaults to `sequence_length`.

        Returns:
            A tuple with one `(key, value)` pair per layer, each tensor
            `(batch, num_heads, max_length, head_dim)` in the compute dtype. A nested structure
            of tensors: it can be `tf.while_loop` state, and `tf.nest.map_structure` applies a
            function (e.g. a reorder by beam) to every tensor of it.
        """
        config = self.model_config
        max_length = config.sequence_length if max_length is None else max_length
        shape = (batch_size, config.num_heads, max_length, config.head_dim)
        return tuple(
            (ops.zeros(shape, dtype=self.compute_dtype), ops.zeros(shape, dtype=self.compute_dtype))
            for _ in range(config.num_layers)
        )

    def call_with_cache(self, token_ids, cache, start_index):
        """Runs new tokens against the key/value cache; the decoding step of generation.

        Args:
            token_ids: int `(batch, length)`: the tokens at positions
                `[start_index, start_index + length)`.
            cache: from `initial_cache` or a previous call (one `(key, value)` pair per layer,
                each `(batch, num_heads, max_length, head_dim)`), holding positions
                `< start_index`.
            start_index: scalar int; `start_index + length` must not exceed the cache length.

        Returns:
            `(logits, cache)`: float32 logits `(batch, length, vocabulary_size)`, equal to
            those of a full pass over the same prefix, and the cache, same structure, with these
            tokens added.
        """
        x = self.embeddings(token_ids, start_index=start_index)
        updated = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, cache=layer_cache, start_index=start_index)
            updated.append(layer_cache)
        return self._head(x), tuple(updated)

    def get_config(self):
        # keras.Model's own config (name, trainable, dtype) plus the architecture.
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

    Per block: two LayerNorms (`4h`), fused QKV (`3h^2 + 3h`), output (`h^2 + h`), and the MLP
    (`2hi + i + h`); biases only when `use_bias`. Plus the token table, the position embedding's
    weights (its kind's `parameter_count`) and, for pre-LayerNorm models, the final LayerNorm.
    """
    h, i = config.hidden_dim, config.intermediate_dim
    bias = 1 if config.use_bias else 0
    block = 4 * h + (3 * h * h + bias * 3 * h) + (h * h + bias * h) + (2 * h * i + bias * (i + h))
    kind = get_position_embedding(config.position_embedding)
    positions = kind.parameter_count(config.sequence_length, h)
    total = config.vocabulary_size * h + positions + config.num_layers * block
    if config.normalize_first:
        total += 2 * h
    return total
