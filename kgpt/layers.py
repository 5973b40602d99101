"""The GPT building blocks as registered Keras 3 layers: embeddings, attention, MLP, decoder block.

Owns the one attention core (`attend`), the kinds of position embedding (a registry by name:
`POSITION_EMBEDDINGS`), and the key/value cache write (`update_cache`). Every layer is written
with `keras.ops`, takes explicit keyword arguments and round-trips through `get_config`.

A layer's cache is a `(key, value)` pair, each `(batch, num_heads, max_length, head_dim)`: the
layout the attention matmuls read, so a decode step never slices or restacks it. New positions
are written with a scatter (`update_cache`), never `ops.slice_update`: on the TensorFlow backend
that op becomes `XlaDynamicUpdateSlice`, which forces XLA compilation, and TensorFlow Serving runs
with XLA off.
"""

import difflib
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


def causal_mask(query_length, key_length, start_index=0):
    """Which keys each query may see: those at its own position or before.

    Args:
        query_length: number of queries; query `i` sits at absolute position `start_index + i`.
        key_length: number of keys; key `j` sits at absolute position `j`.
        start_index: scalar int (tensor or Python int), the position of the first query.

    Returns:
        A bool tensor `(query_length, key_length)`, True where query `i` may attend to key `j`.
    """
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(start_index, "int32")
    key_positions = ops.arange(key_length, dtype="int32")
    return key_positions[None, :] <= query_positions[:, None]


def attend(query, key, value, mask, dropout_layer=None, training=None):
    """The attention core: `softmax(mask(query @ key^T / sqrt(head_dim))) @ value`.

    The one place that scales, masks, normalizes (in float32, also under mixed precision) and
    drops attention probabilities. Keys and values may be longer than the queries (a cache).

    Args:
        query: `(batch, num_heads, length, head_dim)`.
        key, value: `(batch, num_heads, key_length, head_dim)`; the cache's layout, which the
            einsums read without transposing it.
        mask: bool `(length, key_length)` (see `causal_mask`); False positions get no weight.
            Every query must see at least one key.
        dropout_layer: a `keras.layers.Dropout` applied to the probabilities, or None.
        training: passed to `dropout_layer`.

    Returns:
        `(batch, num_heads, length, head_dim)` in the dtype of `value`.
    """
    # (batch, heads, length, key_length)
    scores = ops.cast(ops.einsum("bhld,bhsd->bhls", query, key), "float32")
    scores = ops.where(mask[None, None], scores / math.sqrt(query.shape[-1]), float("-inf"))
    weights = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
    if dropout_layer is not None:
        weights = dropout_layer(weights, training=training)
    return ops.einsum("bhls,bhsd->bhld", weights, value)


# Position-embedding kinds by name, as `ModelConfig.position_embedding` and GPT name them.
POSITION_EMBEDDINGS = {}


