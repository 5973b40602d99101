"""SavedModels for TensorFlow Serving: string in, string out, tokenizer and decode loop in the graph.

`export(run_dir, name)` publishes `saved_models/NAME/VERSION/` with the signatures `SIGNATURES`
(`serving_default`, `generate`, `beam_search`, `score`, `logits`, and for streaming token by token
`prefill`, `step` and `detokenize`; see the README), needing no XLA (`xla_findings`). This module
also owns TF Serving's folder layout, which `kgpt.generate` and `kgpt.serve` read.
"""

import errno
import inspect
import os
import re

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from kgpt.decoding import (
    MAX_NEW_TOKENS,
    DecodeState,
    beam_search,
    cache_length,
    cache_shape_invariants,
    cached,
    check_options,
    decode,
    default_max_new_tokens,
    default_window,
    prefill,
    sample_at,
    step,
)
from kgpt.files import remove_stale, staged_directory
from kgpt.rundir import RunDirectory
from kgpt.sampling import SamplingOptions, graph_checks, signature_defaults, signature_dtypes
from kgpt.stopping import cut_at_stop_tensor, graph_stop_checks, graph_stop_ids

DEFAULT_BASE_DIR = "saved_models"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Concurrent exports of one model each take the next free version; give up after this many.
_PUBLISH_ATTEMPTS = 100
# Outputs padded along axis 1 to the longest row of a call: {output: its per-row count}. A batching
# server cuts each request's part back to its own longest row.
PADDED_OUTPUTS = {"token_ids": "token_count"}
# Inputs of shape [n] that hold one list for the whole request, not one value per prompt.
REQUEST_LISTS = ("stop", "stop_token_ids")
# Outputs of shape [batch, n] whose n is set by a request's scalar inputs, so equal within a batch.
REQUEST_WIDTH_OUTPUTS = ("beam_text", "beam_token_count", "beam_stopped")
SIGNATURES = (
    "serving_default", "generate", "beam_search", "score", "logits", "prefill", "step", "detokenize",
)
# The outputs of `prefill` and `step` that the next `step` takes as its inputs of the same names:
# the token to feed and the `kgpt.decoding.DecodeState`, its cache packed (`pack_cache`).
STEP_STATE = ("token", "cache", "position", "offset", "recent")
# `beam_search`: beams per prompt when the request gives none, and at most.
DEFAULT_BEAMS = 4
MAX_BEAMS = 16
_TAKEN = "{} already exists; versions are never overwritten. Leave --version out to write the next one."


def version_numbers(model_dir):
    """The numbered version folders of `saved_models/NAME`, ascending (none if absent)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir) if name.isdigit())


def saved_model_version_path(path):
    """`path` if it holds `saved_model.pb`, else its highest version folder (FileNotFoundError: neither)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [
        v for v in version_numbers(path)
        if os.path.isfile(os.path.join(path, str(v), "saved_model.pb"))
    ]
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel in {path}: expected saved_model.pb or numbered version folders "
            "written by 'kgpt export'."
        )
    return os.path.join(path, str(max(versions)))


def is_saved_model(path):
    """True if `path` is a SavedModel folder or a TF Serving model folder of versions."""
    try:
        saved_model_version_path(path)
        return True
    except FileNotFoundError:
        return False


def _checked(checks, structure):
    """`structure`'s tensors, computed only once the assertion ops `checks` have passed."""
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, structure)


def _function(python_function, *input_signature):
    """A serving function: a `tf.function` of this signature, without XLA."""
    return tf.function(python_function, input_signature=list(input_signature), jit_compile=False)


def _function_with_defaults(python_function, leading, defaults, stops=True):
    """A serving function of `(*leading, *defaults, stop, stop_token_ids)`: the inputs of the
    `leading` specs, scalars with recorded `defaults` (`{name: tensor}`, in order), then (with
    `stops`) the two stop lists (default: none)."""
    if stops:
        stop_lists = {"stop": tf.constant([], tf.string), "stop_token_ids": tf.constant([], tf.int32)}
        defaults = {**defaults, **stop_lists}

    def function(*inputs):
        return python_function(*inputs)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    function.__signature__ = inspect.Signature([inspect.Parameter(spec.name, kind) for spec in leading] + [
        inspect.Parameter(name, kind, default=default) for name, default in defaults.items()
    ])
    specs = [
        tf.TensorSpec([None] if name in REQUEST_LISTS else [], default.dtype, name=name)
        for name, default in defaults.items()
    ]
    return _function(function, *leading, *specs)


