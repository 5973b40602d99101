"""Samplers and the compiled, key/value-cached decode loop.

`decode` runs a whole generation as one TensorFlow graph: a prefill pass over the prompts, then a
`tf.while_loop` of one-token `call_with_cache` steps. Prompts of different lengths share a batch:
they are right-padded, decoding starts after the shortest prompt, and a row still inside its own
prompt keeps its prompt token instead of the sampled one. The cache and token buffer are updated
with scatters, gathers and selects only, so the graph runs without XLA (as TensorFlow Serving
runs it) and is also XLA-compilable in-process.
"""

import os
import warnings

import tensorflow as tf

from kgpt.rundir import RunDirectory

_NEGATIVE_INFINITY = float("-inf")


def sample_logits(logits, temperature=0.0, top_k=0, top_p=1.0, seed=None):
    """Picks one token per row from `(batch, vocabulary)` float32 logits.

    Args:
        logits: float32 `(batch, vocabulary_size)`.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it and sampled.
        top_k: keep only the `top_k` most likely tokens (0 keeps all); 1 is greedy at any
            temperature, and takes the argmax without sorting the vocabulary.
        top_p: keep the smallest set of most likely tokens whose probability reaches `top_p`.
        seed: int32 `(2,)` stateless seed; required when sampling.

    Returns:
        int32 `(batch,)` token ids.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    temperature = tf.cast(temperature, tf.float32)
    top_k = tf.cast(top_k, tf.int32)
    top_p = tf.cast(top_p, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def sample():
        scaled = logits / tf.maximum(temperature, 1e-6)
        vocabulary_size = tf.shape(scaled)[-1]
        # Sort once; top-k and top-p both cut the sorted list.
        sorted_logits, sorted_ids = tf.math.top_k(scaled, k=vocabulary_size)
        ranks = tf.range(vocabulary_size)[None, :]
        keep = tf.logical_or(top_k <= 0, ranks < top_k)
        probabilities = tf.nn.softmax(tf.where(keep, sorted_logits, -1e30))
        # A token stays in the nucleus if the mass before it is still below top_p.
        mass_before = tf.cumsum(probabilities, axis=-1, exclusive=True)
        keep = tf.logical_and(keep, mass_before < top_p)
        filtered = tf.where(keep, sorted_logits, -1e30)
        choice = tf.random.stateless_categorical(filtered, 1, seed=seed, dtype=tf.int32)
        return tf.gather(sorted_ids, choice[:, 0], batch_dims=1)

    return tf.cond(tf.logical_and(temperature > 0.0, tf.not_equal(top_k, 1)), sample, lambda: greedy)


def _write_column(tokens, column, index):
    """tokens[:, index] = column, without XLA-only dynamic-update-slice ops."""
    mask = tf.equal(tf.range(tf.shape(tokens)[1]), index)[None, :]
    return tf.where(mask, column[:, None], tokens)


def _cache_shape_invariants(cache):
    """Loop shape invariants of a cache: any batch (beams reorder it) and any length."""
    return tf.nest.map_structure(
        lambda c: tf.TensorShape([None] + list(c.shape[1:2]) + [None] + list(c.shape[3:])), cache
    )


def decode(
    model,
    prompt_ids,
    prompt_lengths,
    max_new_tokens,
    end_of_text_id=-1,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=0,
):
    """Generates continuations of a right-padded batch of prompts with a key/value cache.

    Meant to be called inside a `tf.function` (see `Decoder`); every argument may be a tensor.

    Args:
        model: a `kgpt.model.GPT`.
        prompt_ids: int32 `(batch, prompt_length)`, right-padded; every row has at least one token.
        prompt_lengths: int32 `(batch,)` true prompt lengths.
        max_new_tokens: tokens to add to each prompt; `prompt_length + max_new_tokens` must
            not exceed `model.model_config.sequence_length`.
        end_of_text_id: a row stops after producing this id (-1: never).
        temperature, top_k, top_p: see `sample_logits`.
        seed: int seed; the same seed gives the same samples.

    Returns:
        `(tokens, lengths)`: int32 `(batch, prompt_length + max_new_tokens)` holding each prompt
        followed by its continuation, and int32 `(batch,)` the number of valid tokens per row
        (prompt + generated, end-of-text included); positions past a row's length are filler.
    """
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    prompt_lengths = tf.cast(prompt_lengths, tf.int32)
    batch_size = tf.shape(prompt_ids)[0]
    total_length = tf.shape(prompt_ids)[1] + tf.cast(max_new_tokens, tf.int32)
    tokens = tf.pad(prompt_ids, [[0, 0], [0, total_length - tf.shape(prompt_ids)[1]]])
    start = tf.reduce_min(prompt_lengths)
    cache = model.initial_cache(batch_size, total_length)
    logits, cache = model.call_with_cache(tokens[:, :start], cache, 0)
    next_logits = logits[:, -1]
    seed = tf.stack([tf.cast(seed, tf.int32), 0])
    limits = prompt_lengths + tf.cast(max_new_tokens, tf.int32)
    lengths = limits
    done = tf.zeros([batch_size], tf.bool)

    def condition(index, tokens, cache, next_logits, lengths, done):
        return tf.logical_and(index < total_length, tf.logical_not(tf.reduce_all(done)))

    def body(index, tokens, cache, next_logits, lengths, done):
        sampled = sample_logits(next_logits, temperature, top_k, top_p, seed + [0, index])
        in_prompt = index < prompt_lengths
        token = tf.where(in_prompt, tokens[:, index], sampled)
        token = tf.where(done, tf.fill([batch_size], tf.maximum(end_of_text_id, 0)), token)
        tokens = _write_column(tokens, token, index)
        # A row ends at end-of-text or once it has max_new_tokens tokens past its own prompt.
        ended = tf.logical_or(tf.equal(token, end_of_text_id), index + 1 >= limits)
        finished = tf.logical_and(tf.logical_not(done), tf.logical_and(~in_prompt, ended))
        lengths = tf.where(finished, index + 1, lengths)
        done = tf.logical_or(done, finished)
        logits, cache = model.call_with_cache(token[:, None], cache, index)
        return index + 1, tokens, cache, logits[:, -1], lengths, done

    index, tokens, cache, next_logits, lengths, done = tf.while_loop(
        condition,
        body,
        (start, tokens, cache, next_logits, lengths, done),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, None]),
            _cache_shape_invariants(cache),
            tf.TensorShape([None, None]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
        ),
    )
    return tokens, lengths


def beam_search(
    model,
    prompt_ids,
    prompt_lengths,
    max_new_tokens,
    num_beams,
    end_of_text_id=-1,
    length_penalty=1.0,
):
    """Beam search over a right-padded batch of prompts with a key/value cache.

    Every prompt keeps `num_beams` live hypotheses. Each step scores the `2 * num_beams` best
    extensions: those ending in end-of-text (and, at the last step, all of them) become finished
    hypotheses scored `log_probability / new_tokens ** length_penalty`; the best others stay live.
    A prompt stops once it has `num_beams` finished hypotheses (Hugging Face's
    `early_stopping=True`) or after `max_new_tokens`. Like `decode`, only scatters, gathers and
    selects: it runs with or without XLA.

    Args:
        model: a `kgpt.model.GPT` (anything with `initial_cache` and `call_with_cache`).
        prompt_ids: int32 `(batch, prompt_length)`, right-padded; every row has a token.
        prompt_lengths: int32 `(batch,)`.
        max_new_tokens: at most this many tokens per hypothesis.
        num_beams: hypotheses kept per prompt (a Python int).
        end_of_text_id: id that finishes a hypothesis (-1: none).
        length_penalty: exponent of the length normalisation; 0 compares raw log-probabilities,
            larger values favour longer hypotheses.

    Returns:
        `(tokens, lengths, scores)`, best hypothesis first: int32
        `(batch, num_beams, prompt_length + max_new_tokens)` (prompt + continuation), int32
        `(batch, num_beams)` valid tokens per hypothesis, float32 `(batch, num_beams)` scores.
    """
    beams = int(num_beams)
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    prompt_lengths = tf.cast(prompt_lengths, tf.int32)
    max_new_tokens = tf.cast(max_new_tokens, tf.int32)
    length_penalty = tf.cast(length_penalty, tf.float32)
    batch_size = tf.shape(prompt_ids)[0]
    total_length = tf.shape(prompt_ids)[1] + max_new_tokens
    tokens = tf.pad(prompt_ids, [[0, 0], [0, max_new_tokens]])
    tokens = tf.repeat(tokens[:, None], beams, axis=1)  # (batch, beams, total)
    start = tf.reduce_min(prompt_lengths)
    cache = model.initial_cache(batch_size * beams, total_length)
    flat_tokens = tf.reshape(tokens, [batch_size * beams, total_length])
    logits, cache = model.call_with_cache(flat_tokens[:, :start], cache, 0)
    next_logits = logits[:, -1]
    limits = prompt_lengths + max_new_tokens
    # Only beam 0 is live at first, so the first expansion does not pick the same token K times.
    alive_scores = tf.tile(
        tf.concat([[0.0], tf.fill([beams - 1], _NEGATIVE_INFINITY)], axis=0)[None, :], [batch_size, 1]
    )
    finished_tokens = tf.zeros_like(tokens)
    finished_scores = tf.fill([batch_size, beams], _NEGATIVE_INFINITY)
    finished_lengths = tf.zeros([batch_size, beams], tf.int32)
    done = tf.zeros([batch_size], tf.bool)
    batch_index = tf.range(batch_size)[:, None]

    def condition(index, *state):
        done = state[-1]
        return tf.logical_and(index < total_length, tf.logical_not(tf.reduce_all(done)))

    def body(
        index, tokens, cache, next_logits, alive_scores, finished_tokens, finished_scores,
        finished_lengths, done,
    ):
        vocabulary_size = tf.shape(next_logits)[-1]
        log_probabilities = tf.nn.log_softmax(tf.cast(next_logits, tf.float32))
        log_probabilities = tf.reshape(log_probabilities, [batch_size, beams, vocabulary_size])
        scores = tf.reshape(alive_scores[:, :, None] + log_probabilities, [batch_size, -1])
        candidate_scores, candidate_ids = tf.math.top_k(scores, k=2 * beams)  # (batch, 2K)
        parents = candidate_ids // vocabulary_size
        candidate_tokens = candidate_ids % vocabulary_size
        # (batch, 2K, total): each candidate's parent sequence with the new token written in.
        candidates = tf.gather(tokens, parents, batch_dims=1)
        column = tf.equal(tf.range(total_length), index)[None, None, :]
        candidates = tf.where(column, candidate_tokens[:, :, None], candidates)

        new_tokens = tf.cast(index + 1 - prompt_lengths, tf.float32)[:, None]  # (batch, 1)
        is_end = tf.equal(candidate_tokens, end_of_text_id)
        last_step = (index + 1 >= limits)[:, None]
        finishes = tf.logical_or(is_end, last_step)
        normalised = candidate_scores / tf.pow(tf.maximum(new_tokens, 1.0), length_penalty)
        generating = tf.logical_and(index >= prompt_lengths, tf.logical_not(done))  # (batch,)
        normalised = tf.where(
            tf.logical_and(finishes, generating[:, None]), normalised, _NEGATIVE_INFINITY
        )
        # Merge the new finished hypotheses into the pool and keep the best K.
        pool_scores = tf.concat([finished_scores, normalised], axis=1)
        pool_tokens = tf.concat([finished_tokens, candidates], axis=1)
        pool_lengths = tf.concat(
            [finished_lengths, tf.fill(tf.shape(candidate_tokens), index + 1)], axis=1
        )
        merged_scores, keep = tf.math.top_k(pool_scores, k=beams)
        merged_tokens = tf.gather(pool_tokens, keep, batch_dims=1)
        merged_lengths = tf.gather(pool_lengths, keep, batch_dims=1)

        # The best K candidates that did not end stay live.
        live_scores, live = tf.math.top_k(tf.where(is_end, _NEGATIVE_INFINITY, candidate_scores), k=beams)
        live_parents = tf.gather(parents, live, batch_dims=1)
        live_tokens = tf.gather(candidates, live, batch_dims=1)
        # Rows still inside their prompt (or finished) keep their beams as they are.
        keep_rows = tf.logical_not(generating)
        identity = tf.tile(tf.range(beams)[None, :], [batch_size, 1])
        parents = tf.where(keep_rows[:, None], identity, live_parents)
        tokens = tf.where(keep_rows[:, None, None], tokens, live_tokens)
        alive_scores = tf.where(keep_rows[:, None], alive_scores, live_scores)
        finished_scores = tf.where(generating[:, None], merged_scores, finished_scores)
        finished_tokens = tf.where(generating[:, None, None], merged_tokens, finished_tokens)
        finished_lengths = tf.where(generating[:, None], merged_lengths, finished_lengths)
        full = tf.reduce_all(finished_scores > _NEGATIVE_INFINITY, axis=1)
        done = tf.logical_or(
            done, tf.logical_and(generating, tf.logical_or(full, last_step[:, 0]))
        )

        # Reorder the cache to follow the parents, then feed each beam's token at `index`.
        flat_parents = tf.reshape(parents + batch_index * beams, [-1])
        cache = tf.nest.map_structure(lambda c: tf.gather(c, flat_parents), cache)
        token = tf.reshape(tokens[:, :, index], [-1, 1])
        logits, cache = model.call_with_cache(token, cache, index)
        return (
            index + 1, tokens, cache, logits[:, -1], alive_scores, finished_tokens,
            finished_scores, finished_lengths, done,
        )

    state = tf.while_loop(
        condition,
        body,
        (
            start, tokens, cache, next_logits, alive_scores, finished_tokens, finished_scores,
            finished_lengths, done,
        ),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, beams, None]),
            _cache_shape_invariants(cache),
            tf.TensorShape([None, None]),
            tf.TensorShape([None, beams]),
            tf.TensorShape([None, beams, None]),
            tf.TensorShape([None, beams]),
            tf.TensorShape([None, beams]),
            tf.TensorShape([None]),
        ),
    )
    return state[5], state[7], state[6]


def check_options(
    max_new_tokens,
    sequence_length,
    temperature=None,
    top_k=0,
    top_p=1.0,
    num_beams=1,
    num_return_sequences=1,
):
    """Raises `ValueError` with a fix for generation options that cannot work.

    `temperature=None` means greedy decoding; a temperature must be positive.
    """
    if not 1 <= max_new_tokens < sequence_length:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not fit the model's context of "
            f"{sequence_length} tokens (at least one goes to the prompt); choose 1 to "
            f"{sequence_length - 1}."
        )
    if temperature is not None and not temperature > 0:
        raise ValueError(
            f"temperature={temperature} must be > 0; for greedy decoding leave the temperature "
            "out (or use top_k=1)."
        )
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 keeps every token).")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 keeps every token).")
    if num_beams < 1:
        raise ValueError(f"beams={num_beams} must be >= 1 (1 means no beam search).")
    if num_beams > 1 and temperature is not None:
        raise ValueError(
            "Beam search is deterministic; use either beams > 1 or a sampling temperature."
        )
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be >= 1.")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(
            f"num_return_sequences={num_return_sequences} exceeds beams={num_beams}; a beam "
            "search returns at most one sequence per beam."
        )
    if num_beams == 1 and temperature is None and num_return_sequences > 1:
        raise ValueError(
            "Greedy decoding gives one sequence per prompt; for several, sample (set a "
            "temperature) or use beams."
        )


class Decoder:
    """Generation for one model on token ids: pads prompts, runs a compiled graph, unpads.

    Sampling and greedy decoding run `decode`, beam search runs `beam_search`, each as one
    `tf.function`. Prompts are padded to a multiple of `bucket` tokens, so calls with similar
    lengths reuse one graph (one trace per batch size and total length with XLA).

    Args:
        model: a `kgpt.model.GPT`.
        end_of_text_id: id that ends a row (-1: never).
        jit_compile: compile the decode loops with XLA (faster in-process on CPU; see
            benchmarks/RESULTS.md).
        bucket: prompt-length granularity of the traced graphs.

    Example:
        decoder = Decoder(model, end_of_text_id=tokenizer.end_of_text_id)
        continuations = decoder([[5, 6, 7], [8]], max_new_tokens=20, temperature=0.8, seed=1)
    """

    def __init__(self, model, end_of_text_id=-1, jit_compile=False, bucket=16):
        self.model = model
        self.end_of_text_id = end_of_text_id
        self.jit_compile = jit_compile
        self.bucket = bucket
        self._decode = tf.function(
            lambda *args: decode(model, *args), jit_compile=jit_compile, reduce_retracing=True
        )
        self._beam_searches = {}

    def _beam_search(self, num_beams):
        if num_beams not in self._beam_searches:
            self._beam_searches[num_beams] = tf.function(
                lambda ids, lengths, steps, end, penalty: beam_search(
                    self.model, ids, lengths, steps, num_beams, end, penalty
                ),
                jit_compile=self.jit_compile,
                reduce_retracing=True,
            )
        return self._beam_searches[num_beams]

    def __call__(
        self,
        prompts,
        max_new_tokens,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        keep_prompt=False,
        num_beams=1,
        length_penalty=1.0,
        num_return_sequences=1,
    ):
        """Continues each prompt (a list of token ids).

        Args:
            prompts: list of non-empty lists of token ids.
            max_new_tokens: tokens to add; each prompt plus this must fit the context.
            temperature, top_k, top_p, seed: see `sample_logits` (temperature 0: greedy).
            keep_prompt: return prompt + continuation instead of the continuation alone.
            num_beams: > 1 runs `beam_search` instead of sampling.
            length_penalty: see `beam_search`.
            num_return_sequences: sequences per prompt (samples, or the best beams).

        Returns:
            A list of `len(prompts) * num_return_sequences` lists of ids, prompt-major; a row
            that ended at end-of-text ends with that id.
        """
        sequence_length = self.model.model_config.sequence_length
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token; got an empty prompt.")
        longest = max(len(p) for p in prompts)
        if max_new_tokens <= 0 or longest + max_new_tokens > sequence_length:
            raise ValueError(
                f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} does not fit "
                f"the model's context of {sequence_length}; shorten the prompt or ask for 1 to "
                f"{sequence_length - longest} new tokens."
            )
        padded_length = min(-(-longest // self.bucket) * self.bucket, sequence_length - max_new_tokens)
        ids = tf.constant([list(p) + [0] * (padded_length - len(p)) for p in prompts], tf.int32)
        lengths = tf.constant([len(p) for p in prompts], tf.int32)
        if num_beams > 1:
            tokens, ends, _ = self._beam_search(num_beams)(
                ids,
                lengths,
                tf.constant(max_new_tokens, tf.int32),
                tf.constant(self.end_of_text_id, tf.int32),
                tf.constant(length_penalty, tf.float32),
            )
            tokens = tokens.numpy()[:, :num_return_sequences]
            ends = ends.numpy()[:, :num_return_sequences]
            rows = [
                (prompt, tokens[i, j], ends[i, j])
                for i, prompt in enumerate(prompts)
                for j in range(num_return_sequences)
            ]
        else:
            if num_return_sequences > 1:
                ids = tf.repeat(ids, num_return_sequences, axis=0)
                lengths = tf.repeat(lengths, num_return_sequences, axis=0)
            tokens, ends = self._decode(
                ids,
                lengths,
                tf.constant(max_new_tokens, tf.int32),
                tf.constant(self.end_of_text_id, tf.int32),
                tf.constant(temperature, tf.float32),
                tf.constant(top_k, tf.int32),
                tf.constant(top_p, tf.float32),
                tf.constant(seed, tf.int32),
            )
            tokens, ends = tokens.numpy(), ends.numpy()
            rows = [
                (prompts[row // num_return_sequences], tokens[row], ends[row])
                for row in range(len(tokens))
            ]
        return [
            row[0 if keep_prompt else len(prompt) : end].tolist() for prompt, row, end in rows
        ]


def _fit_prompts(token_lists, end_of_text_id, room, truncate):
    """Empty prompts start from end-of-text; prompts over `room` tokens keep their last `room`."""
    fitted = [list(ids) or [end_of_text_id] for ids in token_lists]
    _report_truncation(sum(len(ids) > room for ids in fitted), room, truncate)
    return [ids[-room:] for ids in fitted]


def _report_truncation(count, room, truncate):
    if not count:
        return
    message = (
        f"{count} prompt(s) longer than the {room} tokens that fit in the model's context "
        "before max_new_tokens"
    )
    if not truncate:
        raise ValueError(f"{message}; shorten them, lower max_new_tokens, or allow truncation.")
    warnings.warn(f"{message} were left-truncated to their last {room} tokens.", stacklevel=3)


class Generator:
    """Text in, text out for a trained model, in-process (the compiled `Decoder`).

    Build it from a run directory with `Generator.from_run_directory`, or use `load_generator`,
    which also accepts an exported SavedModel.

    Args:
        model: a `kgpt.model.GPT`.
        tokenizer: the run's tokenizer (`kgpt.tokenizer.load_tokenizer`).
        jit_compile: compile the decode loop with XLA (default: on; on 2 CPU cores about 2x
            the graph without XLA at batch 1 and 1.3x at batch 8, see benchmarks/RESULTS.md).

    Example:
        generator = Generator.from_run_directory("checkpoints/shakespeare_char")
        generator.generate(["ROMEO:", "JULIET:"], max_new_tokens=50, temperature=0.8, seed=1)
    """

    def __init__(self, model, tokenizer, jit_compile=True):
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = model.model_config.sequence_length
        self.decoder = Decoder(model, tokenizer.end_of_text_id, jit_compile=jit_compile)

    @classmethod
    def from_run_directory(cls, run_dir, **kwargs):
        """Loads the run's model (`best.keras`, else `final.keras`) and `tokenizer/`."""
        run = RunDirectory(run_dir)
        return cls(run.load_model(), run.load_tokenizer(), **kwargs)

    def generate(
        self,
        prompts,
        max_new_tokens=None,
        temperature=None,
        top_k=0,
        top_p=1.0,
        num_beams=1,
        length_penalty=1.0,
        num_return_sequences=1,
        seed=0,
        keep_prompt=False,
        truncate=True,
    ):
        """Continues each prompt.

        Args:
            prompts: a list of strings (an empty string starts from end-of-text).
            max_new_tokens: tokens to add per prompt (fewer if end-of-text comes first);
                default `min(64, sequence_length // 2)`.
            temperature: None for greedy decoding, else > 0 to sample.
            top_k, top_p: sampling filters (0 and 1.0 keep every token).
            num_beams: > 1 for beam search, with `length_penalty`.
            num_return_sequences: continuations per prompt (samples or best beams).
            seed: makes sampling reproducible.
            keep_prompt: return prompt + continuation.
            truncate: left-truncate prompts too long for the context (with a warning);
                False raises `ValueError` instead.

        Returns:
            `len(prompts) * num_return_sequences` strings, prompt-major, without end-of-text.
        """
        prompts = _check_prompts(prompts)
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(self.sequence_length)
        check_options(
            max_new_tokens, self.sequence_length, temperature, top_k, top_p, num_beams,
            num_return_sequences,
        )
        end = self.tokenizer.end_of_text_id
        ids = _fit_prompts(
            self.tokenizer.encode_documents(prompts), end, self.sequence_length - max_new_tokens,
            truncate,
        )
        rows = self.decoder(
            ids,
            max_new_tokens,
            temperature=temperature or 0.0,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            num_beams=num_beams,
            length_penalty=length_penalty,
            num_return_sequences=num_return_sequences,
        )
        rows = [row[:-1] if row and row[-1] == end else row for row in rows]
        texts = self.tokenizer.detokenize(tf.ragged.constant(rows, dtype=tf.int32, ragged_rank=1))
        texts = [t.decode("utf-8") for t in texts.numpy()]
        if keep_prompt:
            texts = [prompts[i // num_return_sequences] + t for i, t in enumerate(texts)]
        return texts


class SavedModelGenerator:
    """`Generator`'s interface over an exported SavedModel (its `generate` signature).

    Runs exactly the graph TensorFlow Serving runs. Beam search is not exported: `num_beams`
    must be 1.

    Args:
        path: a version folder (`saved_models/NAME/1`) or a model folder (highest version).
    """

    def __init__(self, path):
        import tensorflow_text  # noqa: F401  (registers the tokenizer ops the graph uses)

        self.path = saved_model_version_path(path)
        self.module = tf.saved_model.load(self.path)
        self.signature = self.module.signatures["generate"]
        self.sequence_length = int(self.module.sequence_length.numpy())
        self.default_max_new_tokens = int(self.module.default_max_new_tokens.numpy())

    def generate(
        self,
        prompts,
        max_new_tokens=None,
        temperature=None,
        top_k=0,
        top_p=1.0,
        num_beams=1,
        length_penalty=1.0,
        num_return_sequences=1,
        seed=0,
        keep_prompt=False,
        truncate=True,
    ):
        """Same arguments and result as `Generator.generate`; `max_new_tokens` defaults to the
        export's (`kgpt export --max-new-tokens`)."""
        prompts = _check_prompts(prompts)
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        check_options(
            max_new_tokens, self.sequence_length, temperature, top_k, top_p, num_beams,
            num_return_sequences,
        )
        if num_beams > 1:
            raise ValueError(
                "Beam search is not part of the exported SavedModel; run it from the run "
                "directory (kgpt generate RUN_DIR --beams N)."
            )
        repeated = [p for p in prompts for _ in range(num_return_sequences)]
        outputs = self.signature(
            prompts=tf.constant(repeated, tf.string),
            max_new_tokens=tf.constant(max_new_tokens, tf.int32),
            # Greedy is sampling among the single best token.
            temperature=tf.constant(temperature or 1.0, tf.float32),
            top_k=tf.constant(1 if temperature is None else top_k, tf.int32),
            top_p=tf.constant(top_p, tf.float32),
            seed=tf.constant(seed, tf.int32),
        )
        _report_truncation(
            int(outputs["truncated"].numpy()[::num_return_sequences].sum()),
            self.sequence_length - max_new_tokens,
            truncate,
        )
        texts = [t.decode("utf-8") for t in outputs["text"].numpy()]
        if keep_prompt:
            texts = [p + t for p, t in zip(repeated, texts)]
        return texts


def default_max_new_tokens(sequence_length):
    """New tokens when none are asked for: 64, or half the context of a smaller model."""
    return min(64, sequence_length // 2)


def _check_prompts(prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts given; pass at least one (an empty string is allowed).")
    return prompts


def version_numbers(model_dir):
    """The numbered version folders of a TF Serving model folder, ascending (none if absent)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir) if name.isdigit())


def saved_model_version_path(path):
    """Returns `path` if it holds `saved_model.pb`, else its highest numeric version folder."""
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


def load_generator(path, **kwargs):
    """A `SavedModelGenerator` for an exported model, else a `Generator` for a run directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such run directory or SavedModel: {path}.")
    if is_saved_model(path):
        return SavedModelGenerator(path)
    return Generator.from_run_directory(path, **kwargs)


def generate(path, prompts, **options):
    """One-call generation: `load_generator(path).generate(prompts, **options)`.

    Example:
        kgpt.generate.generate("checkpoints/shakespeare_char", ["ROMEO:"], max_new_tokens=40)
    """
    return load_generator(path).generate(prompts, **options)
