import io
import json
import math
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kgpt.config import ModelConfig
from kgpt.model.gpt import GPT, build_model, count_parameters
from kgpt.model.layers import POSITION_EMBEDDINGS, register_position_embedding
from kgpt.model.saving import save_model
from kgpt.rundir import load_model

TINY = ModelConfig(vocabulary_size=32, sequence_length=8, num_layers=2, num_heads=2, hidden_dim=16)


def _ids(shape=(2, 8), seed=0, vocabulary_size=32):
    return np.random.RandomState(seed).randint(0, vocabulary_size, shape).astype("int32")


def _numpy(x):
    return ops.convert_to_numpy(x)


@pytest.fixture(
    params=[{}, {"normalize_first": False}, {"position_embedding": "alibi"}],
    ids=["pre_ln", "post_ln", "alibi"],
)
def model(request):
    return build_model(ModelConfig(**{**TINY.to_dict(), **request.param}))


def test_output_shape_and_dtype(model):
    logits = model(_ids((3, 5)))
    assert tuple(logits.shape) == (3, 5, 32)
    assert logits.dtype == "float32"


def test_causality(model):
    ids = _ids()
    logits = _numpy(model(ids))
    for t in range(7):
        changed = ids.copy()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 32
        new = _numpy(model(changed))
        np.testing.assert_allclose(new[:, : t + 1], logits[:, : t + 1], atol=1e-6)
        assert np.abs(new[:, t + 1] - logits[:, t + 1]).max() > 1e-4  # the change is seen


def test_cached_decoding_token_by_token_equals_full_pass(model):
    ids = _ids()
    full = _numpy(model(ids))
    cache = model.initial_cache(2)
    # One (key, value) pair per layer, each (batch, heads, max_length, head_dim).
    assert [[tuple(c.shape) for c in pair] for pair in cache] == [[(2, 2, 8, 8)] * 2] * 2
    for t in range(8):
        logits, cache = model.call_with_cache(ids[:, t : t + 1], cache, t)
        np.testing.assert_allclose(_numpy(logits)[:, 0], full[:, t], atol=1e-5)


def test_cached_prefill_then_steps_equals_full_pass(model):
    ids = _ids()
    full = _numpy(model(ids))
    prefix, cache = model.call_with_cache(ids[:, :5], model.initial_cache(2), 0)
    np.testing.assert_allclose(_numpy(prefix), full[:, :5], atol=1e-5)
    for t in range(5, 8):
        logits, cache = model.call_with_cache(ids[:, t : t + 1], cache, t)
        np.testing.assert_allclose(_numpy(logits)[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("length", [1, None], ids=["step", "prefill"])
def test_cached_call_in_a_non_xla_graph_has_no_xla_ops(model, length):
    step = tf.function(model.call_with_cache, jit_compile=False)
    cache_spec = tf.nest.map_structure(
        lambda c: tf.TensorSpec([None, 2, None, 8], tf.float32), model.initial_cache(2)
    )
    concrete = step.get_concrete_function(
        tf.TensorSpec([None, length], tf.int32), cache_spec, tf.TensorSpec([], tf.int32)
    )
    graph = concrete.graph.as_graph_def()
    ops_used = {node.op for node in graph.node}
    for function in graph.library.function:
        ops_used |= {node.op for node in function.node_def}
        assert "_XlaMustCompile" not in function.attr
    assert "TensorScatterUpdate" in ops_used  # the cache write is really in the graph
    assert not [op for op in ops_used if op.startswith("Xla")]
    ids = _ids((2, 8))
    full = _numpy(model(ids))
    if length is None:  # the prompt prefill
        logits, _ = concrete(ids[:, :3], model.initial_cache(2), tf.constant(0))
        np.testing.assert_allclose(_numpy(logits), full[:, :3], atol=1e-5)
    else:  # a decode step after an eager prefill
        _, cache = model.call_with_cache(ids[:, :3], model.initial_cache(2), 0)
        logits, _ = concrete(ids[:, 3:4], cache, tf.constant(3))
        np.testing.assert_allclose(_numpy(logits)[:, 0], full[:, 3], atol=1e-5)


def test_cached_decoding_under_mixed_precision():
    model = build_model(TINY, dtype="mixed_bfloat16")
    ids = _ids()
    full = _numpy(model(ids))
    prefix, cache = model.call_with_cache(ids[:, :5], model.initial_cache(2), 0)
    assert all(c.dtype == "bfloat16" for c in tf.nest.flatten(cache))
    steps = [_numpy(prefix)]
    for t in range(5, 8):
        logits, cache = model.call_with_cache(ids[:, t : t + 1], cache, t)
        steps.append(_numpy(logits))
    cached = np.concatenate(steps, axis=1)
    assert cached.dtype == np.float32
    np.testing.assert_allclose(cached, full, atol=0.05)
    assert (cached.argmax(-1) == full.argmax(-1)).mean() > 0.9


def test_tied_head_shares_the_token_embedding_variable():
    model = build_model(TINY)
    tables = [w for w in model.weights if tuple(w.shape) == (32, 16)]
    assert len(tables) == 1 and tables[0] is model.token_embeddings
    ids = np.array([[1, 2, 3]], "int32")
    table = model.token_embeddings.numpy()
    zeroed = table.copy()
    zeroed[7] = 0.0  # token 7 is not in the input, so only the head sees this row
    model.token_embeddings.assign(zeroed)
    logits = _numpy(model(ids))
    np.testing.assert_array_equal(logits[..., 7], 0.0)
    assert np.all(np.abs(logits[..., 8]) > 0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"normalize_first": False}, {"use_bias": False}, {"intermediate_dim": 24, "num_layers": 3},
     {"position_embedding": "alibi"}],
)
def test_parameter_count_equals_closed_form(overrides):
    config = ModelConfig(**{**TINY.to_dict(), **overrides})
    assert build_model(config).count_params() == count_parameters(config)


