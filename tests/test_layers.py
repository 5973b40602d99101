import numpy as np
import pytest
from keras import ops

from kgpt.model.layers import (
    CausalSelfAttention,
    DecoderBlock,
    FeedForward,
    LearnedPositionEmbedding,
    TokenAndPositionEmbedding,
    alibi_bias,
    alibi_slopes,
    attend,
    causal_mask,
    update_cache,
)


def _randomize(layer, seed=0):
    """Replaces every weight (zero biases and unit gammas included) with random values."""
    rng = np.random.RandomState(seed)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, gamma, beta, epsilon=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta


def _attention_reference(x, qkv_kernel, qkv_bias, out_kernel, out_bias, num_heads, slopes=None):
    batch, length, hidden = x.shape
    head_dim = hidden // num_heads
    qkv = (x @ qkv_kernel + qkv_bias).reshape(batch, length, 3, num_heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (b, h, s, d)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    if slopes is not None:  # ALiBi: -slope * (i - j)
        distance = np.arange(length)[:, None] - np.arange(length)[None, :]
        scores = scores - np.asarray(slopes)[:, None, None] * distance
    future = np.triu(np.ones((length, length), bool), k=1)
    scores = np.where(future, -np.inf, scores)
    out = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
    return out @ out_kernel + out_bias


def test_attention_matches_numpy_reference():
    x = np.random.RandomState(1).normal(size=(2, 5, 8)).astype("float32")
    layer = CausalSelfAttention(num_heads=2)
    layer.build(x.shape)
    _randomize(layer)
    expected = _attention_reference(x, *layer.get_weights(), num_heads=2)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), expected, atol=1e-5)


def test_attention_probability_dropout_only_in_training():
    x = np.random.RandomState(3).normal(size=(2, 5, 8)).astype("float32")
    layer = CausalSelfAttention(num_heads=2, dropout=0.5)
    layer.build(x.shape)
    _randomize(layer)
    expected = _attention_reference(x, *layer.get_weights(), num_heads=2)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x, training=False)), expected, atol=1e-5)
    first, second = (ops.convert_to_numpy(layer(x, training=True)) for _ in range(2))
    assert not np.allclose(first, expected, atol=1e-3) and not np.allclose(first, second, atol=1e-3)
    # Inverted dropout keeps the expectation: the mean of many training passes nears inference.
    mean = np.mean([ops.convert_to_numpy(layer(x, training=True)) for _ in range(400)], axis=0)
    np.testing.assert_allclose(mean, expected, atol=0.15 * np.abs(expected).max())


def test_attention_training_path_is_causal_and_matches_the_reference():
    # A rate too small to drop anything: the written-out training path equals the fused one.
    x = np.random.RandomState(4).normal(size=(2, 6, 8)).astype("float32")
    layer = CausalSelfAttention(num_heads=2, dropout=1e-9)
    layer.build(x.shape)
    _randomize(layer)
    expected = _attention_reference(x, *layer.get_weights(), num_heads=2)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x, training=True)), expected, atol=1e-5)


def test_attention_cache_matches_full_pass():
    x = np.random.RandomState(2).normal(size=(2, 6, 8)).astype("float32")
    layer = CausalSelfAttention(num_heads=4)
    layer.build(x.shape)
    _randomize(layer)
    full = ops.convert_to_numpy(layer(x))
    # (batch, heads, max_length, head_dim), longer than the sequence.
    cache = (np.zeros((2, 4, 10, 2), "float32"), np.zeros((2, 4, 10, 2), "float32"))
    prefix, cache = layer.call_with_cache(x[:, :4], cache, 0)
    steps = [prefix]
    for t in (4, 5):
        out, cache = layer.call_with_cache(x[:, t : t + 1], cache, t)
        steps.append(out)
    np.testing.assert_allclose(ops.convert_to_numpy(ops.concatenate(steps, 1)), full, atol=1e-5)
    key, value = (ops.convert_to_numpy(c) for c in cache)
    # The keys written are the layer's keys, head-major; positions past them are untouched zeros.
    weights = layer.get_weights()
    qkv = (x @ weights[0] + weights[1]).reshape(2, 6, 3, 4, 2)
    np.testing.assert_allclose(key[:, :, :6], qkv[:, :, 1].transpose(0, 2, 1, 3), atol=1e-5)
    np.testing.assert_allclose(value[:, :, :6], qkv[:, :, 2].transpose(0, 2, 1, 3), atol=1e-5)
    assert not np.any(key[:, :, 6:]) and not np.any(value[:, :, 6:])


