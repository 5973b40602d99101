"""The GPT building blocks as registered Keras 3 layers: embeddings, attention, MLP, decoder block.

Owns the one attention core (`attend`), the position-embedding kinds by name
(`POSITION_EMBEDDINGS`) and the key/value cache write (`update_cache`); the README's "Cached
decoding" gives the cache layout and why it is written with a scatter.
"""

import difflib
import math

import keras
from keras import ops


def update_cache(cache, update, start_index):
    """Writes `update` into `cache` `(batch, num_heads, max_length, head_dim)` from `start_index` on.

    A scatter (`TensorScatterUpdate`): it runs without XLA, as TensorFlow Serving does, where
    `slice_update` lowers to the XLA-only `XlaDynamicUpdateSlice`; under XLA it writes in place.
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


def causal_mask(query_length, key_length, start_index=0):
    """Bool `(query_length, key_length)`: True where query `i` (at `start_index + i`) may see key `j`."""
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(start_index, "int32")
    key_positions = ops.arange(key_length, dtype="int32")
    return key_positions[None, :] <= query_positions[:, None]


def alibi_slopes(num_heads):
    """ALiBi's per-head slopes (Press et al., 2021): the geometric sequence `2^(-8 i / n)`,
    `i = 1..n`, for `n` a power of two; otherwise that of the power below, then every other
    slope of the power above."""
    def powers(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    below = 2 ** int(math.floor(math.log2(num_heads)))
    return (powers(below) + powers(2 * below)[0::2])[:num_heads]


def alibi_bias(slopes, query_length, key_length, start_index=0):
    """Float32 `(heads, query_length, key_length)`: `-slope * (i - j)` for query `i` (at
    `start_index + i`) and key `j`, the linear penalty on distance ALiBi adds to the scores."""
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(start_index, "int32")
    key_positions = ops.arange(key_length, dtype="int32")
    distance = ops.cast(query_positions[:, None] - key_positions[None, :], "float32")
    return -ops.convert_to_tensor(slopes, "float32")[:, None, None] * distance[None]


def attend(query, key, value, mask, dropout_layer=None, training=None, bias=None):
    """The attention core: `softmax(mask(query @ key^T / sqrt(head_dim) + bias)) @ value`.

    The one place that scales, masks, normalizes (in float32, also under mixed precision) and
    drops attention probabilities. Returns `query`'s shape in `value`'s dtype.

    Args:
        query: `(batch, num_heads, length, head_dim)`.
        key, value: `(batch, num_heads, key_length, head_dim)`; a cache may be longer than `query`.
        mask: bool `(length, key_length)` (see `causal_mask`); every query must see a key.
        dropout_layer: a `keras.layers.Dropout` applied to the probabilities, or None.
        bias: float32 `(num_heads, length, key_length)` added to the scaled scores, or None.
    """
    # (batch, heads, length, key_length)
    scores = ops.cast(ops.einsum("bhld,bhsd->bhls", query, key), "float32") / math.sqrt(query.shape[-1])
    if bias is not None:
        scores = scores + bias[None]
    scores = ops.where(mask[None, None], scores, float("-inf"))
    weights = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
    if dropout_layer is not None:
        weights = dropout_layer(weights, training=training)
    return ops.einsum("bhls,bhsd->bhld", weights, value)


# Position-embedding kinds by name, as `ModelConfig.position_embedding` and GPT name them.
POSITION_EMBEDDINGS = {}


def register_position_embedding(name):
    """Class decorator that registers a layer as position-embedding kind `name`.

    A kind is a registered Keras layer built with `sequence_length`, `hidden_dim`,
    `embeddings_initializer`, `dtype` and `name`; `layer(token_embeddings, start_index=0)` adds
    the positions `[start_index, start_index + length)`; its classmethod
    `parameter_count(sequence_length, hidden_dim)` counts its weights. A kind that acts inside
    attention instead names its bias in an `attention_bias` class attribute (see `"alibi"`); a
    kind without one adds its positions only.
    """

    def register(cls):
        if name in POSITION_EMBEDDINGS:
            raise ValueError(
                f"Position-embedding kind {name!r} is already registered (by "
                f"{POSITION_EMBEDDINGS[name].__name__}); choose another name."
            )
        POSITION_EMBEDDINGS[name] = cls
        return cls

    return register


def get_position_embedding(name):
    """The layer class of position-embedding kind `name`; a ValueError names the closest kind."""
    if name not in POSITION_EMBEDDINGS:
        known = sorted(POSITION_EMBEDDINGS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown position_embedding={name!r}.{hint} Known kinds: {', '.join(known)}; "
            "set model.position_embedding to one of them."
        )
    return POSITION_EMBEDDINGS[name]


@register_position_embedding("learned")
@keras.saving.register_keras_serializable(package="kgpt")
class LearnedPositionEmbedding(keras.layers.Layer):
    """Learned absolute positions (GPT-2's `wpe`): a trained `(sequence_length, hidden_dim)` table."""

    def __init__(
        self, sequence_length, hidden_dim, embeddings_initializer="glorot_uniform", **kwargs
    ):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        # As keras.layers.Embedding: the table is read in its own dtype, the rows cast after.
        self.autocast = False

    @classmethod
    def parameter_count(cls, sequence_length, hidden_dim):
        return sequence_length * hidden_dim

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=(self.sequence_length, self.hidden_dim),
            initializer=self.embeddings_initializer,
            name="embeddings",
        )

    def call(self, inputs, start_index=0):
        length = ops.shape(inputs)[1]
        positions = ops.arange(length, dtype="int32") + ops.cast(start_index, "int32")
        rows = ops.cast(ops.take(self.embeddings, positions, axis=0), inputs.dtype)
        # (batch, length, hidden) + (1, length, hidden)
        return inputs + rows[None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            "hidden_dim": self.hidden_dim,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        }