def pack_cache(cache):
    """A decoding cache as one tensor (an input and output of the streaming signatures): its tensors
    stacked on axis 1, for a GPT `(batch, 2 * num_layers, heads, length, head_dim)` (layer i's keys
    at 2i, values at 2i + 1); a cache of one tensor (the int32 tokens `(batch, length)` of a model
    decoded by recomputation) as it is."""
    flat = tf.nest.flatten(cache)
    return flat[0] if len(flat) == 1 else tf.stack(flat, axis=1)


def _cache_structure(model):
    with tf.init_scope():  # eagerly: nothing added to a graph being traced
        return model.initial_cache(1, 1)


def unpack_cache(model, packed):
    """The inverse of `pack_cache` for the cache structure of `model` (`kgpt.decoding.cached`)."""
    structure = _cache_structure(model)
    count = len(tf.nest.flatten(structure))
    return tf.nest.pack_sequence_as(structure, [packed] if count == 1 else tf.unstack(packed, count, axis=1))


def packed_cache_spec(model, name="cache"):
    """The `tf.TensorSpec` of `pack_cache` of `model`'s caches: any batch and length."""
    structure = _cache_structure(model)
    flat = tf.nest.flatten(structure)
    shape = tf.nest.flatten(cache_shape_invariants(structure))[0]
    if len(flat) > 1:
        shape = shape[:1].concatenate([len(flat)]).concatenate(shape[1:])
    return tf.TensorSpec(shape, flat[0].dtype, name=name)


def _take_last(dense, lengths, room):
    """Keeps each row's last `min(length, room)` tokens, moved to the left; returns them + lengths."""
    kept = tf.minimum(lengths, room)
    width = tf.maximum(tf.reduce_max(kept), 1)
    dense = tf.pad(dense, [[0, 0], [0, 1]])  # at least one column, even for empty rows
    positions = (lengths - kept)[:, None] + tf.range(width)[None, :]
    valid = tf.range(width)[None, :] < kept[:, None]
    positions = tf.where(valid, positions, 0)
    return tf.where(valid, tf.gather(dense, positions, batch_dims=1), 0), kept


