"""The TF Serving export: signatures, argument checks, XLA-free graphs, versions, a fresh process,
streaming through `prefill` and `step`.

The default run checks the serving functions in-process (one tiny random model and a character
tokenizer); tests marked `export` write real SavedModels and load them (run with `-m export`).
"""

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_generate import _joined  # streamed pieces joined per continuation

from kgpt.cli import main
from kgpt.generation import sampling
from kgpt.generation.decoding import MAX_NEW_TOKENS as MAX_NEW_TOKENS_LIMIT
from kgpt.generation.decoding import default_window
from kgpt.generation.generator import Generator
from kgpt.generation.sampling import SamplingOptions, option
from kgpt.generation.stopping import cut_at_stop
from kgpt.model.gpt import build_model
from kgpt.model.recurrent import RecurrentLanguageModel
from kgpt.serving import export as export_module
from kgpt.serving import saved_model_generator as generate_module
from kgpt.serving.export import (
    check_saved_signatures,
    export,
    is_saved_model,
    operations,
    publish,
    saved_model_version_path,
    version_numbers,
    xla_findings,
)
from kgpt.serving.saved_model_generator import SavedModelGenerator, load_generator
from kgpt.serving.serving_module import MAX_BEAMS, ServingModule
from kgpt.serving.signatures import (
    DEFAULT_BEAMS,
    SERVING_DEFAULT,
    SIGNATURES,
    STEP_STATE,
    read_signature_defs,
)
from kgpt.tokenizers.bpe import train_bpe

SEQUENCE_LENGTH = 32
MAX_NEW_TOKENS = 8
TEXT = "the cat sat on the mat. a dog ran!\n"
PROMPTS = ["the cat", "a", "", "dog ran on the mat"]


@pytest.fixture(scope="module")
def run(tiny_run):
    """`(run_dir, model, tokenizer)`: conftest's `tiny_run` (a character tokenizer of TEXT, context 32)."""
    return tiny_run


@pytest.fixture(scope="module")
def module(run):
    _, model, tokenizer = run
    return ServingModule(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS)


def _generate(module, prompts=("the",), max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, seed=0,
              stop=(), stop_token_ids=()):
    return module.generate(
        prompts=tf.constant(list(prompts), tf.string), max_new_tokens=tf.constant(max_new_tokens),
        temperature=tf.constant(temperature), top_k=tf.constant(top_k), top_p=tf.constant(top_p),
        seed=tf.constant(seed), stop=tf.constant(list(stop), tf.string, shape=[len(stop)]),
        stop_token_ids=tf.constant(list(stop_token_ids), tf.int32, shape=[len(stop_token_ids)]),
    )


def _texts(outputs):
    return [t.decode("utf-8") for t in outputs["text"].numpy()]


# --- in-process serving functions (the graphs that get exported) ---------------------------------


