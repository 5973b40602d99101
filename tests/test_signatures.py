"""The serving contract: what it derives for batching, the defaults an export records, the check of
a serving function against it, and that the serving modules spell no signature or output name."""

import ast
import dataclasses
import pathlib

import pytest
import tensorflow as tf

from kgpt.generation.sampling import SamplingOptions, option
from kgpt.serving import signatures
from kgpt.serving.signatures import (
    BEAM_SEARCH,
    GENERATE,
    SERVING_DEFAULT,
    SIGNATURES,
    Name,
    Role,
    check_outputs,
    generate_signature,
    read_signature_defs,
)

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kgpt"
# The modules that call or serve signatures: they read names from the contract.
SERVING_MODULES = ("serving/export", "serving/saved_model_generator", "serving/batching", "serving/rest",
                   "serving/model_server", "serving/server", "serving/openai_api", "serving/tokenization")


def test_what_batching_reads_is_derived_from_the_declarations():
    assert signatures.PADDED_OUTPUTS == {
        name: "token_count" for name in ("token_ids", "token_logprobs", "top_token_ids", "top_logprobs")}
    assert signatures.REQUEST_LISTS == {"stop", "stop_token_ids"}
    assert signatures.REQUEST_WIDTH_OUTPUTS == {"beam_text", "beam_token_count", "beam_stopped"}
    whole = [s for s in SIGNATURES if s.name not in ("step", "detokenize")]
    for signature in whole:  # one input of rows each, first
        assert [spec.role for spec in signature.inputs][:1] == [Role.ROWS]
        assert sum(spec.role is Role.ROWS for spec in signature.inputs) == 1
    assert [s.name for s in SIGNATURES] == ["serving_default", "generate", "beam_search", "score",
                                            "prompt_logprobs", "logits", "prefill", "step", "detokenize",
                                            "tokenize"]
    # `tokenize`: rows of prompts; ids padded as generate's are, so batched requests split back.
    assert [(s.name, s.role) for s in signatures.TOKENIZE.inputs] == [("prompts", Role.ROWS)]
    assert [(o.name, o.count) for o in signatures.TOKENIZE.outputs] == [("token_ids", "token_count"),
                                                                       ("token_count", None)]
    # `step` takes back what `prefill` and `step` return; its sampling options equal `generate`'s.
    assert signatures.STEP_STATE == ("token", "cache", "position", "offset", "recent", "counts", "seen")
    logprobs = ["token_logprobs", "top_token_ids", "top_logprobs"]
    assert [o.name for o in signatures.PREFILL.outputs][:10] == list(signatures.STEP_STATE) + logprobs
    assert [o.name for o in signatures.STEP.outputs] == list(signatures.STEP_STATE) + logprobs
    options = [i.name for i in GENERATE.inputs if i.role is Role.OPTION and i.name != "max_new_tokens"]
    assert [i.name for i in signatures.STEP.inputs if i.role is Role.OPTION] == options


def test_defaults_take_what_each_export_sets():
    defaults = GENERATE.defaults(max_new_tokens=64)
    assert defaults == {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0,
                        "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                        "stop": (), "stop_token_ids": (), "logprobs": -1}
    assert BEAM_SEARCH.defaults(max_new_tokens=8)[Name.NUM_BEAMS] == signatures.DEFAULT_BEAMS
    assert SERVING_DEFAULT.defaults() == {}
    with pytest.raises(ValueError, match="generate signature needs the export's max_new_tokens"):
        GENERATE.defaults()


def test_generate_has_an_input_per_sampling_field():
    @dataclasses.dataclass(frozen=True)
    class Options(SamplingOptions):
        min_p: float = option(0.0, "float32", "keep tokens at least this likely", minimum=0)

    signature = generate_signature(Options)
    names = [spec.name for spec in signature.inputs]
    assert names == ["prompts", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "frequency_penalty",
                     "presence_penalty", "repetition_penalty", "min_p", "stop", "stop_token_ids", "logprobs"]
    assert signature.input("min_p").dtype == "float32" and signature.input("min_p").default == 0.0
    assert signature.outputs == GENERATE.outputs


def test_outputs_that_drift_from_the_contract_are_refused():
    def outputs(**changes):
        values = {"text": tf.constant([""]), "token_ids": tf.zeros([1, 0], tf.int32),
                  "token_count": tf.zeros([1], tf.int32), "prompt_token_count": tf.zeros([1], tf.int32),
                  "truncated": tf.zeros([1], tf.bool), "stopped": tf.zeros([1], tf.bool)}
        values.update(changes)
        return {k: v for k, v in values.items() if v is not None}

    check_outputs(SERVING_DEFAULT, outputs())
    with pytest.raises(ValueError, match=r"returns .* but kgpt.serving.signatures declares"):
        check_outputs(SERVING_DEFAULT, outputs(stopped=None))
    with pytest.raises(ValueError, match="output 'token_count' is int64"):
        check_outputs(SERVING_DEFAULT, outputs(token_count=tf.zeros([1], tf.int64)))


def test_read_signature_defs_lists_what_tf_serving_serves(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda prompts: {"text": prompts},
                           input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
    module.table = tf.lookup.StaticHashTable(  # gives the SavedModel an __saved_model_init_op
        tf.lookup.KeyValueTensorInitializer(["a"], [1]), default_value=0)
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.f})
    defs = read_signature_defs(str(tmp_path))
    assert list(defs) == ["serving_default"]
    assert list(defs["serving_default"].outputs) == ["text"]


def _names():
    return {s.name for s in SIGNATURES} | {o.name for s in SIGNATURES for o in s.outputs}


@pytest.mark.parametrize("module", SERVING_MODULES)
def test_serving_modules_spell_no_signature_or_output_name(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    spelled = sorted({
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _names()
    })
    assert spelled == [], f"kgpt/{module}.py spells {spelled}; use kgpt.serving.signatures' Name and signatures"