def test_alibi_slopes_are_the_papers_geometric_sequences():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    # Not a power of two: the 4-head slopes, then every other slope of 8 heads.
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    bias = ops.convert_to_numpy(alibi_bias([0.5, 0.25], 2, 5, start_index=3))
    # Queries at positions 3 and 4: the penalty grows with the distance back to each key.
    np.testing.assert_allclose(bias[0, 0], [-1.5, -1.0, -0.5, 0.0, 0.5])
    np.testing.assert_allclose(bias[1, 1], [-1.0, -0.75, -0.5, -0.25, 0.0])


@pytest.mark.parametrize("dropout", [0.0, 1e-9])  # the fused path, and the written-out one
def test_alibi_attention_matches_numpy_reference_and_its_cache(dropout):
    x = np.random.RandomState(5).normal(size=(2, 6, 8)).astype("float32")
    layer = CausalSelfAttention(num_heads=4, position_bias="alibi", dropout=dropout)
    layer.build(x.shape)
    _randomize(layer)
    expected = _attention_reference(x, *layer.get_weights(), num_heads=4, slopes=alibi_slopes(4))
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x, training=True)), expected, atol=1e-5)
    cache = (np.zeros((2, 4, 9, 2), "float32"), np.zeros((2, 4, 9, 2), "float32"))
    steps = []
    for start, end in ((0, 3), (3, 4), (4, 6)):
        out, cache = layer.call_with_cache(x[:, start:end], cache, start)
        steps.append(ops.convert_to_numpy(out))
    np.testing.assert_allclose(np.concatenate(steps, 1), expected, atol=1e-5)


def test_unknown_position_bias_is_refused():
    with pytest.raises(ValueError, match="position_bias='rope'"):
        CausalSelfAttention(num_heads=2, position_bias="rope")


def test_causal_mask_offsets_queries_by_start_index():
    expected = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)  # queries at 3 and 4
    np.testing.assert_array_equal(ops.convert_to_numpy(causal_mask(2, 6, start_index=3)), expected)
    np.testing.assert_array_equal(ops.convert_to_numpy(causal_mask(4, 4)), np.tril(np.ones((4, 4), bool)))


def test_attend_matches_numpy_reference_over_longer_keys():
    rng = np.random.RandomState(5)
    query = rng.normal(size=(2, 3, 2, 4)).astype("float32")  # (batch, heads, length, head_dim)
    key, value = (rng.normal(size=(2, 3, 7, 4)).astype("float32") for _ in range(2))
    mask = ops.convert_to_numpy(causal_mask(2, 7, start_index=4))
    scores = np.where(mask, query @ key.transpose(0, 1, 3, 2) / 2.0, -np.inf)
    expected = _softmax(scores) @ value
    np.testing.assert_allclose(ops.convert_to_numpy(attend(query, key, value, mask)), expected, atol=1e-5)


@pytest.mark.parametrize("start, length", [(3, 2), (0, 6), (5, 1), (0, 1)])
def test_update_cache_writes_only_the_target_positions(start, length):
    cache = np.arange(2 * 3 * 6 * 4, dtype="float32").reshape(2, 3, 6, 4)
    update = -np.random.RandomState(0).uniform(1, 2, (2, 3, length, 4)).astype("float32")
    result = ops.convert_to_numpy(update_cache(cache, update, start))
    expected = cache.copy()
    expected[:, :, start : start + length] = update
    np.testing.assert_array_equal(result, expected)


def test_feed_forward_matches_numpy_reference():
    x = np.random.RandomState(3).normal(size=(2, 3, 8)).astype("float32")
    layer = FeedForward(intermediate_dim=12)
    layer.build(x.shape)
    _randomize(layer)
    w1, b1, w2, b2 = layer.get_weights()
    expected = _gelu_tanh(x @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), expected, atol=1e-5)