def test_the_saved_signature_defs_are_checked_against_the_contract(tmp_path):
    def saved(**changes):
        outputs = {"text": tf.constant([""]), "token_ids": tf.zeros([1, 0], tf.int32),
                   "token_count": tf.zeros([1], tf.int32), "prompt_token_count": tf.zeros([1], tf.int32),
                   "truncated": tf.zeros([1], tf.bool), "stopped": tf.zeros([1], tf.bool), **changes}
        module = tf.Module()
        module.serving_default = tf.function(lambda prompts: outputs,
                                             input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
        path = str(tmp_path / str(len(os.listdir(tmp_path))))
        tf.saved_model.save(module, path, signatures={"serving_default": module.serving_default})
        return path

    check_saved_signatures([SERVING_DEFAULT], saved())
    with pytest.raises(ValueError, match="output 'token_count' is int64"):
        check_saved_signatures([SERVING_DEFAULT], saved(token_count=tf.zeros([1], tf.int64)))


def test_serving_default_is_greedy_generation(run, module):
    _, model, tokenizer = run
    expected = Generator(model, tokenizer, jit_compile=False).generate(PROMPTS, MAX_NEW_TOKENS)
    outputs = module.serving_default(tf.constant(PROMPTS))
    assert _texts(outputs) == expected
    # token_ids hold the continuation (padding past token_count), text is their detokenization.
    counts = outputs["token_count"].numpy()
    ids = [row[:n].tolist() for row, n in zip(outputs["token_ids"].numpy(), counts)]
    assert [tokenizer.detokenize(tf.constant(row, tf.int32)).numpy().decode() for row in ids] == expected
    assert outputs["prompt_token_count"].numpy().tolist() == [7, 1, 1, 18]  # "" -> end-of-text
    # The generate signature with top_k=1 is greedy too, and sampling is reproducible by seed.
    assert _texts(_generate(module, PROMPTS, MAX_NEW_TOKENS, top_k=1)) == expected
    sampled = _texts(_generate(module, PROMPTS, MAX_NEW_TOKENS, seed=3))
    assert sampled == _texts(_generate(module, PROMPTS, MAX_NEW_TOKENS, seed=3))
    # ... and the seed and the temperature are used: another seed, or greedy, gives other text.
    assert sampled != _texts(_generate(module, PROMPTS, MAX_NEW_TOKENS, seed=4))
    assert sampled != expected


def test_prompts_longer_than_the_context_keep_their_end(module):
    long = TEXT * 3
    room = SEQUENCE_LENGTH - MAX_NEW_TOKENS
    outputs = module.serving_default(tf.constant([long, long[-room:]]))
    assert outputs["truncated"].numpy().tolist() == [True, False]
    assert outputs["prompt_token_count"].numpy().tolist() == [room, room]
    text = _texts(outputs)
    assert text[0] == text[1]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(prompts=()), "prompts is empty"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        # Each failing call costs ~3 s (TensorFlow's error message reads the whole graph): the rest
        # run with the marked tests, beside the loaded export's refusals.
        *[pytest.param(*case, marks=pytest.mark.slow) for case in [
            (dict(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1), f"max_new_tokens must be <= {MAX_NEW_TOKENS_LIMIT}"),
            (dict(top_p=0.0), "top_p must be in"),
            (dict(top_p=1.5), "top_p must be in"),
            (dict(top_k=-1), "top_k must be >= 0"),
            (dict(temperature=0.0), "for greedy decoding use top_k=1"),
            (dict(stop=["a"] * 10, stop_token_ids=[1] * 7), "too many stop sequences: at most 16"),
            (dict(stop_token_ids=[-1]), "stop_token_ids must be >= 0"),
            (dict(stop_token_ids=[1000]), "stop_token_ids must be < vocabulary_size"),
        ]],
        (dict(stop=["a", ""]), "stop sequences must be non-empty strings"),
    ],
)
def test_generate_refuses_bad_arguments_with_invalid_argument(module, arguments, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _generate(module, **arguments)


def _beam_search(module, prompts=("the",), max_new_tokens=4, num_beams=3, length_penalty=1.0, stop=(),
                 stop_token_ids=()):
    return module.beam_search(
        tf.constant(list(prompts), tf.string), tf.constant(max_new_tokens), tf.constant(num_beams),
        tf.constant(length_penalty), tf.constant(list(stop), tf.string, shape=[len(stop)]),
        tf.constant(list(stop_token_ids), tf.int32, shape=[len(stop_token_ids)]),
    )


@pytest.mark.parametrize("stop", [(), pytest.param(("t",), marks=pytest.mark.slow)])
def test_beam_search_signature_equals_the_in_process_beams(run, module, stop):
    _, model, tokenizer = run
    generator = Generator(model, tokenizer, jit_compile=False)
    beams, length_penalty = 3, 0.5
    expected = generator.generate(PROMPTS, MAX_NEW_TOKENS, num_beams=beams, num_return_sequences=beams,
                                  length_penalty=length_penalty, stop=list(stop))
    outputs = _beam_search(module, PROMPTS, MAX_NEW_TOKENS, beams, length_penalty, stop)
    beam_texts = [[t.decode() for t in row] for row in outputs["beam_text"].numpy()]
    assert beam_texts == [expected[i:i + beams] for i in range(0, len(expected), beams)]
    assert _texts(outputs) == [row[0] for row in beam_texts]  # the best beam, as generate's outputs
    counts = outputs["token_count"].numpy()
    assert counts.tolist() == outputs["beam_token_count"].numpy()[:, 0].tolist()
    ids = [row[:n].tolist() for row, n in zip(outputs["token_ids"].numpy(), counts)]
    texts = [tokenizer.detokenize(tf.constant(row, tf.int32)).numpy().decode() for row in ids]
    assert [cut_at_stop(text, list(stop)) for text in texts] == _texts(outputs)
    assert outputs["prompt_token_count"].numpy().tolist() == [7, 1, 1, 18]
    # Left out, the inputs take their recorded defaults: 4 beams, length penalty 1, no stops.
    defaults = module.beam_search(tf.constant(PROMPTS[:2]), tf.constant(MAX_NEW_TOKENS))
    assert [[t.decode() for t in row] for row in defaults["beam_text"].numpy()] == [
        generator.generate([prompt], MAX_NEW_TOKENS, num_beams=4, num_return_sequences=4)
        for prompt in PROMPTS[:2]
    ]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_beams=0), "num_beams must be >= 1"),
        (dict(num_beams=MAX_BEAMS + 1), f"num_beams must be <= {MAX_BEAMS}"),
        (dict(max_new_tokens=SEQUENCE_LENGTH), "beam search stays within"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(prompts=()), "prompts is empty"),
        (dict(stop=[""]), "stop sequences must be non-empty strings"),
    ],
)
def test_beam_search_refuses_bad_arguments_with_invalid_argument(module, arguments, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _beam_search(module, **arguments)


def test_serving_default_refuses_an_empty_prompt_list(module):
    with pytest.raises(tf.errors.InvalidArgumentError, match="prompts is empty"):
        module.serving_default(tf.constant([], tf.string))


def test_generate_signature_inputs_are_the_sampling_fields(module):
    spec = module.generate.input_signature
    names = [tensor.name for tensor in spec]
    fields = [field.name for field in dataclasses.fields(SamplingOptions)]
    assert names == ["prompts", "max_new_tokens", *fields, "stop", "stop_token_ids", "logprobs"]
    assert {t.name: t.dtype for t in spec[2:-3]} == sampling.signature_dtypes()
    assert [(t.shape.as_list(), t.dtype) for t in spec[-3:]] == [
        ([None], tf.string), ([None], tf.int32), ([], tf.int32)]
    # The Python defaults are what the SignatureDef records (temperature 1: greedy is top_k=1).
    parameters = inspect.signature(module.generate.python_function).parameters
    defaults = {name: p.default.numpy().tolist() for name, p in parameters.items() if name != "prompts"}
    assert defaults == {
        "max_new_tokens": MAX_NEW_TOKENS, **sampling.signature_defaults(), "stop": [], "stop_token_ids": [],
        "logprobs": -1,
    }


@dataclasses.dataclass(frozen=True)
class MinPOptions(SamplingOptions):
    min_p: float = option(0.0, "float32", "keep tokens >= min_p x the best one's probability",
                          minimum=0, maximum=1)


def test_a_new_sampling_field_becomes_a_checked_signature_input(run, module, monkeypatch):
    def keep_min_p(sorted_logits, options):
        probabilities = tf.nn.softmax(sorted_logits)
        return tf.where(probabilities >= options["min_p"] * probabilities[:, :1], sorted_logits, -1e30)

    monkeypatch.setitem(sampling.FILTERS, "min_p", keep_min_p)
    _, model, tokenizer = run
    extended = ServingModule(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS, sampling_type=MinPOptions)
    assert [t.name for t in extended.generate.input_signature][-4] == "min_p"
    prompts = tf.constant(PROMPTS)
    inputs = dict(prompts=prompts, max_new_tokens=tf.constant(MAX_NEW_TOKENS), **MinPOptions(
        temperature=1.0, seed=3, min_p=1.0).graph_tensors())
    # min_p=1 keeps only the best token: sampling at temperature 1 becomes greedy.
    assert _texts(extended.generate(**inputs)) == _texts(module.serving_default(prompts))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"min_p must be in \[0, 1\]"):
        extended.generate(**{**inputs, "min_p": tf.constant(1.5)})


def _recurrent_model(tokenizer, sequence_length=SEQUENCE_LENGTH, seed=0):
    keras.utils.set_random_seed(seed)
    return RecurrentLanguageModel(
        vocabulary_size=tokenizer.vocabulary_size, sequence_length=sequence_length, num_layers=1,
        num_heads=2, hidden_dim=16,
    )


def test_a_recurrent_model_serves_like_its_generator(run):
    _, _, tokenizer = run
    model = _recurrent_model(tokenizer)
    recurrent = ServingModule(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS)
    expected = Generator(model, tokenizer).generate(PROMPTS, MAX_NEW_TOKENS)
    assert _texts(recurrent.serving_default(tf.constant(PROMPTS))) == expected


def _prefill(module, prompts, max_new_tokens, **options):
    """`prefill`'s outputs and the sampling inputs (`SamplingOptions` fields) it was given."""
    options = SamplingOptions(**options).graph_tensors()
    outputs = module.prefill(prompts=tf.constant(prompts), max_new_tokens=tf.constant(max_new_tokens), **options)
    return outputs, options