class ServingModule(tf.Module):
    """The exported object: model variables, tokenizer and the serving functions (`SIGNATURES`).

    `generate` decodes a whole continuation in one call (`kgpt.decoding.decode`); `prefill` and
    `step` run the same `kgpt.decoding.prefill` and `step` one call per token, the state (cache
    included) going out and back in as tensors, so a client streams token by token and may stop
    at any token; `detokenize` turns the tokens into text with the export's own tokenizer.

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a cache (decoded by recomputation).
        tokenizer: a graph-compatible kgpt tokenizer (`bpe`, `gpt2`, `char`, `tiktoken:gpt2`).
        max_new_tokens: new tokens per prompt for `serving_default`, and the `generate` default.
        sampling_type: the options class whose fields become `generate`'s (and `prefill`'s and
            `step`'s) scalar inputs.
        jit_compile: mark the decode loop for XLA (`kgpt export --jit`), and `step` and `prefill`'s
            first draw, so that streams draw as `generate` does; the tokenizer, the prefill and the
            rest stay TensorFlow ops. Only servers that run XLA can serve such a graph.

    Example:
        module = ServingModule(model, tokenizer)
        outputs = module.prefill(prompts=tf.constant(["ROMEO:"]), max_new_tokens=tf.constant(40))
        outputs = module.step(**{key: outputs[key] for key in STEP_STATE})  # the next token, state
    """

    def __init__(self, model, tokenizer, max_new_tokens=None, sampling_type=SamplingOptions,
                 jit_compile=False):
        super().__init__(name="kgpt")
        config = model.model_config
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(config.sequence_length)
        check_options(max_new_tokens, config.sequence_length)
        self.model = model
        self.tokenizer = tokenizer
        self._decoding_model = cached(model)
        self._sampling_type = sampling_type
        self._sequence_length = config.sequence_length
        self._vocabulary_size = config.vocabulary_size
        self._max_new_tokens = max_new_tokens
        self.jit_compile = jit_compile
        self._window = default_window(config.sequence_length)
        readable = dict(sequence_length=config.sequence_length, vocabulary_size=config.vocabulary_size,
                        end_of_text_id=tokenizer.end_of_text_id, default_max_new_tokens=max_new_tokens)
        for name, value in readable.items():  # readable after loading, without kgpt
            setattr(self, name, tf.Variable(value, trainable=False, name=name))

        prompts = tf.TensorSpec([None], tf.string, name="prompts")
        self.serving_default = _function(self._greedy, prompts)
        self.generate = self._generate_function(prompts, max_new_tokens)
        self.score = _function(self._score, tf.TensorSpec([None], tf.string, name="texts"))
        self.logits = _function(self._logits, tf.TensorSpec([None, None], tf.int32, name="token_ids"))
        self.beam_search = self._beam_search_function(prompts, max_new_tokens)
        self.prefill = self._prefill_function(prompts, max_new_tokens)
        self.step = self._step_function()
        self.detokenize = _function(
            self._detokenize, tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None], tf.int32, name="token_count"),
        )

    def signatures(self):
        """The `signatures` argument of `tf.saved_model.save`."""
        return {name: getattr(self, name) for name in SIGNATURES}

    def _greedy(self, prompts):
        return self._run(prompts, self._max_new_tokens, SamplingOptions().graph_inputs())

    def _sampling_defaults(self):
        """`{field: scalar tensor}`: the sampling inputs' recorded defaults, in field order."""
        dtypes = signature_dtypes(self._sampling_type)
        return {
            name: tf.constant(value, dtypes[name])
            for name, value in signature_defaults(self._sampling_type).items()
        }

    def _checked_sampling(self, options):
        """`{field: tensor}` of the sampling inputs (in field order), once their bounds are checked."""
        options = dict(zip(signature_dtypes(self._sampling_type), options))
        return _checked(graph_checks(options, self._sampling_type), options)

    def _generate_function(self, prompts, default_max_new_tokens):
        """`generate(prompts, max_new_tokens, *options, stop, stop_token_ids)`, defaults recorded."""
        defaults = {"max_new_tokens": tf.constant(default_max_new_tokens, tf.int32),
                    **self._sampling_defaults()}

        def generate(prompts, max_new_tokens, *options):
            options, (stop, stop_token_ids) = self._checked_sampling(options[:-2]), options[-2:]
            stop, stop_token_ids = _checked(
                graph_stop_checks(stop, stop_token_ids, self._vocabulary_size), (stop, stop_token_ids)
            )
            return self._run(prompts, max_new_tokens, options, stop, stop_token_ids)

        return _function_with_defaults(generate, [prompts], defaults)

    def _prefill_function(self, prompts, default_max_new_tokens):
        """`prefill(prompts, max_new_tokens, *options)`: the first token and the state `step` takes."""
        defaults = {"max_new_tokens": tf.constant(default_max_new_tokens, tf.int32),
                    **self._sampling_defaults()}

        def prefill_prompts(prompts, max_new_tokens, *options):
            return self._prefill(prompts, max_new_tokens, self._checked_sampling(options))

        return _function_with_defaults(prefill_prompts, [prompts], defaults, stops=False)

    def _step_function(self):
        """`step(token, cache, position, offset, recent, *options)`: the next token and state."""
        leading = [
            tf.TensorSpec([None], tf.int32, name="token"),
            packed_cache_spec(self._decoding_model),
            tf.TensorSpec([], tf.int32, name="position"),
            tf.TensorSpec([], tf.int32, name="offset"),
            tf.TensorSpec([None, None], tf.int32, name="recent"),
        ]

        def step_state(token, cache, position, offset, recent, *options):
            return self._step(token, cache, position, offset, recent, self._checked_sampling(options))

        return _function_with_defaults(step_state, leading, self._sampling_defaults(), stops=False)

    def _beam_search_function(self, prompts, default_max_new_tokens):
        """`beam_search(prompts, max_new_tokens, num_beams, length_penalty, stop, stop_token_ids)`."""
        defaults = {
            "max_new_tokens": tf.constant(min(default_max_new_tokens, self._sequence_length - 1), tf.int32),
            "num_beams": tf.constant(DEFAULT_BEAMS, tf.int32),
            "length_penalty": tf.constant(1.0, tf.float32),
        }
        return _function_with_defaults(self._beam_search, [prompts], defaults)

    def _run(self, prompts, max_new_tokens, sampling, stop=None, stop_token_ids=None):
        max_new_tokens = tf.convert_to_tensor(max_new_tokens, tf.int32)
        max_new_tokens = _checked(self._length_checks(prompts, max_new_tokens), max_new_tokens)
        stop = tf.constant([], tf.string) if stop is None else stop
        stop_token_ids = tf.constant([], tf.int32) if stop_token_ids is None else stop_token_ids
        dense, lengths, truncated = self._prompt_ids(prompts, self._prompt_room(max_new_tokens))
        stop_ids = graph_stop_ids(self.tokenizer, stop, stop_token_ids)
        end = self.tokenizer.end_of_text_id
        tokens, ends = self._decode(dense, lengths, max_new_tokens, end, sampling, stop_ids)
        outputs = self._continuations(tokens, ends, lengths, max_new_tokens, stop, stop_token_ids)
        return {**outputs, "prompt_token_count": lengths, "truncated": truncated}

    def _prefill(self, prompts, max_new_tokens, sampling):
        """`kgpt.decoding.prefill` of prompts of one token count (after `generate`'s truncation) and
        the first new token: `STEP_STATE`, `prompt_token_count` and `truncated`."""
        max_new_tokens = tf.convert_to_tensor(max_new_tokens, tf.int32)
        max_new_tokens = _checked(self._length_checks(prompts, max_new_tokens), max_new_tokens)
        dense, lengths, truncated = self._prompt_ids(prompts, self._prompt_room(max_new_tokens))
        length = tf.shape(dense)[1]
        dense = _checked([tf.debugging.assert_equal(
            lengths, length, message="prefill takes prompts of one token count (after truncation): stream "
            "one prompt, repeated for several samples",
        )], dense)
        # The cache `generate` makes: prompt + new tokens, at most the context.
        max_length = tf.minimum(length + max_new_tokens, self._sequence_length)
        logits, state = prefill(self._decoding_model, dense, max_length, self._window)
        token = self._compiled(sample_at)(logits, sampling, state.position)
        return {**self._step_outputs(token, state), "prompt_token_count": lengths, "truncated": truncated}

    def _step(self, token, cache, position, offset, recent, sampling):
        """`kgpt.decoding.step` on the state `prefill` or the last `step` returned: `STEP_STATE`."""
        state = DecodeState(unpack_cache(self._decoding_model, cache), position, offset, recent)
        vocabulary = self._vocabulary_size
        token = _checked([
            tf.debugging.assert_non_negative(token, message="token ids must be >= 0"),
            tf.debugging.assert_less(
                token, vocabulary, message=f"token ids must be < vocabulary_size={vocabulary}"
            ),
            tf.debugging.assert_equal(
                tf.shape(recent), tf.stack([tf.shape(token)[0], self._window]),
                message=f"recent must be (batch, {self._window}), as prefill and step return it",
            ),
            tf.debugging.assert_less_equal(
                position - offset, cache_length(state.cache),
                message="position and offset do not fit the cache; pass them as prefill and step return them",
            ),
        ], token)
        token, state = self._compiled(
            lambda state, token, sampling: step(self._decoding_model, state, token, sampling)
        )(state, token, sampling)
        return self._step_outputs(token, state)

    @staticmethod
    def _step_outputs(token, state):
        return {"token": token, "cache": pack_cache(state.cache), "position": state.position,
                "offset": state.offset, "recent": state.recent}

    def _compiled(self, function):
        """`function`, as a call XLA must compile with `jit_compile` (the draws where `generate`'s are)."""
        return tf.function(function, jit_compile=True) if self.jit_compile else function

    def _detokenize(self, token_ids, token_count):
        """The text of each row's first `token_count` ids (end-of-text detokenizes as the tokenizer does)."""
        valid = tf.range(tf.shape(token_ids)[1])[None, :] < token_count[:, None]
        token_ids = _checked([
            tf.debugging.assert_non_negative(token_count, message="token_count must be >= 0"),
            tf.debugging.assert_less_equal(
                token_count, tf.shape(token_ids)[1], message="token_count must be <= the width of token_ids",
            ),
            tf.debugging.assert_non_negative(token_ids, message="token ids must be >= 0"),
            tf.debugging.assert_less(
                tf.where(valid, token_ids, 0), self._vocabulary_size,
                message=f"token ids must be < vocabulary_size={self._vocabulary_size}",
            ),
        ], token_ids)
        ragged = tf.RaggedTensor.from_tensor(token_ids, lengths=token_count)
        return {"text": self.tokenizer.detokenize(ragged)}

    def _prompt_room(self, max_new_tokens):
        """Prompt tokens kept: what leaves room for max_new_tokens, and at least the window that
        generation past the context keeps (`kgpt.decoding.prompt_room`)."""
        return tf.maximum(self._sequence_length - max_new_tokens, self._window)

    def _length_checks(self, prompts, max_new_tokens):
        return [
            tf.debugging.assert_positive(tf.size(prompts), message="prompts is empty; send a prompt"),
            tf.debugging.assert_greater(max_new_tokens, 0, message="max_new_tokens must be >= 1"),
            tf.debugging.assert_less_equal(
                max_new_tokens, MAX_NEW_TOKENS, message=f"max_new_tokens must be <= {MAX_NEW_TOKENS}",
            ),
        ]

    def _prompt_ids(self, prompts, room):
        """Right-padded prompt ids, each prompt's last `room` tokens (an empty one: end-of-text);
        returns `(ids, lengths, truncated)`."""
        end = self.tokenizer.end_of_text_id
        ids = self.tokenizer.tokenize(prompts)  # ragged (batch, None)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        truncated = lengths > room
        # An empty prompt starts from end-of-text, as GPT-2 does.
        empty = tf.equal(lengths, 0)
        dense, lengths = _take_last(ids.to_tensor(default_value=0), lengths, room)
        dense = tf.where(empty[:, None] & tf.equal(tf.range(tf.shape(dense)[1]), 0), end, dense)
        return dense, tf.where(empty, 1, lengths), truncated

    def _continuations(self, tokens, ends, lengths, max_new_tokens, stop, stop_token_ids):
        """`text`, `token_ids` (padded), `token_count` and `stopped` of rows `tokens[lengths:ends]`,
        without the end-of-text or stop token id that stopped a row, text cut before a stop string."""
        tokenizer = self.tokenizer
        last = tf.gather(tokens, tf.maximum(ends - 1, 0), batch_dims=1)
        enders = tf.concat([[tokenizer.end_of_text_id], stop_token_ids], 0)
        stopped = tf.reduce_any(tf.equal(last[:, None], enders[None, :]), axis=1)
        counts = tf.maximum(ends - lengths - tf.cast(stopped, tf.int32), 0)
        width = tf.reduce_max(counts)
        positions = lengths[:, None] + tf.range(width)[None, :]
        valid = tf.range(width)[None, :] < counts[:, None]
        new = tf.gather(tokens, tf.where(valid, positions, 0), batch_dims=1)
        new = tf.where(valid, new, tokenizer.padding_id)
        text = tokenizer.detokenize(tf.RaggedTensor.from_tensor(new, lengths=counts))
        kept = cut_at_stop_tensor(text, stop)
        # Ended by end-of-text or a stop (a stop id, a stop string's tokens, or its text), not by length.
        cut = tf.strings.length(kept) < tf.strings.length(text)
        stopped = stopped | (ends - lengths < max_new_tokens) | cut
        return {"text": kept, "token_ids": new, "token_count": counts, "stopped": stopped}

    def _beam_search(self, prompts, max_new_tokens, num_beams, length_penalty, stop, stop_token_ids):
        """Every prompt's `num_beams` best continuations by beam search (`kgpt.decoding.beam_search`,
        as `Decoder` runs it in-process), within the context; the best one as `generate`'s outputs."""
        checks = self._length_checks(prompts, max_new_tokens) + [
            tf.debugging.assert_less(
                max_new_tokens, self._sequence_length,
                message=f"max_new_tokens must be < the context of {self._sequence_length}: beam search "
                "stays within it (generate continues past it)",
            ),
            tf.debugging.assert_greater(num_beams, 0, message="num_beams must be >= 1"),
            tf.debugging.assert_less_equal(
                num_beams, MAX_BEAMS, message=f"num_beams must be <= {MAX_BEAMS}",
            ),
            tf.debugging.assert_all_finite(length_penalty, message="length_penalty must be a finite number"),
        ] + graph_stop_checks(stop, stop_token_ids, self._vocabulary_size)
        max_new_tokens, num_beams, length_penalty, stop, stop_token_ids = _checked(
            checks, (max_new_tokens, num_beams, length_penalty, stop, stop_token_ids)
        )
        dense, lengths, truncated = self._prompt_ids(prompts, self._sequence_length - max_new_tokens)
        stop_ids = graph_stop_ids(self.tokenizer, stop, stop_token_ids)
        tokens, ends, _ = beam_search(
            self._decoding_model, dense, lengths, max_new_tokens, num_beams,
            self.tokenizer.end_of_text_id, length_penalty, stop_ids,
        )
        batch_size = tf.shape(tokens)[0]
        flat = self._continuations(
            tf.reshape(tokens, [batch_size * num_beams, -1]), tf.reshape(ends, [-1]),
            tf.repeat(lengths, num_beams), max_new_tokens, stop, stop_token_ids,
        )
        beams = {
            key: tf.reshape(value, tf.concat([[batch_size, num_beams], tf.shape(value)[1:]], 0))
            for key, value in flat.items()
        }
        count = beams["token_count"][:, 0]
        return {
            "text": beams["text"][:, 0],
            "token_ids": beams["token_ids"][:, 0, : tf.reduce_max(count)],
            "token_count": count,
            "prompt_token_count": lengths,
            "truncated": truncated,
            "beam_text": beams["text"],
            "beam_token_count": beams["token_count"],
            "stopped": beams["stopped"][:, 0],
            "beam_stopped": beams["stopped"],
        }

    def _decode(self, *args):
        """`decoding.decode` on the cached model; with `jit_compile`, a call XLA must compile."""

        def function(*inputs):
            return decode(self._decoding_model, *inputs, self._sequence_length, self._window)

        if self.jit_compile:
            function = tf.function(function, jit_compile=True)
        return function(*args)

    def _score(self, texts):
        tokenizer = self.tokenizer
        ids = tokenizer.tokenize(texts)
        start = tf.fill([tf.shape(texts)[0], 1], tokenizer.end_of_text_id)
        ids = tf.concat([tf.RaggedTensor.from_tensor(start), ids], axis=1)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        lengths = _checked([
            tf.debugging.assert_positive(tf.size(texts), message="texts is empty: send at least one text"),
            tf.debugging.assert_greater(lengths, 1, message="empty text: every text needs a token"),
        ], lengths)
        dense, lengths = _take_last(ids.to_tensor(default_value=0), lengths, self._sequence_length + 1)
        inputs, targets = dense[:, :-1], dense[:, 1:]
        log_probabilities = tf.nn.log_softmax(tf.cast(self.model(inputs), tf.float32))
        picked = tf.gather(log_probabilities, targets, batch_dims=2)  # (batch, length)
        counts = lengths - 1
        mask = tf.range(tf.shape(targets)[1])[None, :] < counts[:, None]
        log_likelihood = tf.reduce_sum(tf.where(mask, picked, 0.0), axis=1)
        return {
            "log_likelihood": log_likelihood,
            "token_count": counts,
            "perplexity": tf.exp(-log_likelihood / tf.cast(counts, tf.float32)),
        }

    def _logits(self, token_ids):
        length = tf.shape(token_ids)[1]
        token_ids = _checked([
            tf.debugging.assert_positive(length, message="token_ids needs at least one token"),
            tf.debugging.assert_less_equal(
                length, self._sequence_length,
                message=f"token_ids is longer than the context of {self._sequence_length}",
            ),
            tf.debugging.assert_non_negative(token_ids, message="token ids must be >= 0"),
            tf.debugging.assert_less(
                token_ids, self._vocabulary_size,
                message=f"token ids must be < vocabulary_size={self._vocabulary_size}",
            ),
        ], token_ids)
        return {"logits": tf.cast(self.model(token_ids), tf.float32)}