def test_parameter_count_of_gpt2_small():
    config = ModelConfig(vocabulary_size=50257, sequence_length=1024, num_layers=12, num_heads=12, hidden_dim=768)
    assert count_parameters(config) == 124_439_808  # GPT-2 small with its tied head


def test_gpt2_initialization():
    config = ModelConfig(vocabulary_size=64, sequence_length=8, num_layers=8, num_heads=4, hidden_dim=128)
    model = build_model(config)
    block = model.blocks[0]
    assert np.std(block.attention.qkv_dense.kernel.numpy()) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * config.num_layers)
    assert np.std(block.attention.output_dense.kernel.numpy()) == pytest.approx(residual, rel=0.05)
    assert np.std(block.feed_forward.output_dense.kernel.numpy()) == pytest.approx(residual, rel=0.05)
    assert np.std(model.token_embeddings.numpy()) == pytest.approx(0.02, rel=0.05)
    assert not np.any(block.attention.qkv_dense.bias.numpy())


def test_dropout_only_in_training():
    model = build_model(ModelConfig(**{**TINY.to_dict(), "dropout": 0.5}))
    ids = _ids()
    np.testing.assert_array_equal(_numpy(model(ids)), _numpy(model(ids)))
    assert np.abs(_numpy(model(ids, training=True)) - _numpy(model(ids))).max() > 1e-3


def test_get_config_round_trip(model):
    clone = GPT.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    assert clone.model_config == model.model_config
    ids = _ids()
    np.testing.assert_array_equal(_numpy(clone(ids)), _numpy(model(ids)))


def test_keras_file_round_trip_is_exact(model, tmp_path):
    path = tmp_path / "model.keras"
    save_model(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]  # no temporary left behind
    loaded = load_model(path)
    assert isinstance(loaded, GPT)
    ids = _ids()
    np.testing.assert_array_equal(_numpy(loaded(ids)), _numpy(model(ids)))
    a, _ = loaded.call_with_cache(ids, loaded.initial_cache(2), 0)
    np.testing.assert_allclose(_numpy(a), _numpy(model(ids)), atol=1e-5)


def test_keras_file_with_python_code_is_refused(tmp_path):
    # A Lambda layer's function is Python bytecode in the file: safe mode must refuse to run it.
    path = tmp_path / "lambda.keras"
    save_model(keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)]), path)
    with pytest.raises(ValueError, match=r"Could not load .*lambda\.keras.*safe_mode"):
        load_model(path)


def test_build_model_validates_dicts():
    with pytest.raises(ValueError, match="num_heads"):
        build_model({**TINY.to_dict(), "num_heads": 3})


# The weights of a tiny 2-layer model as a878904 named them: GPT-2 import (kgpt/gpt2.py) maps these
# paths and weight decay selects by them, so a layer or attribute rename must fail here.
TINY_VARIABLE_PATHS = [
    "gpt/embeddings/token_embedding/embeddings (32, 16)",
    "gpt/embeddings/position_embedding/embeddings (8, 16)",
    *[
        f"gpt/block_{index}/{name}"
        for index in range(2)
        for name in (
            "attention_norm/gamma (16,)", "attention_norm/beta (16,)",
            "attention/qkv/kernel (16, 48)", "attention/qkv/bias (48,)",
            "attention/output/kernel (16, 16)", "attention/output/bias (16,)",
            "feed_forward_norm/gamma (16,)", "feed_forward_norm/beta (16,)",
            "feed_forward/intermediate/kernel (16, 64)", "feed_forward/intermediate/bias (64,)",
            "feed_forward/output/kernel (64, 16)", "feed_forward/output/bias (16,)",
        )
    ],
    "gpt/final_norm/gamma (16,)",
    "gpt/final_norm/beta (16,)",
]


