"""The GPT building blocks as registered Keras 3 layers: embeddings, causal attention, MLP, block.

Every layer is written with `keras.ops`, takes explicit keyword arguments and round-trips through
`get_config`. Attention layers have two entry points: `call` for a full causal pass (training,
scoring) and `call_with_cache` for incremental decoding against a fixed-size key/value cache.

A layer's cache is a `(key, value)` pair, each `(batch, num_heads, max_length, head_dim)`: the
layout the attention matmuls read, so a decode step never slices or restacks it. New positions
are written with a scatter (`update_cache`), never `ops.slice_update`: on the TensorFlow backend
that op becomes `XlaDynamicUpdateSlice`, which forces XLA compilation, and TensorFlow Serving runs
with XLA off.
"""

import math

import keras
from keras import ops


def _initializer(value):
    return keras.initializers.get(value)


def _serialize(initializer):
    return keras.initializers.serialize(initializer)


def update_cache(cache, update, start_index):
    """Writes `update` into `cache` along axis 2 at `start_index`, without `slice_update`.

    Args:
        cache: `(batch, num_heads, max_length, head_dim)` tensor.
        update: `(batch, num_heads, update_length, head_dim)` tensor, `update_length <= max_length`.
        start_index: scalar int tensor; positions `[start_index, start_index + update_length)`
            are replaced, all others kept.

    Returns:
        A tensor shaped like `cache`. The write is a scatter of the new rows (TensorFlow's
        `TensorScatterUpdate`): a standard kernel that runs without XLA, as TensorFlow Serving
        runs graphs, where `slice_update` would lower to the XLA-only `XlaDynamicUpdateSlice`;
        inside an XLA-compiled decode loop it updates the cache in place instead of rewriting
        it whole, as a masked select would.
    """
    update = ops.cast(update, cache.dtype)
    shape = ops.shape(update)
    batch, heads, positions = ops.meshgrid(
        ops.arange(shape[0], dtype="int32"),
        ops.arange(shape[1], dtype="int32"),
        ops.arange(shape[2], dtype="int32") + ops.cast(start_index, "int32"),
        indexing="ij",
    )
    # (batch, heads, update_length, 3): the cache row each `head_dim` vector of `update` lands in.
    indices = ops.stack([batch, heads, positions], axis=-1)
    return ops.scatter_update(cache, indices, update)