def register_position_embedding(name):
    """Class decorator that makes a layer available as position-embedding kind `name`.

    A kind is a registered Keras layer built as
    `cls(sequence_length=, hidden_dim=, embeddings_initializer=, dtype=, name=)`, called as
    `layer(token_embeddings, start_index=0)` on `(batch, length, hidden_dim)` token embeddings of
    positions `[start_index, start_index + length)` and returning them, same shape, with the
    positions added; its classmethod `parameter_count(sequence_length, hidden_dim)` gives its
    number of weights. Adding a kind is one such class in this module, registered by name; the
    model, configs and checkpoints need no change. (Kinds that act inside attention, such as
    rotary embeddings, would also need a hook in `attend`, which this contract does not have.)

    Args:
        name: the kind's name in configs and recipes.

    Returns:
        The decorator, which returns the class unchanged.

    Example:
        @register_position_embedding("sinusoidal")
        @keras.saving.register_keras_serializable(package="kgpt")
        class SinusoidalPositionEmbedding(keras.layers.Layer): ...
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
    """Returns the layer class of position-embedding kind `name`.

    Args:
        name: a key of `POSITION_EMBEDDINGS`, such as `"learned"`.

    Returns:
        The registered layer class.

    Raises:
        ValueError: unknown name, with the closest known one and the full list.
    """
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
    """Learned absolute positions (GPT-2's `wpe`): a trained `(sequence_length, hidden_dim)` table.

    Args:
        sequence_length: positions in the table, the longest context.
        hidden_dim: embedding width.
        embeddings_initializer: initializer of the table.

    Call args:
        inputs: token embeddings `(batch, length, hidden_dim)`.
        start_index: position of the first token (non-zero when decoding with a cache).

    Returns:
        `inputs` plus the table rows of positions `[start_index, start_index + length)`.
    """

    def __init__(
        self, sequence_length, hidden_dim, embeddings_initializer="glorot_uniform", **kwargs
    ):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.embeddings_initializer = _initializer(embeddings_initializer)
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
        self.built = True

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
            "embeddings_initializer": _serialize(self.embeddings_initializer),
        }


@keras.saving.register_keras_serializable(package="kgpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a position embedding of a registered kind.

    Args:
        vocabulary_size: number of token ids.
        sequence_length: maximum number of positions.
        hidden_dim: embedding width.
        embeddings_initializer: initializer of the tables (GPT-2: normal, stddev 0.02).
        position_embedding: name of the position-embedding kind (see
            `register_position_embedding`); `"learned"` is GPT-2's table.

    Call args:
        token_ids: int tensor `(batch, length)`.
        start_index: position of the first token (non-zero when decoding with a cache).

    The token table is exposed as `token_embedding.embeddings` so that the model can tie its output
    head to it; the position layer is `position_embedding` (the name in weight paths).
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
        self.embeddings_initializer = _initializer(embeddings_initializer)
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
        self.built = True

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
            "embeddings_initializer": _serialize(self.embeddings_initializer),
            "position_embedding": self.position_embedding_kind,
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

    Three paths, one core: without probability dropout the full pass runs Keras' fused
    `ops.dot_product_attention`; with it, and against a cache, `attend` computes the same.
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

    def _project(self, inputs, heads_first):
        """Query, key and value of `inputs` `(batch, length, hidden)`, in one of two layouts.

        `heads_first`: each `(batch, heads, length, head_dim)`, the cache's and `attend`'s
        layout; otherwise each `(batch, length, heads, head_dim)`, that of the fused op.
        """
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
        if not (training and self.dropout):
            # Keras' fused attention (it has no probability dropout).
            query, key, value = self._project(inputs, heads_first=False)
            attended = ops.dot_product_attention(query, key, value, is_causal=True)
            return self._merge(attended, heads_first=False)
        query, key, value = self._project(inputs, heads_first=True)
        length = ops.shape(inputs)[1]
        attended = attend(
            query, key, value, causal_mask(length, length), self.probability_dropout, training
        )
        return self._merge(attended, heads_first=True)

    def call_with_cache(self, inputs, cache, start_index):
        """Attends from new tokens over the cache (see the class docstring).

        Args:
            inputs: `(batch, length, hidden)`, the tokens at positions
                `[start_index, start_index + length)`.
            cache: `(key, value)`, each `(batch, num_heads, max_length, head_dim)`.
            start_index: scalar int, where the new keys and values are written.

        Returns:
            `(outputs, (key, value))`: outputs `(batch, length, hidden)` and the updated cache.
        """
        query, key, value = self._project(inputs, heads_first=True)
        key_cache = update_cache(cache[0], key, start_index)
        value_cache = update_cache(cache[1], value, start_index)
        mask = causal_mask(ops.shape(inputs)[1], ops.shape(key_cache)[2], start_index)
        attended = attend(query, key_cache, value_cache, mask)
        return self._merge(attended, heads_first=True), (key_cache, value_cache)

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

    Call args:
        inputs: `(batch, length, hidden)`.
        cache: None for a full causal pass; or this block's `(key, value)` cache, each
            `(batch, num_heads, max_length, head_dim)`, holding positions `< start_index`.
        start_index: scalar int, the position of the first of `inputs` (with a cache).
        training: applies dropout (full pass only; decoding never trains).

    Returns:
        `outputs` `(batch, length, hidden)`; with a cache, `(outputs, cache)` with the keys and
        values of `inputs` written at `start_index`.

    Example:
        outputs = block(hidden)
        outputs, cache = block(hidden, cache=cache, start_index=index)
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
