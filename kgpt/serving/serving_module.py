"""The exported object (`ServingModule`): the model's variables, the tokenizer and the serving
functions of every signature `kgpt.serving.signatures` declares, built from those declarations and
checked against them; tokenizer, decode loop and post-processing all in the graph, without XLA.
"""

import inspect

import tensorflow as tf

from kgpt.generation.beam_search import beam_search
from kgpt.generation.decoding import (
    MAX_NEW_TOKENS,
    DecodeState,
    cache_length,
    cache_shape_invariants,
    cached,
    check_options,
    decode,
    default_max_new_tokens,
    default_window,
    draw,
    penalized,
    prefill,
    step,
)
from kgpt.generation.logprobs import MAX_LOGPROBS, logprob_spans, prompt_logprobs
from kgpt.generation.sampling import SamplingOptions, graph_checks, signature_dtypes
from kgpt.generation.stopping import continuations, graph_stop_checks, graph_stop_ids
from kgpt.serving.signatures import (
    BEAM_SEARCH,
    DETOKENIZE,
    GENERATE,
    LOGITS,
    PREFILL,
    PROMPT_LOGPROBS,
    SCORE,
    SERVING_DEFAULT,
    SIGNATURES,
    STEP,
    TOKENIZE,
    Name,
    contract_for,
)

# `beam_search`: beams per prompt at most (the default: `kgpt.serving.signatures.DEFAULT_BEAMS`).
MAX_BEAMS = 16
_CONTINUATION_NAMES = tuple(spec.name for spec in SERVING_DEFAULT.outputs)


def _checked(checks, structure):
    """`structure`'s tensors, computed only once the assertion ops `checks` have passed."""
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, structure)


def _specs(signature, specs=None):
    """The `tf.TensorSpec` of each input of a `kgpt.serving.signatures.Signature`, in order; `specs`
    gives those whose dtype and shape the model sets (`{Name.CACHE: spec}`)."""
    specs = specs or {}
    return [
        tf.TensorSpec(specs[spec.name].shape, specs[spec.name].dtype, name=spec.name) if spec.dtype is None
        else tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name)
        for spec in signature.inputs
    ]


def _function(python_function, signature, specs=None):
    """A serving function of `signature`'s inputs: a `tf.function`, without XLA."""
    return tf.function(python_function, input_signature=_specs(signature, specs), jit_compile=False)


def _function_with_defaults(python_function, signature, specs=None, **export_values):
    """A serving function of `signature`'s inputs in order, those after the rows with the defaults
    the SignatureDef records (`kgpt.serving.signatures.Signature.defaults`, `export_values` filling
    in what each export sets); `specs` as in `_specs`."""
    defaults = signature.defaults(**export_values)

    def function(*inputs):
        return python_function(*inputs)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    function.__signature__ = inspect.Signature([
        inspect.Parameter(spec.name, kind) if spec.name not in defaults else inspect.Parameter(
            spec.name, kind, default=tf.constant(defaults[spec.name], tf.as_dtype(spec.dtype)))
        for spec in signature.inputs
    ])
    return _function(function, signature, specs)


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
    """The inverse of `pack_cache` for the cache structure of `model` (`kgpt.generation.decoding.cached`)."""
    structure = _cache_structure(model)
    count = len(tf.nest.flatten(structure))
    return tf.nest.pack_sequence_as(structure, [packed] if count == 1 else tf.unstack(packed, count, axis=1))