@register_position_embedding("alibi")
@keras.saving.register_keras_serializable(package="kgpt")
class AlibiPositions(keras.layers.Layer):
    """ALiBi (Press et al., 2021): no position table; each head's attention scores fall linearly
    with the distance to the key (`alibi_bias`), a recency prior that needs no training."""

    attention_bias = "alibi"

    def __init__(self, sequence_length, hidden_dim, embeddings_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim

    @classmethod
    def parameter_count(cls, sequence_length, hidden_dim):
        return 0

    def call(self, inputs, start_index=0):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length,
                "hidden_dim": self.hidden_dim}


@keras.saving.register_keras_serializable(package="kgpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a position embedding of a registered kind (`"learned"`: GPT-2's).

    Called as `layer(token_ids, start_index=0)`. The token table is `token_embedding.embeddings`
    (the model ties its output head to it); the position layer is `position_embedding`.
    """

    def __init__(
        self,
        vocabulary_size,
        sequence_length,
        hidden_dim,
        embeddings_initializer="glorot_uniform",
        position_embedding="learned",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        # The kind's name; `position_embedding` holds its layer (weight paths name that attribute).
        self.position_embedding_kind = position_embedding
        kind = get_position_embedding(position_embedding)
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size,
            hidden_dim,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        self.position_embedding = kind(
            sequence_length=sequence_length,
            hidden_dim=hidden_dim,
            embeddings_initializer=self.embeddings_initializer,
            dtype=self.dtype_policy,
            name="position_embedding",
        )

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        self.position_embedding.build(tuple(input_shape) + (self.hidden_dim,))

    def call(self, token_ids, start_index=0):
        # (batch, length) -> (batch, length, hidden)
        return self.position_embedding(self.token_embedding(token_ids), start_index=start_index)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.hidden_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "sequence_length": self.sequence_length,
            "hidden_dim": self.hidden_dim,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "position_embedding": self.position_embedding_kind,
        }


class _ResidualLayer(keras.layers.Layer):
    """The arguments, config and shape shared by the layers that write into the residual stream.

    Args:
        dropout: dropout rate (GPT-2 uses one rate for attention probabilities and outputs).
        use_bias: biases in the projections.
        kernel_initializer: initializer of the input-side kernels.
        output_kernel_initializer: initializer of the residual output kernels (GPT-2 scales it
            down by `sqrt(2 * num_layers)` so the residual stream does not grow with depth).
    """

    def __init__(
        self,
        dropout=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_kernel_initializer = keras.initializers.get(output_kernel_initializer)

    def _dense(self, units, kernel_initializer, name, input_shape):
        """A Dense sublayer with this layer's `use_bias` and dtype policy, built on `input_shape`."""
        dense = keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=kernel_initializer,
            dtype=self.dtype_policy,
            name=name,
        )
        dense.build(input_shape)
        return dense

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "output_kernel_initializer": keras.initializers.serialize(self.output_kernel_initializer),
        }