def _read_saved_model(saved_model_dir):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as file:
        proto.ParseFromString(file.read())
    return proto


def _graphs(saved_model_dir):
    """`(name, attributes, nodes)` of every graph of `saved_model.pb` and of every library function."""
    for meta_graph in _read_saved_model(saved_model_dir).meta_graphs:
        yield "graph", {}, meta_graph.graph_def.node
        for function in meta_graph.graph_def.library.function:
            yield function.signature.name, function.attr, function.node_def


def xla_findings(saved_model_dir):
    """Returns what in `saved_model.pb` would need XLA: `Xla*` ops and must-compile functions."""
    findings = []
    for where, attributes, nodes in _graphs(saved_model_dir):
        for key in ("_XlaMustCompile", "_noinline_xla_compile"):
            if key in attributes and attributes[key].b:
                findings.append(f"function {where} has {key}")
        for node in nodes:
            if node.op.startswith("Xla") or node.op == "_XlaCompile":
                findings.append(f"op {node.op} ({node.name} in {where})")
            if "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b:
                findings.append(f"node {node.name} in {where} is must-compile")
    return findings


def operations(saved_model_dir):
    """The set of op names used in `saved_model.pb`, function library included."""
    return {node.op for _, _, nodes in _graphs(saved_model_dir) for node in nodes}