def test_prefill_and_steps_continue_like_serving_default(run, module):
    _, model, tokenizer = run
    prompt = "the cat"
    ids = tokenizer.encode_documents([prompt])[0].tolist()
    outputs, options = _prefill(module, [prompt] * 2, MAX_NEW_TOKENS, temperature=1.0, top_k=1)
    # The state: the prompt in a cache of prompt + new tokens, the last `window` tokens for rebuilds.
    config = model.model_config
    assert outputs["cache"].shape == (
        2, 2 * config.num_layers, config.num_heads, len(ids) + MAX_NEW_TOKENS, config.head_dim)
    window = default_window(SEQUENCE_LENGTH)
    assert outputs["recent"].numpy().tolist() == [[0] * (window - len(ids)) + ids] * 2
    assert (int(outputs["position"]), int(outputs["offset"])) == (len(ids), 0)
    assert outputs["prompt_token_count"].numpy().tolist() == [len(ids)] * 2
    tokens = [outputs["token"].numpy()]
    for _ in range(MAX_NEW_TOKENS - 1):
        outputs = module.step(**{key: outputs[key] for key in STEP_STATE}, **options)
        tokens.append(outputs["token"].numpy())
    assert int(outputs["position"]) == len(ids) + MAX_NEW_TOKENS - 1
    rows = np.stack(tokens, axis=1)
    counts = [list(row).index(tokenizer.end_of_text_id) if tokenizer.end_of_text_id in row else len(row)
              for row in rows]
    texts = module.detokenize(tf.constant(rows), tf.constant(counts, tf.int32))
    expected = _texts(module.serving_default(tf.constant([prompt])))
    assert _texts(texts) == expected * 2


def _step(module, outputs, **changes):
    return module.step(**{**{key: outputs[key] for key in STEP_STATE}, **changes})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda module: _prefill(module, ["the cat", "a"], 4), "prefill takes prompts of one token count"),
        (lambda module: _prefill(module, ["a"], 0), "max_new_tokens must be >= 1"),
        (lambda module: _step(module, _prefill(module, ["a"], 4)[0], top_p=tf.constant(1.5)), "top_p must be in"),
        (lambda module: _step(module, _prefill(module, ["a"], 4)[0], token=tf.constant([1000])),
         "token ids must be < vocabulary_size"),
        (lambda module: _step(module, _prefill(module, ["a"], 4)[0], recent=tf.zeros([1, 3], tf.int32)),
         "recent must be"),
        (lambda module: module.detokenize(tf.constant([[1, 2]]), tf.constant([3])), "token_count must be <="),
    ],
)
def test_streaming_signatures_refuse_bad_arguments_with_invalid_argument(module, call, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call(module)


def _log_likelihood(model, ids):
    """Sum of log p(ids[i] | ids[:i]) for i >= 1, from the Keras model's logits."""
    logits = np.asarray(model(np.array([ids[:-1]], "int32")), "float64")[0]
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return log_probabilities[np.arange(len(ids) - 1), ids[1:]].sum()


def test_score_is_the_models_log_likelihood_after_end_of_text(run, module):
    _, model, tokenizer = run
    texts = ["the cat sat", "a", TEXT * 2]
    outputs = module.score(tf.constant(texts))
    expected, counts = [], []
    for text in texts:
        ids = [tokenizer.end_of_text_id] + tokenizer.encode_documents([text])[0].tolist()
        ids = ids[-(SEQUENCE_LENGTH + 1) :]  # a long text: its last context's worth of tokens
        expected.append(_log_likelihood(model, ids))
        counts.append(len(ids) - 1)
    assert outputs["token_count"].numpy().tolist() == counts == [11, 1, SEQUENCE_LENGTH]
    np.testing.assert_allclose(outputs["log_likelihood"].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        outputs["perplexity"].numpy(), np.exp(-np.array(expected) / counts), rtol=1e-5
    )


@pytest.mark.parametrize("texts, message", [([], "texts is empty"), (["a", ""], "empty text")])
def test_score_refuses_empty_input(module, texts, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        module.score(tf.constant(texts, tf.string))


def test_logits_equal_the_keras_models(run, module):
    _, model, _ = run
    ids = np.random.default_rng(0).integers(0, model.model_config.vocabulary_size, (3, 11))
    ids = ids.astype("int32")
    np.testing.assert_allclose(module.logits(tf.constant(ids))["logits"], model(ids), atol=1e-6)


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.zeros((1, SEQUENCE_LENGTH + 1)), "longer than the context"),
        (np.zeros((1, 0)), "at least one token"),
        (np.full((1, 3), 1000), "vocabulary_size"),
        (np.full((1, 3), -1), ">= 0"),
    ],
)
def test_logits_refuse_bad_token_ids(module, ids, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        module.logits(tf.constant(ids, tf.int32))


@pytest.mark.slow  # ~15-30 s on 2 cores
def test_stops_cut_the_text_as_the_generator_does(run, module):
    _, model, tokenizer = run
    generator = Generator(model, tokenizer, jit_compile=False)
    plain_outputs = _generate(module, PROMPTS, 24, seed=3)
    plain = _texts(plain_outputs)
    # Stops drawn from the plain texts: a string spanning tokens, and one the tokenizer cannot encode.
    stop = [plain[0][5:7], plain[3][2:3], "Z"]
    outputs = _generate(module, PROMPTS, 24, seed=3, stop=stop)
    texts = _texts(outputs)
    assert texts == [cut_at_stop(text, stop) for text in plain]
    assert not any(s in text for text in texts for s in stop)
    with pytest.warns(UserWarning, match="left-truncated"):  # as the graph: 16 tokens kept
        completions = generator.complete(PROMPTS, 24, temperature=1.0, seed=3, stop=stop)
    assert [c.text for c in completions] == texts
    assert any(len(t) < len(p) for t, p in zip(texts, plain))
    # `stopped`: ended by end-of-text or a stop (cut rows), as the generator's finish reasons say.
    stopped = outputs["stopped"].numpy().tolist()
    assert stopped == [bool(s) or t != p for s, t, p in zip(plain_outputs["stopped"].numpy(), texts, plain)]
    assert [c.finish_reason for c in completions] == ["stop" if s else "length" for s in stopped]
    assert [c.token_count for c in completions] == outputs["token_count"].numpy().tolist()
    # A row ends early at its stop; token_ids still hold the tokens of the stop string.
    assert outputs["token_count"].numpy()[0] < 24
    # A stop token id ends a row like end-of-text and is not returned.
    token = tokenizer.encode_documents([plain[0][3]])[0][0]
    by_id = _generate(module, PROMPTS[:1], 24, seed=3, stop_token_ids=[token])
    assert _texts(by_id) == [plain[0][: plain[0].index(plain[0][3])]]
    assert by_id["token_count"].numpy().tolist() == [plain[0].index(plain[0][3])]
    assert _texts(by_id) == generator.generate(PROMPTS[:1], 24, temperature=1.0, seed=3,
                                               stop_token_ids=[int(token)])


def _spread_model(tokenizer, sequence_length=16):
    """A model with a wide initialisation: far-apart logits, so greedy picks are robust to rounding."""
    keras.utils.set_random_seed(7)
    return build_model(dict(vocabulary_size=tokenizer.vocabulary_size, sequence_length=sequence_length,
                            num_layers=2, num_heads=2, hidden_dim=16, initializer_range=0.5))


def _greedy_past_the_context(model, prompt, steps, sequence_length, window, end_of_text_id):
    """Full passes over the tokens since `offset`, which moves to the last `window` tokens whenever
    more than `sequence_length` would be needed (the reference, no cache), up to end-of-text."""
    ids, offset = list(prompt), 0
    for _ in range(steps):
        if len(ids) - offset > sequence_length:
            offset = len(ids) - window
        ids.append(int(np.argmax(model(np.array([ids[offset:]], "int32"))[0, -1])))
        if ids[-1] == end_of_text_id:
            return ids[len(prompt) : -1]
    return ids[len(prompt) :]


def _expected_past_the_context(model, tokenizer, prompts, steps):
    context = model.model_config.sequence_length
    rows = [tokenizer.encode_documents([p])[0].tolist() for p in prompts]
    rows = [row[-max(context - steps, default_window(context)):] for row in rows]
    window, end = default_window(context), tokenizer.end_of_text_id
    rows = [_greedy_past_the_context(model, row, steps, context, window, end) for row in rows]
    return [tokenizer.detokenize(tf.constant(row, tf.int32)).numpy().decode() for row in rows]


@pytest.mark.slow  # ~15-30 s on 2 cores
def test_greedy_past_the_context_equals_full_passes_over_cropped_windows(run):
    _, _, tokenizer = run
    model = _spread_model(tokenizer)
    module = ServingModule(model, tokenizer, max_new_tokens=64)
    prompts = ["the cat", "dog ran on the mat"]  # the second keeps its last 8 tokens
    expected = _expected_past_the_context(model, tokenizer, prompts, 64)
    outputs = module.serving_default(tf.constant(prompts))
    assert len(expected[0]) == len(expected[1]) == 64 and expected[0] != expected[1]
    assert _texts(outputs) == expected and outputs["token_count"].numpy().tolist() == [64, 64]
    assert outputs["truncated"].numpy().tolist() == [False, True]
    with pytest.warns(UserWarning, match="left-truncated to their last 8 tokens"):
        assert Generator(model, tokenizer).generate(prompts, 64) == expected


# --- the XLA check and versioning (fast: no real export) ----------------------------------------


def _save_function(path, function):
    holder = tf.Module()
    holder.f = tf.function(function, input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    tf.saved_model.save(holder, str(path), signatures={"serving_default": holder.f})


def test_xla_findings_catch_must_compile_functions_and_xla_ops(tmp_path):
    _save_function(tmp_path / "plain", lambda x: {"y": x * 2.0})
    assert xla_findings(tmp_path / "plain") == []
    holder = tf.Module()
    holder.f = tf.function(
        lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([None, 4], tf.float32)],
        jit_compile=True,
    )
    tf.saved_model.save(holder, str(tmp_path / "jit"), signatures={"serving_default": holder.f})
    assert any("_XlaMustCompile" in finding for finding in xla_findings(tmp_path / "jit"))
    # keras.ops.slice_update lowers to XlaDynamicUpdateSlice on TensorFlow, which TF Serving's
    # XLA-less runtime cannot run.
    _save_function(
        tmp_path / "xla_op",
        lambda x: {"y": keras.ops.slice_update(x, (0, 1), tf.ones([tf.shape(x)[0], 2]))},
    )
    assert any("XlaDynamicUpdateSlice" in finding for finding in xla_findings(tmp_path / "xla_op"))


def test_export_refuses_an_existing_version_and_bad_names(run, tmp_path):
    run_dir = run[0]
    existing = tmp_path / "tiny" / "3"
    existing.mkdir(parents=True)
    (existing / "saved_model.pb").write_bytes(b"old")
    with pytest.raises(ValueError, match="already exists; versions are never overwritten"):
        export(run_dir, "tiny", base_dir=tmp_path, version=3)
    assert (existing / "saved_model.pb").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path / "tiny")) == ["3"]  # nothing half-written left behind
    for name in ("", "a/b", "../up", ".hidden"):
        with pytest.raises(ValueError, match="Model name"):
            export(run_dir, name, base_dir=tmp_path)
    with pytest.raises(ValueError, match="positive"):
        export(run_dir, "tiny", base_dir=tmp_path, version=0)
    with pytest.raises(FileNotFoundError, match="No run directory"):
        export(str(tmp_path / "missing"), "tiny", base_dir=tmp_path)
    with pytest.raises(ValueError, match="max_new_tokens"):
        export(run_dir, "tiny", base_dir=tmp_path, max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1)