@keras.saving.register_keras_serializable(package="kgpt")
class CausalSelfAttention(_ResidualLayer):
    """Multi-head causal self-attention with one fused query/key/value projection.

    `num_heads` must divide the input width; `dropout` applies to the attention probabilities in
    training (GPT-2's `attn_pdrop`); `position_bias="alibi"` adds ALiBi's distance penalty
    (`alibi_bias`) to the scores; the other arguments are `_ResidualLayer`'s. Three paths, one
    core: without probability dropout the full pass runs Keras' fused `ops.dot_product_attention`;
    with it, and against a cache (`call_with_cache`), `attend` computes the same.
    """

    def __init__(self, num_heads, position_bias=None, **kwargs):
        super().__init__(**kwargs)
        if position_bias not in (None, "alibi"):
            raise ValueError(f"Unknown position_bias={position_bias!r}; use None or 'alibi'.")
        self.num_heads = num_heads
        self.position_bias = position_bias
        self.slopes = alibi_slopes(num_heads) if position_bias == "alibi" else None

    def _bias(self, query_length, key_length, start_index=0):
        if self.slopes is None:
            return None
        return alibi_bias(self.slopes, query_length, key_length, start_index)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                f"Input width {hidden_dim} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides hidden_dim."
            )
        self.hidden_dim = hidden_dim
        self.head_dim = hidden_dim // self.num_heads
        self.qkv_dense = self._dense(3 * hidden_dim, self.kernel_initializer, "qkv", input_shape)
        self.output_dense = self._dense(hidden_dim, self.output_kernel_initializer, "output", input_shape)
        self.probability_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def _project(self, inputs, heads_first):
        """Query, key and value of `inputs` `(batch, length, hidden)`: with `heads_first`, each
        `(batch, heads, length, head_dim)` (the cache's layout), else `(batch, length, heads, head_dim)`."""
        batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        # (batch, length, 3, heads, head_dim)
        qkv = ops.reshape(self.qkv_dense(inputs), (batch, length, 3, self.num_heads, self.head_dim))
        if heads_first:
            # (3, batch, heads, length, head_dim): one transpose, of the new tokens only.
            return ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), num=3, axis=0)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _merge(self, attended, heads_first):
        """The output projection of attended values laid out as `_project` gave them."""
        if heads_first:
            # (batch, heads, length, head_dim) -> (batch, length, heads, head_dim)
            attended = ops.transpose(attended, (0, 2, 1, 3))
        batch, length = ops.shape(attended)[0], ops.shape(attended)[1]
        # (batch, length, heads, head_dim) -> (batch, length, hidden)
        return self.output_dense(ops.reshape(attended, (batch, length, self.hidden_dim)))

    def call(self, inputs, training=None):
        length = ops.shape(inputs)[1]
        bias = self._bias(length, length)
        if not (training and self.dropout):
            # Keras' fused attention (it has no probability dropout).
            query, key, value = self._project(inputs, heads_first=False)
            attended = ops.dot_product_attention(
                query, key, value, bias=None if bias is None else bias[None], is_causal=True
            )
            return self._merge(attended, heads_first=False)
        query, key, value = self._project(inputs, heads_first=True)
        attended = attend(
            query, key, value, causal_mask(length, length), self.probability_dropout, training,
            bias=bias,
        )
        return self._merge(attended, heads_first=True)

    def call_with_cache(self, inputs, cache, start_index):
        """Attends from `inputs` (at `start_index` on) over `cache`, a `(key, value)` pair.

        Returns `(outputs, (key, value))`, the cache with the new keys and values written.
        """
        query, key, value = self._project(inputs, heads_first=True)
        key_cache = update_cache(cache[0], key, start_index)
        value_cache = update_cache(cache[1], value, start_index)
        lengths = ops.shape(inputs)[1], ops.shape(key_cache)[2]
        mask = causal_mask(*lengths, start_index)
        attended = attend(query, key_cache, value_cache, mask, bias=self._bias(*lengths, start_index))
        return self._merge(attended, heads_first=True), (key_cache, value_cache)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "position_bias": self.position_bias}


