"""Text in, text out: `TextGenerator` (the interface) and `Generator` (a model in-process);
`kgpt.serving.saved_model_generator.SavedModelGenerator` puts an export behind the same interface.

The base checks prompts and options, reports truncation and keeps prompts; subclasses only continue.
"""

import dataclasses
import warnings

import numpy as np
import tensorflow as tf

from kgpt.generation.decoder import Decoder
from kgpt.generation.decoding import (
    CausalRecomputation,
    cached,
    check_max_new_tokens,
    check_options,
    default_max_new_tokens,
    prompt_room,
)
from kgpt.generation.logprobs import TokenLogprobs, check_logprobs, prompt_logprobs, records
from kgpt.generation.sampling import SamplingOptions
from kgpt.generation.stopping import check_stops, compiled_continuations, graph_stop_ids
from kgpt.generation.streaming import RowTexts, StepDecoder, stream_pieces
from kgpt.rundir import RunDirectory


def report_truncation(count, room, truncate):
    if not count:
        return
    message = f"{count} prompt(s) longer than the {room} tokens kept in the context with max_new_tokens"
    if not truncate:
        raise ValueError(f"{message}; shorten them, lower max_new_tokens, or allow truncation.")
    warnings.warn(f"{message} were left-truncated to their last {room} tokens.", stacklevel=4)


def sampling_options(sampling=None, **fields):
    """`sampling` (default greedy `SamplingOptions()`) with `SamplingOptions` `fields` replaced."""
    sampling = SamplingOptions() if sampling is None else sampling
    if not isinstance(sampling, SamplingOptions):
        raise ValueError(
            f"sampling={sampling!r} is not a SamplingOptions; pass e.g. "
            "sampling=SamplingOptions(temperature=0.8) or the fields as keywords."
        )
    names = {field.name for field in dataclasses.fields(sampling)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"Unknown sampling option(s) {unknown}; known: {sorted(names)}.")
    return dataclasses.replace(sampling, **fields) if fields else sampling


@dataclasses.dataclass(frozen=True)
class Completion:
    """One continuation of `TextGenerator.complete`.

    Args:
        text: the continuation, without end-of-text or a stop token id, cut before a stop string.
        token_count: the tokens decoded for it (a stop string's counted; end-of-text and stop ids not).
        prompt_token_count: its prompt's tokens as decoded (after any truncation; "" is end-of-text).
        finish_reason: "stop" (end-of-text, a stop token id or a stop string ended it) or
            "length" (`max_new_tokens` were made).
        logprobs: with `logprobs` asked for, a `kgpt.generation.logprobs.TokenLogprob` per token
            counted in `token_count`, in order; else None.
    """

    text: str
    token_count: int
    prompt_token_count: int
    finish_reason: str
    logprobs: tuple | None = None