def publish(module, model_dir, version=None):
    """Saves a `ServingModule` as `model_dir/VERSION/`, atomically; returns that path.

    Written into a staging folder (TF Serving ignores it: not a number), checked to need no XLA
    (unless the module's `jit_compile` asks for it), and renamed into place with the umask's
    permissions, so TF Serving running as another user can read it. Without `version`, the next
    free number, moving on if another export takes it meanwhile.
    """
    model_dir = os.fspath(model_dir)
    fixed = version is not None
    if fixed and int(version) < 1:
        raise ValueError(f"version={version} must be a positive integer.")
    remove_stale(model_dir)
    version = int(version) if fixed else (version_numbers(model_dir) or [0])[-1] + 1
    for _ in range(_PUBLISH_ATTEMPTS):
        final = os.path.join(model_dir, str(version))
        if not os.path.exists(final):
            try:
                with staged_directory(final, replace=False) as staging:
                    tf.saved_model.save(module, staging, signatures=module.signatures())
                    findings = xla_findings(staging)
                    if findings and not module.jit_compile:
                        raise RuntimeError(f"The graph needs XLA, which TF Serving runs without: {findings}")
                return final
            except OSError as error:
                # Another export published this version while we wrote ours.
                taken = error.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(final)
                if not taken:
                    raise ValueError(f"Could not publish {final}: {error}") from error
        if fixed:
            raise ValueError(_TAKEN.format(final))
        version = max(version_numbers(model_dir) + [version]) + 1
    raise ValueError(
        f"Could not publish a version of {model_dir}: {_PUBLISH_ATTEMPTS} versions were taken by "
        "other exports while this one was written; retry."
    )