def packed_cache_spec(model, name=Name.CACHE):
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

    `generate` decodes a whole continuation in one call (`kgpt.generation.decoding.decode`); `prefill` and
    `step` run the same `kgpt.generation.decoding.prefill` and `step` one call per token, the state (cache
    included) going out and back in as tensors, so a client streams token by token and may stop
    at any token; `detokenize` turns the tokens into text with the export's own tokenizer, and
    `tokenize` prompts into tokens.

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

        self.serving_default = _function(self._greedy, SERVING_DEFAULT)
        self.generate = self._generate_function(max_new_tokens)
        self.score = _function(self._score, SCORE)
        self.prompt_logprobs = _function(self._prompt_logprobs, PROMPT_LOGPROBS)
        self.logits = _function(self._logits, LOGITS)
        self.beam_search = _function_with_defaults(
            self._beam_search, BEAM_SEARCH, max_new_tokens=min(max_new_tokens, self._sequence_length - 1),
        )
        self.prefill = self._prefill_function(max_new_tokens)
        self.step = self._step_function()
        self.detokenize = _function(self._detokenize, DETOKENIZE)
        self.tokenize = _function(self._tokenize, TOKENIZE)
        self.tokenizer_kind = tf.Variable(tokenizer.kind, trainable=False, name="tokenizer_kind")

    def contract(self):
        """The `kgpt.serving.signatures.Signature` of each serving function (`generate`'s, `prefill`'s
        and `step`'s have this module's sampling fields)."""
        return [contract_for(signature, self._sampling_type) for signature in SIGNATURES]

    def signatures(self):
        """The `signatures` argument of `tf.saved_model.save` (`kgpt.serving.export.publish` checks
        the saved ones against the contract: tracing them here first would not spare `save` a
        second trace, since a save traces in a context of its own)."""
        return {signature.name: getattr(self, signature.name) for signature in self.contract()}

    def _greedy(self, prompts):
        outputs = self._run(prompts, self._max_new_tokens, SamplingOptions().graph_inputs())
        return {name: outputs[name] for name in _CONTINUATION_NAMES}

    def _checked_sampling(self, options):
        """`{field: tensor}` of the sampling inputs (in field order), once their bounds are checked."""
        options = dict(zip(signature_dtypes(self._sampling_type), options))
        return _checked(graph_checks(options, self._sampling_type), options)

    @staticmethod
    def _checked_logprobs(logprobs):
        """`logprobs` once it is -1 (none) to `MAX_LOGPROBS`."""
        return _checked([
            tf.debugging.assert_greater_equal(logprobs, -1, message="logprobs must be >= -1 (-1: none)"),
            tf.debugging.assert_less_equal(
                logprobs, MAX_LOGPROBS, message=f"logprobs must be <= {MAX_LOGPROBS} alternatives"),
        ], logprobs)

    def _generate_function(self, default_max_new_tokens):
        """`generate(prompts, max_new_tokens, *options, stop, stop_token_ids, logprobs)`, defaults
        recorded."""

        def generate(prompts, max_new_tokens, *options):
            options, (stop, stop_token_ids), logprobs = (
                self._checked_sampling(options[:-3]), options[-3:-1], self._checked_logprobs(options[-1]))
            stop, stop_token_ids = _checked(
                graph_stop_checks(stop, stop_token_ids, self._vocabulary_size), (stop, stop_token_ids)
            )
            return self._run(prompts, max_new_tokens, options, stop, stop_token_ids, logprobs)

        signature = contract_for(GENERATE, self._sampling_type)
        return _function_with_defaults(generate, signature, max_new_tokens=default_max_new_tokens)

    def _prefill_function(self, default_max_new_tokens):
        """`prefill(prompts, max_new_tokens, *options)`: the first token and the state `step` takes."""

        def prefill_prompts(prompts, max_new_tokens, *options):
            logprobs = self._checked_logprobs(options[-1])
            return self._prefill(prompts, max_new_tokens, self._checked_sampling(options[:-1]), logprobs)

        signature = contract_for(PREFILL, self._sampling_type)
        return _function_with_defaults(prefill_prompts, signature, max_new_tokens=default_max_new_tokens)

    def _step_function(self):
        """`step(token, cache, position, offset, recent, counts, seen, *options, logprobs)`: the
        next token and state."""

        def step_state(token, cache, position, offset, recent, counts, seen, *options):
            state = DecodeState(unpack_cache(self._decoding_model, cache), position, offset, recent, counts,
                                seen)
            logprobs = self._checked_logprobs(options[-1])
            return self._step(token, state, self._checked_sampling(options[:-1]), logprobs)

        signature = contract_for(STEP, self._sampling_type)
        return _function_with_defaults(
            step_state, signature, specs={Name.CACHE: packed_cache_spec(self._decoding_model)}
        )

    def _run(self, prompts, max_new_tokens, sampling, stop=None, stop_token_ids=None, logprobs=None):
        max_new_tokens = tf.convert_to_tensor(max_new_tokens, tf.int32)
        max_new_tokens = _checked(self._length_checks(prompts, max_new_tokens), max_new_tokens)
        stop = tf.constant([], tf.string) if stop is None else stop
        stop_token_ids = tf.constant([], tf.int32) if stop_token_ids is None else stop_token_ids
        dense, lengths, truncated = self._prompt_ids(prompts, self._prompt_room(max_new_tokens))
        stop_ids = graph_stop_ids(self.tokenizer, stop, stop_token_ids)
        end = self.tokenizer.end_of_text_id
        wanted = False if logprobs is None else logprobs >= 0
        tokens, ends, recorded = self._decode(dense, lengths, max_new_tokens, end, sampling, stop_ids, wanted)
        outputs = self._continuations(tokens, ends, lengths, max_new_tokens, stop, stop_token_ids)
        if logprobs is not None:  # the continuation's positions, as `token_ids` has them
            outputs.update(_logprobs_outputs(
                recorded, lengths, outputs[Name.TOKEN_COUNT], logprobs, tf.shape(outputs[Name.TOKEN_IDS])[1]))
        return {**outputs, Name.PROMPT_TOKEN_COUNT: lengths, Name.TRUNCATED: truncated}

    def _prefill(self, prompts, max_new_tokens, sampling, logprobs):
        """`decoding.prefill` of prompts of one token count (after `generate`'s truncation) and
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
        token, recorded = self._compiled(draw)(logits, state, sampling, logprobs >= 0)
        outputs = self._step_outputs(token, state, recorded)
        return {**outputs, Name.PROMPT_TOKEN_COUNT: lengths, Name.TRUNCATED: truncated}

    def _step(self, token, state, sampling, logprobs):
        """`decoding.step` on the state `prefill` or the last `step` returned: `STEP_STATE`."""
        recent, position, offset = state.recent, state.position, state.offset
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
        counts_shape = tf.stack([tf.shape(token)[0], vocabulary])
        token = _checked([
            tf.debugging.assert_equal(tf.shape(state.counts), counts_shape, message=(
                f"counts must be (batch, {vocabulary}), as prefill and step return it")),
            tf.debugging.assert_equal(tf.shape(state.seen), counts_shape, message=(
                f"seen must be (batch, {vocabulary}), as prefill and step return it")),
        ], token)
        token, state, recorded = self._compiled(
            lambda *inputs: step(self._decoding_model, *inputs)
        )(state, token, sampling, logprobs >= 0)
        return self._step_outputs(token, state, recorded)

    @staticmethod
    def _step_outputs(token, state, recorded):
        return {Name.TOKEN: token, Name.CACHE: pack_cache(state.cache), Name.POSITION: state.position,
                Name.OFFSET: state.offset, Name.RECENT: state.recent, Name.COUNTS: state.counts,
                Name.SEEN: state.seen, Name.TOKEN_LOGPROBS: recorded.chosen,
                Name.TOP_TOKEN_IDS: recorded.top_ids, Name.TOP_LOGPROBS: recorded.top}

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
        return {Name.TEXT: self.tokenizer.detokenize(ragged)}

    def _prompt_room(self, max_new_tokens):
        """Prompt tokens kept: what leaves room for max_new_tokens, and at least the window that
        generation past the context keeps (`kgpt.generation.decoding.prompt_room`)."""
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
        """`text`, `token_ids` (padded), `token_count` and `stopped` of rows `tokens[lengths:ends]`:
        `kgpt.generation.stopping.continuations`, as `Generator` runs it."""
        rows = continuations(self.tokenizer, tokens, ends, lengths, max_new_tokens, stop, stop_token_ids)
        return {Name.TEXT: rows.text, Name.TOKEN_IDS: rows.token_ids, Name.TOKEN_COUNT: rows.token_count,
                Name.STOPPED: rows.stopped}

    def _beam_search(self, prompts, max_new_tokens, num_beams, length_penalty, stop, stop_token_ids):
        """Every prompt's `num_beams` best continuations by beam search (`beam_search.beam_search`,
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
        count = beams[Name.TOKEN_COUNT][:, 0]
        return {
            Name.TEXT: beams[Name.TEXT][:, 0],
            Name.TOKEN_IDS: beams[Name.TOKEN_IDS][:, 0, : tf.reduce_max(count)],
            Name.TOKEN_COUNT: count,
            Name.PROMPT_TOKEN_COUNT: lengths,
            Name.TRUNCATED: truncated,
            Name.BEAM_TEXT: beams[Name.TEXT],
            Name.BEAM_TOKEN_COUNT: beams[Name.TOKEN_COUNT],
            Name.STOPPED: beams[Name.STOPPED][:, 0],
            Name.BEAM_STOPPED: beams[Name.STOPPED],
        }

    def _decode(self, *args):
        """`decoding.decode` (`args`: those before `sequence_length`, and `logprobs`), a call XLA must
        compile with `jit_compile`; without penalties, the loop that kept no counts for them."""

        def function(*inputs, penalties):
            *inputs, logprobs = inputs
            return decode(self._decoding_model, *inputs, self._sequence_length, self._window, logprobs,
                          penalties)

        if self.jit_compile:
            function = tf.function(function, jit_compile=True)
        on = penalized(args[4])  # the sampling inputs
        if not tf.is_tensor(on):
            return function(*args, penalties=bool(on))
        return tf.cond(on, lambda: function(*args, penalties=True), lambda: function(*args, penalties=False))

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
            Name.LOG_LIKELIHOOD: log_likelihood,
            Name.TOKEN_COUNT: counts,
            Name.PERPLEXITY: tf.exp(-log_likelihood / tf.cast(counts, tf.float32)),
        }

    def _prompt_logprobs(self, prompts, max_new_tokens, logprobs):
        """Each prompt's tokens as `generate` feeds them (cut to the room `max_new_tokens` leaves; 0:
        the whole context) and their log-probabilities, in one forward pass."""
        checks = [
            tf.debugging.assert_positive(tf.size(prompts), message="prompts is empty; send a prompt"),
            tf.debugging.assert_non_negative(max_new_tokens, message="max_new_tokens must be >= 0"),
            tf.debugging.assert_less_equal(
                max_new_tokens, MAX_NEW_TOKENS, message=f"max_new_tokens must be <= {MAX_NEW_TOKENS}"),
            tf.debugging.assert_non_negative(logprobs, message="logprobs must be >= 0"),
            tf.debugging.assert_less_equal(
                logprobs, MAX_LOGPROBS, message=f"logprobs must be <= {MAX_LOGPROBS} alternatives"),
        ]
        max_new_tokens, logprobs = _checked(checks, (max_new_tokens, logprobs))
        dense, lengths, truncated = self._prompt_ids(prompts, self._prompt_room(max_new_tokens))
        recorded = prompt_logprobs(self.model, dense)
        outputs = _logprobs_outputs(recorded, tf.zeros_like(lengths), lengths, logprobs, tf.shape(dense)[1])
        return {Name.TOKEN_IDS: dense, Name.TOKEN_COUNT: lengths, Name.TRUNCATED: truncated, **outputs}

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
        return {Name.LOGITS: tf.cast(self.model(token_ids), tf.float32)}

    def _tokenize(self, prompts):
        """Each prompt's token ids as the export's tokenizer makes them (nothing added: "" has no
        token, although `generate` starts it from end-of-text), right-padded with 0."""
        ids = self.tokenizer.tokenize(prompts)  # ragged (batch, None)
        return {Name.TOKEN_IDS: tf.cast(ids.to_tensor(default_value=0, shape=[None, None]), tf.int32),
                Name.TOKEN_COUNT: tf.cast(ids.row_lengths(), tf.int32)}


def _logprobs_outputs(recorded, starts, counts, logprobs, width):
    """The `token_logprobs`, `top_token_ids` and `top_logprobs` outputs of rows' `TokenLogprobs`:
    `logprobs.logprob_spans`, of width 0 when `logprobs` < 0 (none asked for)."""
    kept = tf.maximum(logprobs, 0)
    spans = logprob_spans(recorded, starts, counts, tf.where(logprobs >= 0, width, 0), kept)
    return dict(zip((Name.TOKEN_LOGPROBS, Name.TOP_TOKEN_IDS, Name.TOP_LOGPROBS), spans))
