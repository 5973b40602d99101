"""Samplers and the compiled, key/value-cached decode loop.

`decode` runs a whole generation as one TensorFlow graph: a prefill pass over the prompts, then a
`tf.while_loop` of one-token `call_with_cache` steps. Prompts of different lengths share a batch:
they are right-padded, decoding starts after the shortest prompt, and a row still inside its own
prompt keeps its prompt token instead of the sampled one. The cache and token buffer are updated
with gathers and selects only, so the graph runs without XLA (as TensorFlow Serving runs it) and
is also XLA-compilable in-process.
"""

import tensorflow as tf


def sample_logits(logits, temperature=0.0, top_k=0, top_p=1.0, seed=None):
    """Picks one token per row from `(batch, vocabulary)` float32 logits.

    Args:
        logits: float32 `(batch, vocabulary_size)`.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it and sampled.
        top_k: keep only the `top_k` most likely tokens (0 keeps all).
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

    return tf.cond(temperature > 0.0, sample, lambda: greedy)


def _write_column(tokens, column, index):
    """tokens[:, index] = column, without XLA-only dynamic-update-slice ops."""
    mask = tf.equal(tf.range(tf.shape(tokens)[1]), index)[None, :]
    return tf.where(mask, column[:, None], tokens)


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
            tf.TensorShape([None] + list(cache.shape[1:3]) + [None] + list(cache.shape[4:])),
            tf.TensorShape([None, None]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
        ),
    )
    return tokens, lengths


class Decoder:
    """Generation for one model: pads prompts, runs the compiled `decode` graph, unpads.

    Traces once per (batch size, total length) bucket: prompts are padded to a multiple of
    `bucket` tokens so that calls with similar lengths reuse one graph.

    Args:
        model: a `kgpt.model.GPT`.
        end_of_text_id: id that ends a row (-1: never).
        jit_compile: compile the decode loop with XLA (faster in-process on CPU and GPU).
        bucket: prompt-length granularity of the traced graphs.

    Example:
        decoder = Decoder(model, end_of_text_id=tokenizer.end_of_text_id)
        continuations = decoder([[5, 6, 7], [8]], max_new_tokens=20, temperature=0.8, seed=1)
    """

    def __init__(self, model, end_of_text_id=-1, jit_compile=False, bucket=16):
        self.model = model
        self.end_of_text_id = end_of_text_id
        self.bucket = bucket
        self._decode = tf.function(
            lambda *args: decode(model, *args), jit_compile=jit_compile, reduce_retracing=True
        )

    def __call__(
        self, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0, keep_prompt=False
    ):
        """Continues each prompt (a list of token ids) and returns the new ids per prompt."""
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
        ids = [list(p) + [0] * (padded_length - len(p)) for p in prompts]
        tokens, lengths = self._decode(
            tf.constant(ids, tf.int32),
            tf.constant([len(p) for p in prompts], tf.int32),
            tf.constant(max_new_tokens, tf.int32),
            tf.constant(self.end_of_text_id, tf.int32),
            tf.constant(temperature, tf.float32),
            tf.constant(top_k, tf.int32),
            tf.constant(top_p, tf.float32),
            tf.constant(seed, tf.int32),
        )
        tokens, lengths = tokens.numpy(), lengths.numpy()
        results = []
        for row, prompt in enumerate(prompts):
            start = 0 if keep_prompt else len(prompt)
            results.append(tokens[row, start : lengths[row]].tolist())
        return results