def well_formed(text):
    """`text` with what is not Unicode text made U+FFFD: the bytes of invalid UTF-8 that Python keeps
    as lone surrogates (command-line arguments, `surrogateescape`) each become one U+FFFD, so a run
    directory and an export read a prompt the same way."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")  # the bytes the surrogates stand for
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "replace")


def _prompt_list(prompts):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("No prompts given; pass at least one (an empty string is allowed).")
    return [well_formed(prompt) for prompt in prompts]


class TextGenerator:
    """The shared text interface; subclasses set the three class attributes and `_continue`."""

    sequence_length = None
    vocabulary_size = None
    default_max_new_tokens = None

    def generate(self, prompts, max_new_tokens=None, *, keep_prompt=False, **options):
        """Continues each prompt (an empty string starts from end-of-text); the texts of `complete`.

        Args:
            keep_prompt: return prompt + continuation instead of the continuation alone.
            **options: the options of `complete` (sampling, beams, stops, truncation).

        Returns:
            `len(prompts) * num_return_sequences` strings, prompt-major, without end-of-text.

        Example:
            generator.generate(["ROMEO:"], 40, temperature=0.8, seed=1, stop="\\n\\n")
        """
        prompts = _prompt_list(prompts)
        texts = [completion.text for completion in self.complete(prompts, max_new_tokens, **options)]
        if keep_prompt:
            count = len(texts) // len(prompts)  # num_return_sequences
            texts = [prompts[i // count] + t for i, t in enumerate(texts)]
        return texts

    def complete(
        self,
        prompts,
        max_new_tokens=None,
        *,
        sampling=None,
        num_beams=1,
        length_penalty=1.0,
        num_return_sequences=1,
        truncate=True,
        stop=None,
        stop_token_ids=None,
        logprobs=None,
        **sampling_fields,
    ):
        """Continues each prompt in one batched decode; returns the continuations with their counts.

        Past the context (not with beams), generation goes on from the last half of the context.

        Args:
            max_new_tokens: at most this many tokens per prompt (up to `decoding.MAX_NEW_TOKENS`);
                default `default_max_new_tokens`.
            sampling: a `kgpt.generation.sampling.SamplingOptions` (default greedy).
            num_beams: > 1 for beam search, with `length_penalty`.
            num_return_sequences: continuations per prompt (samples or best beams).
            truncate: left-truncate prompts too long for the context (with a warning), else raise.
            stop: a string or up to 16 strings; a continuation ends before the first one it contains.
            stop_token_ids: token ids that end a continuation like end-of-text (not returned).
            logprobs: None, or 0 to `kgpt.generation.logprobs.MAX_LOGPROBS`: each `Completion`'s
                `logprobs` has every token's log-probability and this many alternatives (not with
                beams).
            **sampling_fields: `SamplingOptions` fields replacing those of `sampling`.

        Returns:
            `len(prompts) * num_return_sequences` `Completion`s, prompt-major.
        """
        prompts = _prompt_list(prompts)
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        sampling = sampling_options(sampling, **sampling_fields)
        check_options(max_new_tokens, self.sequence_length, sampling, num_beams, num_return_sequences)
        stop, stop_token_ids = check_stops(stop, stop_token_ids, self.vocabulary_size)
        logprobs = check_logprobs(logprobs)
        if num_beams > 1 and logprobs is not None:
            raise ValueError("Beam search returns no log-probabilities; leave out logprobs or the beams.")
        decoding = dict(num_beams=num_beams, length_penalty=length_penalty, stop=stop,
                        stop_token_ids=stop_token_ids, logprobs=logprobs)
        return self._continue(prompts, max_new_tokens, sampling, truncate, num_return_sequences, **decoding)

    def _continue(self, prompts, max_new_tokens, sampling, truncate, num_return_sequences, **decoding):
        """`len(prompts) * num_return_sequences` `Completion`s, prompt-major."""
        raise NotImplementedError

    def stream(self, prompt, max_new_tokens=None, *, sampling=None, num_return_sequences=1, truncate=True,
               chunked=True, logprobs=None, **sampling_fields):
        """Continues one prompt, yielding `kgpt.generation.streaming.Piece`s as the text is produced.

        The options are checked now; the returned iterator decodes as it is read (closing it stops
        decoding). Each continuation's pieces join to `generate`'s text for the same options, past
        the context too. Beam search is not streamed.

        Args:
            chunked: False computes each continuation at once where that is cheaper (an export's
                one signature call) and yields it as one piece.
            logprobs: as in `complete`; each piece's `logprobs` has its token's.

        Example:
            for piece in generator.stream("ROMEO:", 40):
                print(piece.text, end="", flush=True)
        """
        if not isinstance(prompt, str):
            raise ValueError(f"stream takes one prompt string; got {type(prompt).__name__}.")
        prompt = well_formed(prompt)
        if sampling_fields.pop("num_beams", 1) > 1:
            raise ValueError(
                "Beam search is not streamed: its best continuation is known only when it ends; use "
                "generate(..., num_beams=N), or stream greedy or sampled text."
            )
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        sampling = sampling_options(sampling, **sampling_fields)
        check_options(max_new_tokens, self.sequence_length, sampling, 1, num_return_sequences)
        logprobs = check_logprobs(logprobs)
        return self._stream(prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked,
                            logprobs)

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked, logprobs):
        raise NotImplementedError

    def prompt_logprobs(self, prompts, logprobs=0, max_new_tokens=0, truncate=True):
        """The log-probability of each prompt token given the ones before it (OpenAI's `echo`), all
        prompts in one forward pass.

        Args:
            logprobs: alternatives per token, 0 to `kgpt.generation.logprobs.MAX_LOGPROBS`.
            max_new_tokens: the tokens a generation from these prompts makes (0: none): a prompt is
                scored as that generation feeds it, cut to the room they leave (`truncate`).

        Returns:
            One tuple of `kgpt.generation.logprobs.TokenLogprob` per prompt: its tokens as decoding
            feeds them (an empty prompt is one end-of-text), the first with `logprob` None.

        Example:
            sum(token.logprob for token in generator.prompt_logprobs(["To be"])[0][1:])
        """
        prompts = _prompt_list(prompts)
        logprobs = check_logprobs(logprobs) or 0
        if max_new_tokens:
            check_max_new_tokens(max_new_tokens, self.sequence_length)
        room = prompt_room(self.sequence_length, max_new_tokens)
        return self._prompt_logprobs(prompts, logprobs, max_new_tokens, room, truncate)

    def _prompt_logprobs(self, prompts, logprobs, max_new_tokens, room, truncate):
        raise NotImplementedError


class Generator(TextGenerator):
    """Text in, text out for a trained model, in-process (the compiled `kgpt.generation.decoder.Decoder`).

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a cache (decoded by recomputation).
        tokenizer: the run's tokenizer (`kgpt.tokenizers.load_tokenizer`).
        jit_compile: XLA for the decode loop; default on for a model with a key/value cache
            (about 2x on CPU, see benchmarks/RESULTS.md), off for recomputation.

    Example:
        generator = Generator.from_run_directory("checkpoints/shakespeare_char")
        generator.generate(["ROMEO:", "JULIET:"], max_new_tokens=50, temperature=0.8, seed=1)
    """

    def __init__(self, model, tokenizer, jit_compile=None):
        if jit_compile is None:
            jit_compile = not isinstance(cached(model), CausalRecomputation)
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = model.model_config.sequence_length
        self.vocabulary_size = tokenizer.vocabulary_size
        self.default_max_new_tokens = default_max_new_tokens(self.sequence_length)
        self.decoder = Decoder(model, tokenizer.end_of_text_id, jit_compile=jit_compile)
        self.step_decoder = StepDecoder(model, self.sequence_length, tokenizer.end_of_text_id, jit_compile)
        self._row_texts = RowTexts(tokenizer)
        self._continuations = compiled_continuations(tokenizer)
        self._prompt_logprobs_function = tf.function(
            lambda ids: prompt_logprobs(model, ids), jit_compile=jit_compile, reduce_retracing=True,
        )

    @classmethod
    def from_run_directory(cls, run_dir, **kwargs):
        """Loads a run directory's model and tokenizer; `kwargs` go to `Generator`."""
        run = RunDirectory(run_dir)
        return cls(run.load_model(), run.load_tokenizer(), **kwargs)

    def _prompt_ids(self, prompts, room, truncate):
        """Each prompt's ids as decoding feeds them: an empty one is end-of-text; one over `room`
        tokens keeps its last `room` (with a warning, else a ValueError: `truncate`)."""
        end = self.tokenizer.end_of_text_id
        ids = [list(row) or [end] for row in self.tokenizer.encode_documents(prompts)]
        report_truncation(sum(len(row) > room for row in ids), room, truncate)
        return ids

    def _continue(self, prompts, max_new_tokens, sampling, truncate, num_return_sequences, num_beams,
                  length_penalty, stop, stop_token_ids, logprobs):
        room = prompt_room(self.sequence_length, max_new_tokens, num_beams)
        ids = self._prompt_ids(prompts, room, truncate)
        stops = _stop_tensors(stop, stop_token_ids)
        rows = self.decoder([row[-room:] for row in ids], max_new_tokens, sampling=sampling,
                            num_return_sequences=num_return_sequences, num_beams=num_beams,
                            length_penalty=length_penalty, stop_sequences=self._stop_sequences(*stops),
                            logprobs=logprobs is not None)
        rows, row_logprobs = rows if logprobs is not None else (rows, None)
        # The continuations (an ending id kept) as the export's graph post-processes its rows.
        ends = np.array([len(row) for row in rows], np.int32)
        tokens = np.zeros((len(rows), max(ends)), np.int32)
        for index, row in enumerate(rows):
            tokens[index, : len(row)] = row
        outputs = self._continuations(tokens, ends, np.zeros_like(ends), np.int32(max_new_tokens), *stops)
        texts, counts, stopped = (v.numpy() for v in (outputs.text, outputs.token_count, outputs.stopped))
        token_logprobs = [None] * len(rows)
        if logprobs is not None:
            kept = [row[:count] for row, count in zip(rows, counts)]
            token_logprobs = records(kept, row_logprobs, logprobs, self._token_texts)
        return [
            Completion(text.decode("utf-8"), int(count), min(len(ids[index // num_return_sequences]), room),
                       "stop" if ended else "length", recorded)
            for index, (text, count, ended, recorded)
            in enumerate(zip(texts, counts, stopped, token_logprobs))
        ]

    def _token_texts(self, ids):
        """Each token id's text alone."""
        return self._row_texts([[token] for token in ids])

    def _prompt_logprobs(self, prompts, logprobs, max_new_tokens, room, truncate):
        """One call of the compiled `logprobs.prompt_logprobs` on the prompts, right-padded to a
        multiple of the decoder's bucket (one trace per bucket)."""
        rows = [row[-room:] for row in self._prompt_ids(prompts, room, truncate)]
        bucket = self.decoder.bucket
        width = -(-max(len(row) for row in rows) // bucket) * bucket
        ids = np.zeros((len(rows), min(width, self.sequence_length)), np.int32)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = row
        recorded = [value.numpy() for value in self._prompt_logprobs_function(tf.constant(ids))]
        recorded = [TokenLogprobs(*(value[index] for value in recorded)) for index in range(len(rows))]
        return records(rows, recorded, logprobs, self._token_texts, first_is_prompt=True)

    def _stop_sequences(self, stop, stop_token_ids):
        """The token ids that end a row early (`stopping.graph_stop_ids`, as in the export): each
        stop string's, where they detokenize back to it, and each stop token id."""
        matrix = graph_stop_ids(self.tokenizer, stop, stop_token_ids).numpy()
        return [row[row >= 0].tolist() for row in matrix if (row >= 0).any()]

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked, logprobs):
        """One piece per token step (`StepDecoder`), whatever `chunked`."""
        end = self.tokenizer.end_of_text_id
        room = prompt_room(self.sequence_length, max_new_tokens)
        ids = self._prompt_ids([prompt], room, truncate)[0][-room:]
        steps = self.step_decoder(ids, max_new_tokens, sampling, num_return_sequences, logprobs is not None)
        yield from stream_pieces(steps, self._row_texts, end, max_new_tokens, len(ids), num_return_sequences,
                                 logprobs)

    # The tokenizer behind the text interface (`kgpt serve`'s /tokenize, /detokenize, /tokenizer_info).

    @property
    def tokenizer_kind(self):
        """The tokenizer's kind as `data.tokenizer` names it (`char`, `bpe`, `gpt2`, `tiktoken:NAME`)."""
        return self.tokenizer.kind

    @property
    def end_of_text_id(self):
        return self.tokenizer.end_of_text_id

    @property
    def end_of_text(self):
        """The end-of-text token's text (`<|endoftext|>`)."""
        return self.detokenize([[self.end_of_text_id]])[0]

    def tokenize(self, texts):
        """Each text's token ids as generation reads a prompt (before any truncation). Nothing is
        added (GPT-2's convention): "" is `[]`, which generation starts from end-of-text.

        Example:
            generator.detokenize(generator.tokenize(["the cat", ""]))  # ["the cat", ""]
        """
        return [row.tolist() for row in self.tokenizer.encode_documents([well_formed(t) for t in texts])]

    def detokenize(self, rows):
        """The text of each list of token ids (ids from 0 to `vocabulary_size - 1`, else ValueError)."""
        return self._row_texts([check_token_ids(row, self.vocabulary_size) for row in rows])


def _stop_tensors(stop, stop_token_ids):
    """`stop` and `stop_token_ids` as the tensors `[S]` and `[K]` of the graph's inputs."""
    return (tf.constant(stop, tf.string, shape=[len(stop)]),
            tf.constant(stop_token_ids, tf.int32, shape=[len(stop_token_ids)]))


def check_token_ids(row, vocabulary_size, name="tokens"):
    """`row` (a list of token ids) as a list of ints; ValueError naming `name` and the first id that
    is not an integer from 0 to `vocabulary_size - 1`."""
    if isinstance(row, (str, bytes, dict)) or not hasattr(row, "__iter__"):
        raise ValueError(f"{name} must be a list of token ids (integers); got {type(row).__name__}.")
    row = list(row)
    for index, value in enumerate(row):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not (
                0 <= value < vocabulary_size):
            raise ValueError(f"{name}[{index}]={value!r} is not a token id; send integers from 0 to "
                             f"{vocabulary_size - 1} (vocabulary_size={vocabulary_size}).")
    return [int(value) for value in row]