def export(run_dir, name, base_dir=DEFAULT_BASE_DIR, version=None, max_new_tokens=None,
           jit_compile=False):
    """Exports a run directory's model and tokenizer as `base_dir/name/version/`; returns that path.

    Args:
        name: the model name TF Serving serves it under (`/v1/models/NAME`).
        version: a positive int; default: the next free one (see `publish`).
        max_new_tokens: new tokens per prompt of `serving_default`, and `generate`'s default.
        jit_compile: an XLA-compiled decode loop, for servers that run XLA (see `ServingModule`).

    Example:
        export("checkpoints/shakespeare_char", "shakespeare")  # saved_models/shakespeare/1
    """
    if not _NAME.match(name or ""):
        raise ValueError(
            f"Model name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder "
            "and a URL path element)."
        )
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(
            f"No run directory at {run_dir}; pass a folder written by 'kgpt train' (or "
            "'kgpt import-gpt2')."
        )
    model_dir = os.path.join(base_dir, name)
    if version is not None:
        if int(version) < 1:
            raise ValueError(f"version={version} must be a positive integer.")
        final = os.path.join(model_dir, str(int(version)))
        if os.path.exists(final):  # before the model is loaded
            raise ValueError(_TAKEN.format(final))
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    problem = tokenizer.graph_problem()
    if problem:
        raise ValueError(f"Cannot export {run_dir}: the SavedModel tokenizes in its graph, and {problem}.")
    module = ServingModule(
        run.load_model(), tokenizer, max_new_tokens=max_new_tokens, jit_compile=jit_compile
    )
    return publish(module, model_dir, version)