@keras.saving.register_keras_serializable(package="kgpt")
class FeedForward(_ResidualLayer):
    """Position-wise MLP: Dense(intermediate_dim) -> GELU (tanh, as GPT-2) -> Dense -> Dropout."""

    def __init__(self, intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim

    def build(self, input_shape):
        self.intermediate_dense = self._dense(
            self.intermediate_dim, self.kernel_initializer, "intermediate", input_shape
        )
        intermediate_shape = tuple(input_shape[:-1]) + (self.intermediate_dim,)
        self.output_dense = self._dense(
            input_shape[-1], self.output_kernel_initializer, "output", intermediate_shape
        )
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def call(self, inputs, training=None):
        hidden = ops.gelu(self.intermediate_dense(inputs), approximate=True)
        return self.dropout_layer(self.output_dense(hidden), training=training)

    def get_config(self):
        return {**super().get_config(), "intermediate_dim": self.intermediate_dim}


@keras.saving.register_keras_serializable(package="kgpt")
class DecoderBlock(_ResidualLayer):
    """Transformer decoder block: causal self-attention and a feed-forward layer, each residual.

    Args:
        num_heads: attention heads; must divide the input width.
        intermediate_dim: width of the feed-forward layer.
        normalize_first: True for GPT-2's pre-LayerNorm block (`x + attn(ln(x))`); False for
            the original post-LayerNorm block (`ln(x + attn(x))`).
        position_bias: None, or `"alibi"` for ALiBi's distance penalty in the attention scores.
        dropout, use_bias, kernel_initializer, output_kernel_initializer: see `_ResidualLayer`.

    Call args:
        inputs: `(batch, length, hidden)`.
        cache: None for a full causal pass; or this block's `(key, value)` cache, each
            `(batch, num_heads, max_length, head_dim)`, holding positions `< start_index`.
        start_index: scalar int, the position of the first of `inputs` (with a cache).

    Returns:
        `outputs` `(batch, length, hidden)`; with a cache, `(outputs, cache)` with the keys and
        values of `inputs` written at `start_index`.
    """

    def __init__(
        self, num_heads, intermediate_dim, *, layer_norm_epsilon=1e-5, normalize_first=True,
        position_bias=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.position_bias = position_bias
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.normalize_first = normalize_first

    def build(self, input_shape):
        # What the block shares with its attention and feed-forward layers.
        shared = {
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
            "output_kernel_initializer": self.output_kernel_initializer,
            "dtype": self.dtype_policy,
        }
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.attention_norm.build(input_shape)
        self.attention = CausalSelfAttention(
            self.num_heads, position_bias=self.position_bias, name="attention", **shared
        )
        self.attention.build(input_shape)
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.feed_forward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="feed_forward_norm"
        )
        self.feed_forward_norm.build(input_shape)
        self.feed_forward = FeedForward(self.intermediate_dim, name="feed_forward", **shared)
        self.feed_forward.build(input_shape)

    def call(self, inputs, cache=None, start_index=0, training=None):
        # Attention branch; pre-LN normalizes its input, post-LN the residual sum.
        residual = inputs
        x = self.attention_norm(inputs) if self.normalize_first else inputs
        if cache is None:
            x = self.attention(x, training=training)
        else:
            x, cache = self.attention.call_with_cache(x, cache, start_index)
        x = residual + self.attention_dropout(x, training=training)
        if not self.normalize_first:
            x = self.attention_norm(x)
        # Feed-forward branch (it applies its own output dropout).
        residual = x
        x = self.feed_forward_norm(x) if self.normalize_first else x
        x = residual + self.feed_forward(x, training=training)
        if not self.normalize_first:
            x = self.feed_forward_norm(x)
        return x if cache is None else (x, cache)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "normalize_first": self.normalize_first,
            "position_bias": self.position_bias,
        }