@keras.saving.register_keras_serializable(package="kgpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Sum of a token embedding and a learned absolute position embedding.

    Args:
        vocabulary_size: number of token ids.
        sequence_length: maximum number of positions.
        hidden_dim: embedding width.
        embeddings_initializer: initializer of both tables (GPT-2: normal, stddev 0.02).

    Call args:
        token_ids: int tensor `(batch, length)`.
        start_index: position of the first token (non-zero when decoding with a cache).

    The token table is exposed as `token_embedding.embeddings` so that the model can tie its output
    head to it.
    """

    def __init__(
        self,
        vocabulary_size,
        sequence_length,
        hidden_dim,
        embeddings_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.embeddings_initializer = _initializer(embeddings_initializer)
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size,
            hidden_dim,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        self.position_embedding = keras.layers.Embedding(
            sequence_length,
            hidden_dim,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy,
            name="position_embedding",
        )

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        self.position_embedding.build(input_shape)
        self.built = True

    def call(self, token_ids, start_index=0):
        length = ops.shape(token_ids)[1]
        positions = ops.arange(length, dtype="int32") + ops.cast(start_index, "int32")
        # (batch, length, hidden) + (1, length, hidden)
        return self.token_embedding(token_ids) + self.position_embedding(positions)[None]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.hidden_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "sequence_length": self.sequence_length,
            "hidden_dim": self.hidden_dim,
            "embeddings_initializer": _serialize(self.embeddings_initializer),
        }


@keras.saving.register_keras_serializable(package="kgpt")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention with one fused query/key/value projection.

    Args:
        num_heads: attention heads; must divide the input width.
        dropout: dropout rate on the attention probabilities in training (GPT-2's
            `attn_pdrop`); the block applies its own dropout to this layer's output.
        use_bias: biases in the two projections.
        kernel_initializer: initializer of the fused QKV kernel.
        output_kernel_initializer: initializer of the output projection (GPT-2 scales it down by
            `sqrt(2 * num_layers)` because it writes into the residual stream).

    Call args:
        inputs: `(batch, length, hidden)`.
        training: applies the probability dropout.

    `call_with_cache(inputs, cache, start_index)` takes `cache` as a `(key, value)` pair, each
    `(batch, num_heads, max_length, head_dim)`, writes the new keys and values at `start_index`,
    attends over positions `<= start_index + i` and returns `(outputs, (key, value))`.
    """

    def __init__(
        self,
        num_heads,
        dropout=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = _initializer(kernel_initializer)
        self.output_kernel_initializer = _initializer(output_kernel_initializer)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                f"Input width {hidden_dim} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides hidden_dim."
            )
        self.hidden_dim = hidden_dim
        self.head_dim = hidden_dim // self.num_heads
        self.qkv_dense = keras.layers.Dense(
            3 * hidden_dim,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="qkv",
        )
        self.qkv_dense.build(input_shape)
        self.output_dense = keras.layers.Dense(
            hidden_dim,
            use_bias=self.use_bias,
            kernel_initializer=self.output_kernel_initializer,
            dtype=self.dtype_policy,
            name="output",
        )
        self.output_dense.build(tuple(input_shape[:-1]) + (hidden_dim,))
        self.probability_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def _project(self, inputs):
        batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        qkv = self.qkv_dense(inputs)
        # (batch, length, 3, heads, head_dim)
        qkv = ops.reshape(qkv, (batch, length, 3, self.num_heads, self.head_dim))
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _merge(self, attended):
        batch, length = ops.shape(attended)[0], ops.shape(attended)[1]
        # (batch, length, heads, head_dim) -> (batch, length, hidden)
        return self.output_dense(ops.reshape(attended, (batch, length, self.hidden_dim)))

    def call(self, inputs, training=None):
        query, key, value = self._project(inputs)
        if not (training and self.dropout):
            return self._merge(ops.dot_product_attention(query, key, value, is_causal=True))
        # Written out, to drop attention probabilities (Keras' fused attention has no dropout).
        length = ops.shape(inputs)[1]
        positions = ops.arange(length, dtype="int32")
        visible = positions[None, :] <= positions[:, None]  # (length, length), causal
        scores = ops.cast(ops.einsum("blhd,bshd->bhls", query, key), "float32")
        scores = ops.where(visible[None, None], scores / math.sqrt(self.head_dim), float("-inf"))
        weights = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
        weights = self.probability_dropout(weights, training=training)
        return self._merge(ops.einsum("bhls,bshd->blhd", weights, value))

    def call_with_cache(self, inputs, cache, start_index):
        key_cache, value_cache = cache
        batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        qkv = ops.reshape(self.qkv_dense(inputs), (batch, length, 3, self.num_heads, self.head_dim))
        # (3, batch, heads, length, head_dim): the cache's layout, so only the new tokens move.
        query, key, value = ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), num=3, axis=0)
        key_cache = update_cache(key_cache, key, start_index)
        value_cache = update_cache(value_cache, value, start_index)
        # Query i (absolute position start_index + i) sees cache positions <= its own.
        query_positions = ops.arange(length, dtype="int32") + ops.cast(start_index, "int32")
        key_positions = ops.arange(ops.shape(key_cache)[2], dtype="int32")
        visible = key_positions[None, :] <= query_positions[:, None]  # (length, max_length)
        # (batch, heads, length, max_length); softmax in float32 under mixed precision.
        scores = ops.cast(ops.einsum("bhld,bhsd->bhls", query, key_cache), "float32")
        scores = ops.where(visible[None, None], scores / math.sqrt(self.head_dim), float("-inf"))
        weights = ops.cast(ops.softmax(scores, axis=-1), value_cache.dtype)
        attended = ops.einsum("bhls,bhsd->bhld", weights, value_cache)
        # (batch, heads, length, head_dim) -> (batch, length, heads, head_dim)
        attended = ops.transpose(attended, (0, 2, 1, 3))
        return self._merge(attended), (key_cache, value_cache)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "kernel_initializer": _serialize(self.kernel_initializer),
            "output_kernel_initializer": _serialize(self.output_kernel_initializer),
        }