def test_a_save_that_fails_halfway_leaves_no_version_and_no_temporary_folder(
    run, tmp_path, monkeypatch
):
    def save_then_fail(module, directory, signatures=None):
        # Part of a SavedModel is on disk when the save breaks off.
        os.makedirs(os.path.join(directory, "variables"))
        with open(os.path.join(directory, "saved_model.pb"), "wb") as file:
            file.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)

    monkeypatch.setattr(export_module, "check_saved_signatures", _unchecked)  # the save is faked
    with pytest.raises(ValueError, match="Could not publish .*No space left on device"):
        export(run[0], "tiny", base_dir=tmp_path)
    assert os.listdir(tmp_path / "tiny") == []


def _unchecked(contract, saved_model_dir):
    """`check_saved_signatures` for a faked save, which writes no signatures to check."""


def _fake_save(also=None):
    """A stand-in for tf.saved_model.save writing a tiny folder (with `also()` run first)."""

    def save(module, directory, signatures=None):
        if also is not None:
            also()
        os.makedirs(os.path.join(directory, "variables"))
        with open(os.path.join(directory, "saved_model.pb"), "wb") as file:
            file.write(b"new")

    return save


def test_a_version_is_readable_by_other_users(run, tmp_path, monkeypatch):
    monkeypatch.setattr(tf.saved_model, "save", _fake_save())
    monkeypatch.setattr(export_module, "check_saved_signatures", _unchecked)  # the save is faked
    monkeypatch.setattr(export_module, "xla_findings", lambda path: [])
    previous = os.umask(0o022)
    try:
        path = export(run[0], "tiny", base_dir=tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755  # not mkdtemp's private 0700
    assert stat.S_IMODE(os.stat(os.path.join(path, "saved_model.pb")).st_mode) == 0o644


def test_a_version_another_export_publishes_meanwhile_makes_this_one_take_the_next(
    run, tmp_path, monkeypatch
):
    model_dir = tmp_path / "tiny"

    def concurrent_publish():  # the other export renames its version 1 into place first
        if not (model_dir / "1").exists():
            (model_dir / "1").mkdir()
            (model_dir / "1" / "saved_model.pb").write_bytes(b"other")

    monkeypatch.setattr(tf.saved_model, "save", _fake_save(concurrent_publish))

    monkeypatch.setattr(export_module, "check_saved_signatures", _unchecked)  # the save is faked
    monkeypatch.setattr(export_module, "xla_findings", lambda path: [])
    assert export(run[0], "tiny", base_dir=tmp_path) == str(model_dir / "2")
    assert (model_dir / "1" / "saved_model.pb").read_bytes() == b"other"
    assert (model_dir / "2" / "saved_model.pb").read_bytes() == b"new"
    assert sorted(os.listdir(model_dir)) == ["1", "2"]
    # An explicit --version is never moved: it fails, naming the taken version.
    (model_dir / "1").rename(model_dir / "old")
    with pytest.raises(ValueError, match="1 already exists; versions are never overwritten"):
        export(run[0], "tiny", base_dir=tmp_path, version=1)
    assert sorted(os.listdir(model_dir)) == ["1", "2", "old"]


def test_staging_folders_of_killed_exports_are_removed(run, tmp_path, monkeypatch):
    monkeypatch.setattr(tf.saved_model, "save", _fake_save())
    monkeypatch.setattr(export_module, "check_saved_signatures", _unchecked)  # the save is faked
    monkeypatch.setattr(export_module, "xla_findings", lambda path: [])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    model_dir = tmp_path / "tiny"
    killed = model_dir / f".tmp-{host}-{dead.pid}-abc123-1"
    running = model_dir / f".tmp-{host}-{os.getppid()}-def456-1"  # a live process's export
    for folder in (killed, running):
        (folder / "variables").mkdir(parents=True)
    assert export(run[0], "tiny", base_dir=tmp_path) == str(model_dir / "1")
    assert sorted(os.listdir(model_dir)) == sorted(["1", running.name])


def test_folder_layout_versions_and_lookup(tmp_path):
    model_dir = tmp_path / "tiny"
    assert version_numbers(model_dir) == [] and not is_saved_model(tmp_path)
    for name in ("1", "10", "2", ".tmp-x-1-y-3", "notes"):
        (model_dir / name).mkdir(parents=True)
    assert version_numbers(model_dir) == [1, 2, 10]
    (model_dir / "2" / "saved_model.pb").write_bytes(b"")
    (model_dir / "1" / "saved_model.pb").write_bytes(b"")
    # The highest version holding a SavedModel (10 has none yet).
    assert saved_model_version_path(model_dir) == str(model_dir / "2")
    assert saved_model_version_path(model_dir / "1") == str(model_dir / "1")
    assert is_saved_model(model_dir)
    with pytest.raises(FileNotFoundError, match="No SavedModel in"):
        saved_model_version_path(tmp_path)


def test_publish_refuses_a_version_below_1(module, tmp_path):
    with pytest.raises(ValueError, match="version=0 must be a positive integer"):
        publish(module, tmp_path / "tiny", version=0)


def test_cli_export_usage_errors_exit_2(run, tmp_path, capsys):
    base = ["--base-dir", str(tmp_path)]
    cases = [
        (["export", run[0], *base], "--name NAME is required"),
        (["export", run[0], "--name", "../up", *base], "Model name '../up'"),
        (["export", str(tmp_path / "missing"), "--name", "tiny", *base], "No run directory"),
        (["export", run[0], "--name", "tiny", "--version", "0", *base], "must be a positive"),
        (["export", run[0], "--name", "tiny", "--max-new-tokens", "0", *base], "max_new_tokens=0"),
        (["export", run[0], "--format", "hf"], "--format hf needs --out DIR"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not os.path.exists(tmp_path / "tiny")


# --- real exports (marked: each writes and loads a SavedModel) ----------------------------------


@pytest.fixture(scope="module")
def exported(tiny_run_export):
    """`(base_dir, path)`: conftest's one export of `run` (max_new_tokens 8), shared: read it only."""
    assert tiny_run_export[1].endswith(os.path.join("tiny", "1"))
    return tiny_run_export


@pytest.fixture(scope="module")
def loaded(exported):
    """The export loaded once (`tf.saved_model.load`), for the tests that only call its signatures."""
    import tensorflow_text  # noqa: F401  (registers tokenizer ops before loading)

    return tf.saved_model.load(exported[1])


def _tree_digest(path):
    digests = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as file:
                digests[os.path.relpath(full, path)] = hashlib.sha256(file.read()).hexdigest()
    return digests


@pytest.mark.export
def test_export_is_xla_free_and_uses_only_core_and_text_ops(exported):
    base_dir, path = exported
    assert path == os.path.join(base_dir, "tiny", "1")
    assert xla_findings(path) == []
    ops = operations(path)
    assert "While" in ops or "StatelessWhile" in ops  # the decode loop is in the graph
    assert not [op for op in ops if op.startswith("Xla") or op.startswith("_Xla")]


@pytest.mark.export
def test_jit_export_marks_only_the_decode_loop_for_xla_and_generates_the_same(run, loaded, tmp_path, capsys):
    assert main(["export", run[0], "--name", "tiny-jit", "--base-dir", str(tmp_path), "--jit",
                 "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    path = capsys.readouterr().out.strip().split(" to ")[-1]
    findings = xla_findings(path)
    assert findings and not [finding for finding in findings if finding.startswith("op ")]  # no Xla* op
    jit, default = tf.saved_model.load(path).signatures, loaded.signatures
    prompts = tf.constant(PROMPTS)
    assert _texts(jit["serving_default"](prompts=prompts)) == _texts(default["serving_default"](prompts=prompts))
    sampled = dict(prompts=prompts, max_new_tokens=tf.constant(4),
                   **SamplingOptions(temperature=0.9, top_k=5, seed=3).graph_tensors(),
                   stop=tf.constant([], tf.string), stop_token_ids=tf.constant([], tf.int32),
                   logprobs=tf.constant(-1))
    # XLA draws its categorical samples its own way: seeded, so repeatable, but not TF's tokens.
    assert _texts(jit["generate"](**sampled)) == _texts(jit["generate"](**sampled))
    greedy = dict(sampled, top_k=tf.constant(1))  # top_k 1: greedy
    assert _texts(jit["generate"](**greedy)) == _texts(default["generate"](**greedy))
    stopped = dict(greedy, stop=tf.constant(["e", "t "]), stop_token_ids=tf.constant([3], tf.int32))
    assert _texts(jit["generate"](**stopped)) == _texts(default["generate"](**stopped))
    # Its prefill and step draw under XLA too: a stream gives its own generate's sampled text.
    saved = SavedModelGenerator(path)
    options = dict(temperature=0.9, top_k=5, seed=3, num_return_sequences=2)
    streamed = _joined(saved.stream("the cat", 12, **options), rows=2)
    assert [text for text, _ in streamed] == saved.generate(["the cat"], 12, **options)


@pytest.mark.export
def test_second_export_makes_version_2_and_leaves_version_1_untouched(run, exported, tmp_path, capsys,
                                                                     monkeypatch):
    # What is checked is the versioning through the command line: the save itself is faked (real
    # saves: the shared export and the tests above).
    monkeypatch.setattr(tf.saved_model, "save", _fake_save())
    monkeypatch.setattr(export_module, "check_saved_signatures", _unchecked)
    monkeypatch.setattr(export_module, "xla_findings", lambda path: [])
    base_dir = str(tmp_path)  # a copy of the shared export's folder: this test adds a version
    shutil.copytree(os.path.dirname(exported[1]), os.path.join(base_dir, "tiny"))
    first = os.path.join(base_dir, "tiny", "1")
    before = _tree_digest(first)
    assert main(["export", run[0], "--name", "tiny", "--base-dir", base_dir]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join(base_dir, "tiny", "2"))
    assert _tree_digest(first) == before
    assert sorted(os.listdir(os.path.join(base_dir, "tiny"))) == ["1", "2"]  # no temp folder left
    assert main(["export", run[0], "--name", "tiny", "--base-dir", base_dir, "--version", "2"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.export
def test_loaded_signatures_match_in_process_and_refuse_bad_arguments(run, module, loaded):
    signatures = loaded.signatures
    assert set(signatures) == {"serving_default", "generate", "beam_search", "score", "prompt_logprobs",
                               "logits", "prefill", "step", "detokenize", "tokenize"} == {
        signature.name for signature in SIGNATURES}
    prompts = tf.constant(PROMPTS)
    assert _texts(signatures["serving_default"](prompts=prompts)) == _texts(
        module.serving_default(prompts)
    )
    texts = tf.constant(["the cat sat", TEXT])
    np.testing.assert_allclose(
        signatures["score"](texts=texts)["log_likelihood"], module.score(texts)["log_likelihood"],
        rtol=1e-5,
    )
    ids = tf.constant([[1, 2, 3, 4]], tf.int32)
    np.testing.assert_allclose(signatures["logits"](token_ids=ids)["logits"], run[1](ids), atol=1e-6)
    good = dict(
        prompts=tf.constant(["the"]), max_new_tokens=tf.constant(4),
        **SamplingOptions(temperature=1.0).graph_tensors(),
        stop=tf.constant([], tf.string), stop_token_ids=tf.constant([], tf.int32), logprobs=tf.constant(-1),
    )
    assert len(_texts(signatures["generate"](**good))) == 1
    bad = [
        ("prompts", tf.constant([], tf.string)), ("max_new_tokens", tf.constant(0)),
        ("max_new_tokens", tf.constant(MAX_NEW_TOKENS_LIMIT + 1)), ("top_p", tf.constant(0.0)),
        ("top_p", tf.constant(1.5)), ("top_k", tf.constant(-1)), ("temperature", tf.constant(0.0)),
        ("stop", tf.constant([""])), ("stop_token_ids", tf.constant([-1])),
        ("frequency_penalty", tf.constant(2.5)), ("repetition_penalty", tf.constant(0.0)),
        ("logprobs", tf.constant(6)), ("logprobs", tf.constant(-2)),
    ]
    for key, value in bad:
        with pytest.raises(tf.errors.InvalidArgumentError, match=key):
            signatures["generate"](**{**good, key: value})
    beams = dict(prompts=prompts, max_new_tokens=tf.constant(5), num_beams=tf.constant(3),
                 length_penalty=tf.constant(1.0), stop=tf.constant(["t"]), stop_token_ids=tf.constant([], tf.int32))
    loaded_beams, in_process = signatures["beam_search"](**beams), module.beam_search(**beams)
    assert loaded_beams["beam_text"].numpy().tolist() == in_process["beam_text"].numpy().tolist()


@pytest.mark.export
def test_a_loaded_exports_generate_and_beam_search_take_only_prompts_from_python(exported):
    import tensorflow_text  # noqa: F401  (registers tokenizer ops before loading)

    loaded = tf.saved_model.load(exported[1])
    signature_defs = read_signature_defs(exported[1])
    functions = export_module.signature_functions(exported[1], module=loaded)
    prompts = PROMPTS[:2]
    for name in ("generate", "beam_search"):
        # Every input but prompts is optional: its default is recorded, for REST and for these calls.
        defaults = {key: tf.make_ndarray(value) for key, value in signature_defs[name].defaults.items()}
        assert set(defaults) == set(signature_defs[name].inputs) - {"prompts"}
        expected = loaded.signatures[name](prompts=tf.constant(prompts), **defaults)
        # kgpt's functions, and without kgpt the loaded module's own functions of the same names.
        for outputs in (functions[name](prompts=prompts), getattr(loaded, name)(prompts=tf.constant(prompts))):
            assert set(outputs) == set(expected)
            for key, value in expected.items():
                assert outputs[key].numpy().tolist() == value.numpy().tolist(), (name, key)
    assert functions["beam_search"](prompts=prompts)["beam_text"].shape == [2, DEFAULT_BEAMS]
    stopped = functions["generate"](prompts=prompts, top_k=1, stop=["a"])
    assert _texts(stopped) == _texts(loaded.generate(prompts=tf.constant(prompts), top_k=tf.constant(1),
                                                     stop=tf.constant(["a"])))
    with pytest.raises(ValueError, match=r"got unknown \['prompt'\], missing \['prompts'\]"):
        functions["generate"](prompt=prompts)


@pytest.mark.export
def test_every_file_of_an_export_is_readable_by_other_users(exported):
    path = exported[1]  # exported with umask 022 (conftest's tiny_run_export)
    modes = {}
    for root, folders, files in os.walk(path):
        for name in folders + files:
            full = os.path.join(root, name)
            modes[os.path.relpath(full, path)] = stat.S_IMODE(os.stat(full).st_mode)
    modes["."] = stat.S_IMODE(os.stat(path).st_mode)
    assert "saved_model.pb" in modes and "variables" in modes
    wrong = {
        name: oct(mode) for name, mode in modes.items()
        if mode != (0o755 if os.path.isdir(os.path.join(path, name)) else 0o644)
    }
    assert wrong == {}


@pytest.mark.export
def test_signature_def_records_the_sampling_fields_and_their_defaults(exported):
    signature = read_signature_defs(exported[1])["generate"]
    fields = [field.name for field in dataclasses.fields(SamplingOptions)]
    assert set(signature.inputs) == {"prompts", "max_new_tokens", *fields, "stop", "stop_token_ids", "logprobs"}
    defaults = {key: tf.make_ndarray(value).tolist() for key, value in signature.defaults.items()}
    assert defaults == {
        "max_new_tokens": MAX_NEW_TOKENS, **sampling.signature_defaults(), "stop": [], "stop_token_ids": [],
        "logprobs": -1,
    }
    for name, dtype in sampling.signature_dtypes().items():
        assert signature.inputs[name].dtype == dtype.as_datatype_enum


@pytest.fixture(scope="module")
def context_16_exports(run, tmp_path_factory):
    """`{kind: (model, path)}`: a GPT (wide initialisation) and the GRU baseline, context 16, exported."""
    _, _, tokenizer = run
    base_dir = tmp_path_factory.mktemp("context_16")
    # Seed 2: a GRU whose continuations run past the context before an end-of-text.
    models = {"gpt": _spread_model(tokenizer), "gru": _recurrent_model(tokenizer, sequence_length=16, seed=2)}
    return {
        kind: (model, publish(ServingModule(model, tokenizer, max_new_tokens=8), base_dir / kind))
        for kind, model in models.items()
    }


@pytest.mark.export
@pytest.mark.parametrize("kind", ["gpt", "gru"])
def test_streams_from_an_export_and_in_process_give_generates_text_past_the_context(
    run, context_16_exports, kind
):
    _, _, tokenizer = run
    model, path = context_16_exports[kind]
    assert xla_findings(path) == []
    saved, in_process = SavedModelGenerator(path), Generator(model, tokenizer, jit_compile=False)
    count = 48  # 3x the context: the cache is rebuilt from the last 8 tokens every 8 tokens
    sampled = dict(temperature=1.0, top_k=8, seed=3, num_return_sequences=2)
    for prompt, options in [("the cat", {}), ("a", sampled), ("dog ran on the mat", {})]:
        rows = options.get("num_return_sequences", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the last prompt is left-truncated to 8 tokens, every way
            expected = saved.complete([prompt], count, **options)
            assert [c.text for c in expected] == in_process.generate([prompt], count, **options)
            for generator in (saved, in_process):
                pieces = list(generator.stream(prompt, count, **options))
                streamed = _joined(pieces, rows)
                assert [text for text, _ in streamed] == [c.text for c in expected], (prompt, generator)
                counts = [(last.token_count, last.prompt_token_count, last.finish_reason) for _, last in streamed]
                assert counts == [(c.token_count, c.prompt_token_count, c.finish_reason) for c in expected]
                # One piece per token step of a live row (end-of-text's, not counted, included).
                assert len(pieces) == sum(c.token_count + (c.finish_reason == "stop") for c in expected)
        assert max(c.token_count for c in expected) > 16, prompt  # past the context
    if kind == "gru":  # a model without a cache: its greedy batch from the export is generate's too
        expected = Generator(model, tokenizer).generate(PROMPTS, MAX_NEW_TOKENS)
        assert saved.generate(PROMPTS, MAX_NEW_TOKENS) == expected


@pytest.mark.export
def test_streaming_an_export_is_one_piece_per_token_and_stops_when_closed(exported):
    import tensorflow_text  # noqa: F401  (registers tokenizer ops before loading)

    loaded, calls = tf.saved_model.load(exported[1]), []

    class Recorded:  # a loaded signature whose calls are recorded
        def __init__(self, name):
            self.name, self.function = name, loaded.signatures[name]

        def __call__(self, **inputs):
            calls.append(self.name)
            return self.function(**inputs)

        def __getattr__(self, attribute):
            return getattr(self.function, attribute)

    class Module:  # the loaded SavedModel, its signatures recorded
        signatures = {name: Recorded(name) for name in loaded.signatures}

        def __getattr__(self, attribute):
            return getattr(loaded, attribute)

    saved = SavedModelGenerator(exported[1], module=Module())
    count = 20
    [completion] = saved.complete(["the cat"], count)
    assert (completion.token_count, completion.finish_reason) == (count, "length")
    calls.clear()
    pieces = list(saved.stream("the cat", count))
    # A character model: one piece per token (an unknown character's U+FFFD is held back by
    # `TextDeltas` as a partial one until the last piece); their text is generate's.
    assert len(pieces) == count
    assert "".join(piece.text for piece in pieces) == completion.text
    assert [piece.token_count for piece in pieces] == list(range(1, count + 1))
    assert [name for name in calls if name != "detokenize"] == ["prefill"] + ["step"] * (count - 1)
    calls.clear()
    stream = saved.stream("the cat", count)
    assert [next(stream).text for _ in range(3)] == [piece.text for piece in pieces[:3]]
    made = list(calls)
    assert [name for name in made if name != "detokenize"] == ["prefill", "step", "step"]
    stream.close()  # no step left running, none made after
    assert list(stream) == [] and calls == made
    # An export older than the streaming signatures: each continuation as one piece, with a warning.
    Module.signatures = {name: Recorded(name) for name in ("serving_default", "generate", "score", "logits")}
    older = SavedModelGenerator(exported[1], module=Module())
    with pytest.warns(UserWarning, match="no prefill and step signatures"):
        pieces = list(older.stream("the cat", count))
    assert [(p.text, p.token_count, p.finish_reason) for p in pieces] == [(completion.text, count, "length")]


@pytest.mark.export
def test_a_saved_model_generates_past_the_context_like_the_reference(run, context_16_exports):
    _, _, tokenizer = run
    model, path = context_16_exports["gpt"]
    assert xla_findings(path) == []
    prompts = ["the cat", "a"]
    expected = _expected_past_the_context(model, tokenizer, prompts, 64)  # 4x the context
    saved = SavedModelGenerator(path)
    assert saved.generate(prompts, 64) == expected
    stop = [expected[0][20:22]]
    assert saved.generate(prompts, 64, stop=stop) == [cut_at_stop(text, stop) for text in expected]


# Runs in a fresh interpreter: kgpt and keras-hub cannot be imported at all. TensorFlow (and
# tensorflow-text, through tf.keras) import Keras themselves when it is installed, so the check
# for Keras is that loading and running the SavedModel imports no Keras module of its own.
FRESH_PROCESS = """
import json, sys
for blocked in ("kgpt", "keras_hub"):
    sys.modules[blocked] = None  # any import of these fails
import tensorflow as tf
import tensorflow_text  # registers the tokenizer ops the graph uses
before = set(sys.modules)
module = tf.saved_model.load(sys.argv[1])
outputs = module.signatures["serving_default"](prompts=tf.constant(json.loads(sys.argv[2])))
texts = [t.decode("utf-8") for t in outputs["text"].numpy()]
new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("keras", "kgpt", "keras_hub"))
print(json.dumps({"texts": texts, "new_modules": new}))
"""


@pytest.mark.export
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_fresh_process_with_only_tensorflow_gives_the_in_process_greedy_text(
    kind, run, exported, tmp_path, write_run_directory
):
    if kind == "char":
        run_dir, path = run[0], exported[1]
    else:
        tokenizer = train_bpe([TEXT * 20, "a dog ran to the cat. " * 20], vocabulary_size=300)
        run_dir, _ = write_run_directory(tmp_path / "run", tokenizer, SEQUENCE_LENGTH)
        path = export(run_dir, "bpe", base_dir=str(tmp_path), max_new_tokens=MAX_NEW_TOKENS)
    # In-process kgpt generate: the run directory, XLA-compiled decode loop.
    generator = load_generator(run_dir)
    assert isinstance(generator, Generator) and generator.decoder.jit_compile
    expected = generator.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, path, json.dumps(PROMPTS)],
        capture_output=True, text=True, env=environment, cwd=str(tmp_path), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["new_modules"] == []
    assert answer["texts"] == expected
    # kgpt generate SAVED_MODEL_DIR runs the same graph in-process.
    saved = load_generator(os.path.dirname(path))
    assert isinstance(saved, SavedModelGenerator)
    assert saved.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS) == expected


@pytest.mark.export
def test_cli_generate_from_a_saved_model_and_its_errors(run, exported, capsys, monkeypatch):
    # Each command loads its model anew (the export: ~5-10 s a time on 2 cores, even for the
    # commands refused after the load); here they share one load per path.
    generators = {}

    def load_once(path, **kwargs):
        if path not in generators:
            generators[path] = load_generator(path, **kwargs)
        return generators[path]

    monkeypatch.setattr(generate_module, "load_generator", load_once)
    model_dir = os.path.join(exported[0], "tiny")
    assert main(["generate", model_dir, "--prompt", "the cat", "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)
    assert len(texts) == 1 and texts[0].startswith("the cat")
    # --beams runs the export's beam_search signature: the run directory's beams.
    beams = ["--prompt", "the cat", "--prompt", "a", "--beams", "3", "--num-return-sequences", "2",
             "--max-new-tokens", "5", "--json"]
    assert main(["generate", model_dir, *beams]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["generate", run[0], *beams]) == 0
    assert from_export == json.loads(capsys.readouterr().out) and len(from_export) == 4
    # Bytes that are not UTF-8 on the command line (kept by Python as lone surrogates) are U+FFFD for
    # both; the export refused them ("surrogates not allowed").
    broken = ["--prompt", "ROM\udcff\udcfeEO", "--max-new-tokens", "3", "--json"]
    assert main(["generate", model_dir, *broken]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["generate", run[0], *broken]) == 0
    assert from_export == json.loads(capsys.readouterr().out) and from_export[0].startswith("ROM\ufffd\ufffdEO")
    for bad in (
        ["--temperature", "inf"], ["--temperature", "0"], ["--top-p", "1.5", "--temperature", "1"], ["--top-k", "-1"],
        ["--beams", "0"], ["--beams", "2", "--max-new-tokens", str(SEQUENCE_LENGTH)],
        ["--beams", str(MAX_BEAMS + 1)], ["--max-new-tokens", "0"],
        ["--max-new-tokens", str(MAX_NEW_TOKENS_LIMIT + 1)], ["--stop", ""], ["--stop-token-id", "-1"],
    ):
        assert main(["generate", model_dir, "--prompt", "a", *bad]) == 2, bad
        error = capsys.readouterr().err
        assert error.startswith("kgpt generate: error:") and error.count("\n") == 1, error


def test_tokenize_gives_the_runs_ids_padded_and_detokenize_reads_them_back(run, module):
    _, _, tokenizer = run
    texts = ["the cat", "", TEXT, "a\u00e9"]  # U+00E9 is no character of the run: the unknown id
    outputs = module.tokenize(tf.constant(texts))
    expected = [row.tolist() for row in tokenizer.encode_documents(texts)]
    counts = outputs["token_count"].numpy().tolist()
    assert counts == [len(row) for row in expected] == [7, 0, len(TEXT), 2]
    ids = outputs["token_ids"].numpy()
    assert ids.shape == (4, len(TEXT))
    assert [row[:count].tolist() for row, count in zip(ids, counts)] == expected
    assert all(not row[count:].any() for row, count in zip(ids, counts))  # padded with 0
    assert _texts(module.detokenize(outputs["token_ids"], outputs["token_count"]))[:3] == texts[:3]
    assert module.tokenizer_kind.numpy() == b"char"


@pytest.mark.export
def test_an_export_declares_tokenize_and_records_its_tokenizer_kind(run, loaded, exported):
    signature = read_signature_defs(exported[1])["tokenize"]
    assert list(signature.inputs) == ["prompts"]
    assert sorted(signature.outputs) == ["token_count", "token_ids"]
    assert [d.size for d in signature.outputs["token_ids"].tensor_shape.dim] == [-1, -1]
    texts = tf.constant(["the cat", "", TEXT])
    outputs = loaded.signatures["tokenize"](prompts=texts)
    counts = outputs["token_count"].numpy().tolist()
    assert [row[:count].tolist() for row, count in zip(outputs["token_ids"].numpy(), counts)] == [
        row.tolist() for row in run[2].encode_documents(texts.numpy().astype(str).tolist())]
    assert loaded.tokenizer_kind.numpy() == b"char"
    generator = SavedModelGenerator(exported[1], module=loaded)
    assert (generator.tokenizer_kind, generator.end_of_text) == ("char", "<|endoftext|>")
    assert generator.detokenize(generator.tokenize(["the cat", "", TEXT])) == ["the cat", "", TEXT]
    with pytest.raises(ValueError, match="tokens\\[0\\]=-1 is not a token id"):
        generator.detokenize([[-1]])


@pytest.mark.export
def test_an_exports_penalties_and_logprobs_equal_in_process_whole_and_streamed(run, exported):
    _, model, tokenizer = run
    saved, in_process = SavedModelGenerator(exported[1]), Generator(model, tokenizer, jit_compile=False)
    # 40 new tokens on a context of 32: the counts go on past it.
    for options in (dict(frequency_penalty=1.0, repetition_penalty=1.3),
                    dict(temperature=1.0, seed=3, presence_penalty=2.0, num_return_sequences=2)):
        expected = in_process.complete(["the cat", "a"], 40, logprobs=2, **options)
        answers = saved.complete(["the cat", "a"], 40, logprobs=2, **options)
        for answer, completion in zip(answers, expected):
            assert answer.text == completion.text
            assert [t.token_id for t in answer.logprobs] == [t.token_id for t in completion.logprobs]
            np.testing.assert_allclose([t.logprob for t in answer.logprobs],
                                       [t.logprob for t in completion.logprobs], atol=1e-5)
        rows = options.get("num_return_sequences", 1)
        streamed = [[] for _ in range(rows)]
        for piece in saved.stream("the cat", 40, logprobs=2, **options):
            streamed[piece.index] += piece.logprobs
        assert [[t.token_id for t in row] for row in streamed] == [
            [t.token_id for t in completion.logprobs] for completion in answers[:rows]]
    scored, expected = saved.prompt_logprobs(["the cat", ""], 3), in_process.prompt_logprobs(["the cat", ""], 3)
    assert [[t.token_id for t in row] for row in scored] == [[t.token_id for t in row] for row in expected]
    assert scored[0][0].logprob is None and len(scored[0][1].top) == 3
    np.testing.assert_allclose([t.logprob for t in scored[0][1:]], [t.logprob for t in expected[0][1:]],
                               atol=1e-5)