@pytest.mark.parametrize("normalize_first", [True, False])
def test_decoder_block_matches_numpy_reference(normalize_first):
    x = np.random.RandomState(4).normal(size=(2, 5, 8)).astype("float32")
    block = DecoderBlock(num_heads=2, intermediate_dim=16, normalize_first=normalize_first)
    block.build(x.shape)
    _randomize(block)
    weights = {w.path.split("/", 1)[1]: w.numpy() for w in block.weights}

    def norm(name, h):
        return _layer_norm(h, weights[f"{name}/gamma"], weights[f"{name}/beta"])

    def attend(h):
        names = ("qkv/kernel", "qkv/bias", "output/kernel", "output/bias")
        return _attention_reference(h, *(weights[f"attention/{n}"] for n in names), num_heads=2)

    def feed(h):
        hidden = _gelu_tanh(h @ weights["feed_forward/intermediate/kernel"] + weights["feed_forward/intermediate/bias"])
        return hidden @ weights["feed_forward/output/kernel"] + weights["feed_forward/output/bias"]

    if normalize_first:
        h = x + attend(norm("attention_norm", x))
        expected = h + feed(norm("feed_forward_norm", h))
    else:
        h = norm("attention_norm", x + attend(x))
        expected = norm("feed_forward_norm", h + feed(h))
    np.testing.assert_allclose(ops.convert_to_numpy(block(x)), expected, atol=1e-4)


@pytest.mark.parametrize("normalize_first", [True, False])
def test_decoder_block_with_cache_equals_full_pass(normalize_first):
    x = np.random.RandomState(6).normal(size=(2, 6, 8)).astype("float32")
    block = DecoderBlock(num_heads=2, intermediate_dim=16, normalize_first=normalize_first)
    block.build(x.shape)
    _randomize(block)
    full = ops.convert_to_numpy(block(x))
    cache = (np.zeros((2, 2, 6, 4), "float32"), np.zeros((2, 2, 6, 4), "float32"))
    prefix, cache = block(x[:, :3], cache=cache, start_index=0)
    steps = [prefix]
    for t in range(3, 6):
        out, cache = block(x[:, t : t + 1], cache=cache, start_index=t)
        steps.append(out)
    assert [tuple(c.shape) for c in cache] == [(2, 2, 6, 4)] * 2
    np.testing.assert_allclose(ops.convert_to_numpy(ops.concatenate(steps, 1)), full, atol=1e-5)


def test_embedding_adds_position_from_start_index():
    layer = TokenAndPositionEmbedding(vocabulary_size=10, sequence_length=6, hidden_dim=4)
    layer.build((None, 6))
    _randomize(layer)
    tokens, positions = layer.get_weights()
    ids = np.array([[3, 1]], "int32")
    out = ops.convert_to_numpy(layer(ids, start_index=2))
    np.testing.assert_allclose(out[0], tokens[[3, 1]] + positions[[2, 3]], atol=1e-6)


@pytest.mark.parametrize(
    "make_layer, shape",
    [
        (lambda: TokenAndPositionEmbedding(10, 6, 4, embeddings_initializer="random_normal"), (2, 6)),
        (lambda: LearnedPositionEmbedding(6, 4, embeddings_initializer="random_normal"), (2, 5, 4)),
        (lambda: CausalSelfAttention(2, dropout=0.1, use_bias=False, output_kernel_initializer="zeros"), (2, 5, 8)),
        (lambda: FeedForward(12, dropout=0.1, use_bias=False), (2, 5, 8)),
        (lambda: DecoderBlock(2, 16, dropout=0.1, layer_norm_epsilon=1e-6, normalize_first=False), (2, 5, 8)),
        (lambda: DecoderBlock(2, 16, position_bias="alibi"), (2, 5, 8)),
        (lambda: TokenAndPositionEmbedding(10, 6, 4, position_embedding="alibi"), (2, 6)),
    ],
)
def test_get_config_round_trip_gives_identical_outputs(make_layer, shape):
    layer = make_layer()
    inputs = (
        np.random.RandomState(0).randint(0, 10, shape).astype("int32")
        if len(shape) == 2
        else np.random.RandomState(0).normal(size=shape).astype("float32")
    )
    layer.build(inputs.shape)
    _randomize(layer)
    clone = type(layer).from_config(layer.get_config())
    clone.build(inputs.shape)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    np.testing.assert_array_equal(ops.convert_to_numpy(clone(inputs)), ops.convert_to_numpy(layer(inputs)))


def test_unknown_position_embedding_kind_is_refused_by_name():
    with pytest.raises(ValueError, match=r"position_embedding='learnt'\. Did you mean 'learned'\?"):
        TokenAndPositionEmbedding(10, 6, 4, position_embedding="learnt")


def test_attention_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="Input width 8 is not divisible by num_heads=3"):
        CausalSelfAttention(num_heads=3).build((2, 5, 8))