@keras.saving.register_keras_serializable(package="kgpt")
class FeedForward(keras.layers.Layer):
    """Position-wise MLP: Dense -> GELU (tanh approximation, as GPT-2) -> Dense -> Dropout.

    Args:
        intermediate_dim: width of the hidden layer.
        dropout: dropout rate on the output.
        use_bias: biases in both Dense layers.
        kernel_initializer: initializer of the first kernel.
        output_kernel_initializer: initializer of the second (residual) kernel.
    """

    def __init__(
        self,
        intermediate_dim,
        dropout=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = _initializer(kernel_initializer)
        self.output_kernel_initializer = _initializer(output_kernel_initializer)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.intermediate_dense = keras.layers.Dense(
            self.intermediate_dim,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="intermediate",
        )
        self.intermediate_dense.build(input_shape)
        self.output_dense = keras.layers.Dense(
            hidden_dim,
            use_bias=self.use_bias,
            kernel_initializer=self.output_kernel_initializer,
            dtype=self.dtype_policy,
            name="output",
        )
        self.output_dense.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def call(self, inputs, training=None):
        hidden = ops.gelu(self.intermediate_dense(inputs), approximate=True)
        return self.dropout_layer(self.output_dense(hidden), training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "kernel_initializer": _serialize(self.kernel_initializer),
            "output_kernel_initializer": _serialize(self.output_kernel_initializer),
        }


@keras.saving.register_keras_serializable(package="kgpt")
class DecoderBlock(keras.layers.Layer):
    """Transformer decoder block: causal self-attention and a feed-forward layer, each residual.

    Args:
        num_heads: attention heads; must divide the input width.
        intermediate_dim: width of the feed-forward layer.
        dropout: dropout rate on the attention probabilities and output (the feed-forward applies
            its own), as GPT-2 uses one rate for all three.
        layer_norm_epsilon: epsilon of both LayerNormalizations.
        normalize_first: True for GPT-2's pre-LayerNorm block
            (`x + attn(ln(x))`, `x + mlp(ln(x))`); False for the original post-LayerNorm block
            (`ln(x + attn(x))`, `ln(x + mlp(x))`).
        use_bias: biases in the projections.
        kernel_initializer: initializer of the input-side kernels.
        output_kernel_initializer: initializer of the two residual output kernels.
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        normalize_first=True,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.normalize_first = normalize_first
        self.use_bias = use_bias
        self.kernel_initializer = _initializer(kernel_initializer)
        self.output_kernel_initializer = _initializer(output_kernel_initializer)

    def build(self, input_shape):
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.attention_norm.build(input_shape)
        self.attention = CausalSelfAttention(
            self.num_heads,
            dropout=self.dropout,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.output_kernel_initializer,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.attention.build(input_shape)
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.feed_forward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="feed_forward_norm"
        )
        self.feed_forward_norm.build(input_shape)
        self.feed_forward = FeedForward(
            self.intermediate_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.output_kernel_initializer,
            dtype=self.dtype_policy,
            name="feed_forward",
        )
        self.feed_forward.build(input_shape)
        self.built = True

    def _residual(self, inputs, branch, norm):
        if self.normalize_first:
            return inputs + branch(norm(inputs))
        return norm(inputs + branch(inputs))

    def call(self, inputs, training=None):
        def attend(x):
            return self.attention_dropout(self.attention(x, training=training), training=training)

        x = self._residual(inputs, attend, self.attention_norm)
        feed = lambda x: self.feed_forward(x, training=training)  # noqa: E731
        return self._residual(x, feed, self.feed_forward_norm)

    def call_with_cache(self, inputs, cache, start_index):
        """Runs the block on new tokens against `cache` (see `CausalSelfAttention`).

        Returns:
            `(outputs, cache)` with the keys and values of `inputs` written at `start_index`.
        """
        new_cache = []

        def attend(x):
            outputs, updated = self.attention.call_with_cache(x, cache, start_index)
            new_cache.append(updated)
            return outputs

        x = self._residual(inputs, attend, self.attention_norm)
        x = self._residual(x, self.feed_forward, self.feed_forward_norm)
        return x, new_cache[0]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "dropout": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "normalize_first": self.normalize_first,
            "use_bias": self.use_bias,
            "kernel_initializer": _serialize(self.kernel_initializer),
            "output_kernel_initializer": _serialize(self.output_kernel_initializer),
        }