def test_variable_paths_are_pinned():
    for normalize_first in (True, False):
        model = build_model(ModelConfig(**{**TINY.to_dict(), "normalize_first": normalize_first}), name="gpt")
        expected = TINY_VARIABLE_PATHS if normalize_first else TINY_VARIABLE_PATHS[:-2]
        assert [f"{w.path} {tuple(w.shape)}" for w in model.weights] == expected


def _weight_entries(path):
    """The datasets of a `.keras` file's weights: where Keras finds each variable when loading."""
    with zipfile.ZipFile(path) as archive:
        entries = []
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
            weights.visititems(
                lambda name, item: entries.append(name) if isinstance(item, h5py.Dataset) else None
            )
    return entries


def test_keras_file_without_position_embedding_key_loads(tmp_path):
    # A file as written before `position_embedding` existed: its config lacks the key.
    model = build_model(TINY)
    save_model(model, tmp_path / "new.keras")
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(tmp_path / "new.keras") as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                assert config["config"].pop("position_embedding") == "learned"
                data = json.dumps(config).encode()
            target.writestr(item, data)
    # The weight entries are those a878904 wrote (nested by attribute name, blocks by class).
    block_entries = [
        f"blocks/{block}/{name}/vars/{index}"
        for block in ("decoder_block", "decoder_block_1")
        for name, count in (
            ("attention/output_dense", 2), ("attention/qkv_dense", 2), ("attention_norm", 2),
            ("feed_forward/intermediate_dense", 2), ("feed_forward/output_dense", 2),
            ("feed_forward_norm", 2),
        )
        for index in range(count)
    ]
    assert _weight_entries(old) == block_entries + [
        "embeddings/position_embedding/vars/0",
        "embeddings/token_embedding/vars/0",
        "final_norm/vars/0",
        "final_norm/vars/1",
    ]
    loaded = load_model(old)
    assert loaded.model_config == model.model_config
    assert loaded.get_config()["position_embedding"] == "learned"
    ids = _ids()
    np.testing.assert_array_equal(_numpy(loaded(ids)), _numpy(model(ids)))


def test_unknown_position_embedding_suggests_the_closest_kind():
    with pytest.raises(ValueError, match=r"position_embedding='lerned'\. Did you mean 'learned'\?"):
        GPT(vocabulary_size=32, sequence_length=8, position_embedding="lerned")
    with pytest.raises(ValueError, match=r"Known kinds: .*learned"):
        build_model({**TINY.to_dict(), "position_embedding": "rotary"})


class _NoPositions(keras.layers.Layer):
    """A kind with no weights (NoPE): causal attention alone tells positions apart."""

    def __init__(self, sequence_length, hidden_dim, embeddings_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length, self.hidden_dim = sequence_length, hidden_dim

    @classmethod
    def parameter_count(cls, sequence_length, hidden_dim):
        return 0

    def call(self, inputs, start_index=0):
        return inputs

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length, "hidden_dim": self.hidden_dim}


def test_a_registered_position_embedding_kind_drives_the_whole_model(monkeypatch):
    # What ARCHITECTURE.md promises: a kind is one registered class; model code is untouched.
    monkeypatch.setattr("kgpt.model.layers.POSITION_EMBEDDINGS", dict(POSITION_EMBEDDINGS))
    register_position_embedding("none")(_NoPositions)
    with pytest.raises(ValueError, match="'none' is already registered"):
        register_position_embedding("none")(_NoPositions)
    config = ModelConfig(**{**TINY.to_dict(), "position_embedding": "none"})
    model = build_model(config)
    assert isinstance(model.embeddings.position_embedding, _NoPositions)
    assert model.count_params() == count_parameters(config) == count_parameters(TINY) - 8 * 16
    assert not [w.path for w in model.weights if "position" in w.path]
    ids = _ids()
    full = _numpy(model(ids))
    prefix, cache = model.call_with_cache(ids[:, :5], model.initial_cache(2), 0)
    np.testing.assert_allclose(_numpy(prefix), full[:, :5], atol=1e-5)
    step, _ = model.call_with_cache(ids[:, 5:6], cache, 5)
    np.testing.assert_allclose(_numpy(step)[:, 0], full[:, 5], atol=1e-5)
    clone = GPT.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(_numpy(clone(ids)), full)
