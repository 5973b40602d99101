"""Text in, text out: `Generator` (in-process) and `SavedModelGenerator` (an export) on one base.

The base checks prompts and options, reports truncation and keeps prompts; subclasses only continue.
"""

import dataclasses
import os
import re
import warnings

import numpy as np
import tensorflow as tf

from kgpt.generation.decoding import (
    CausalRecomputation,
    Decoder,
    cached,
    check_options,
    default_max_new_tokens,
    prompt_room,
)
from kgpt.generation.sampling import SamplingOptions
from kgpt.generation.stopping import check_stops, compiled_continuations, graph_stop_ids
from kgpt.generation.streaming import Piece, RowTexts, StepDecoder, TextDeltas
from kgpt.rundir import RunDirectory
from kgpt.serving.export import is_saved_model, saved_model_version_path
from kgpt.serving.signatures import BEAM_SEARCH, GENERATE, Name


def _report_truncation(count, room, truncate):
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
    """

    text: str
    token_count: int
    prompt_token_count: int
    finish_reason: str


def _prompt_list(prompts):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("No prompts given; pass at least one (an empty string is allowed).")
    return prompts


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
        **sampling_fields,
    ):
        """Continues each prompt in one batched decode; returns the continuations with their counts.

        Past the context (not with beams), generation goes on from the last half of the context.

        Args:
            max_new_tokens: at most this many tokens per prompt (up to `decoding.MAX_NEW_TOKENS`);
                default `default_max_new_tokens`.
            sampling: a `kgpt.sampling.SamplingOptions` (default greedy).
            num_beams: > 1 for beam search, with `length_penalty`.
            num_return_sequences: continuations per prompt (samples or best beams).
            truncate: left-truncate prompts too long for the context (with a warning), else raise.
            stop: a string or up to 16 strings; a continuation ends before the first one it contains.
            stop_token_ids: token ids that end a continuation like end-of-text (not returned).
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
        decoding = dict(num_beams=num_beams, length_penalty=length_penalty, stop=stop,
                        stop_token_ids=stop_token_ids)
        return self._continue(prompts, max_new_tokens, sampling, truncate, num_return_sequences, **decoding)

    def _continue(self, prompts, max_new_tokens, sampling, truncate, num_return_sequences, **decoding):
        """`len(prompts) * num_return_sequences` `Completion`s, prompt-major."""
        raise NotImplementedError

    def stream(self, prompt, max_new_tokens=None, *, sampling=None, num_return_sequences=1, truncate=True,
               chunked=True, **sampling_fields):
        """Continues one prompt, yielding `kgpt.streaming.Piece`s as the text is produced.

        The options are checked now; the returned iterator decodes as it is read (closing it stops
        decoding). Each continuation's pieces join to `generate`'s text for the same options, past
        the context too. Beam search is not streamed.

        Args:
            chunked: False computes each continuation at once where that is cheaper (an export's
                one signature call) and yields it as one piece.

        Example:
            for piece in generator.stream("ROMEO:", 40):
                print(piece.text, end="", flush=True)
        """
        if not isinstance(prompt, str):
            raise ValueError(f"stream takes one prompt string; got {type(prompt).__name__}.")
        if sampling_fields.pop("num_beams", 1) > 1:
            raise ValueError(
                "Beam search is not streamed: its best continuation is known only when it ends; use "
                "generate(..., num_beams=N), or stream greedy or sampled text."
            )
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        sampling = sampling_options(sampling, **sampling_fields)
        check_options(max_new_tokens, self.sequence_length, sampling, 1, num_return_sequences)
        return self._stream(prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked)

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked):
        raise NotImplementedError


class Generator(TextGenerator):
    """Text in, text out for a trained model, in-process (the compiled `kgpt.decoding.Decoder`).

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a cache (decoded by recomputation).
        tokenizer: the run's tokenizer (`kgpt.tokenizer.load_tokenizer`).
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

    @classmethod
    def from_run_directory(cls, run_dir, **kwargs):
        """Loads a run directory's model and tokenizer; `kwargs` go to `Generator`."""
        run = RunDirectory(run_dir)
        return cls(run.load_model(), run.load_tokenizer(), **kwargs)

    def _continue(self, prompts, max_new_tokens, sampling, truncate, num_return_sequences, num_beams,
                  length_penalty, stop, stop_token_ids):
        tokenizer, end = self.tokenizer, self.tokenizer.end_of_text_id
        room = prompt_room(self.sequence_length, max_new_tokens, num_beams)
        # Empty prompts start from end-of-text; prompts over `room` tokens keep their last `room`.
        ids = [list(row) or [end] for row in tokenizer.encode_documents(prompts)]
        _report_truncation(sum(len(row) > room for row in ids), room, truncate)
        stops = _stop_tensors(stop, stop_token_ids)
        rows = self.decoder([row[-room:] for row in ids], max_new_tokens, sampling=sampling,
                            num_return_sequences=num_return_sequences, num_beams=num_beams,
                            length_penalty=length_penalty, stop_sequences=self._stop_sequences(*stops))
        # The continuations (an ending id kept) as the export's graph post-processes its rows.
        ends = np.array([len(row) for row in rows], np.int32)
        tokens = np.zeros((len(rows), max(ends)), np.int32)
        for index, row in enumerate(rows):
            tokens[index, : len(row)] = row
        outputs = self._continuations(tokens, ends, np.zeros_like(ends), np.int32(max_new_tokens), *stops)
        texts, counts, stopped = (v.numpy() for v in (outputs.text, outputs.token_count, outputs.stopped))
        return [
            Completion(text.decode("utf-8"), int(count), min(len(ids[index // num_return_sequences]), room),
                       "stop" if ended else "length")
            for index, (text, count, ended) in enumerate(zip(texts, counts, stopped))
        ]

    def _stop_sequences(self, stop, stop_token_ids):
        """The token ids that end a row early (`kgpt.stopping.graph_stop_ids`, as in the export): each
        stop string's, where they detokenize back to it, and each stop token id."""
        matrix = graph_stop_ids(self.tokenizer, stop, stop_token_ids).numpy()
        return [row[row >= 0].tolist() for row in matrix if (row >= 0).any()]

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked):
        end = self.tokenizer.end_of_text_id
        room = prompt_room(self.sequence_length, max_new_tokens)
        ids = list(self.tokenizer.encode_documents([prompt])[0]) or [end]
        _report_truncation(int(len(ids) > room), room, truncate)
        ids = ids[-room:]
        rows = [[] for _ in range(num_return_sequences)]
        deltas = [TextDeltas() for _ in rows]
        finished = [False] * len(rows)
        for step, tokens in enumerate(self.step_decoder(ids, max_new_tokens, sampling, len(rows))):
            live = [index for index in range(len(rows)) if not finished[index]]
            reasons = {}
            for index in live:
                token = int(tokens[index])
                if token != end:
                    rows[index].append(token)
                reasons[index] = "stop" if token == end else "length" if step + 1 == max_new_tokens else None
            for index, text in zip(live, self._row_texts([rows[index] for index in live])):
                finished[index] = reasons[index] is not None
                piece = deltas[index].update(text, final=finished[index])
                yield Piece(index, piece, len(rows[index]), len(ids), reasons[index])


class SavedModelGenerator(TextGenerator):
    """`Generator`'s interface over an export's `generate` signature, the graph TF Serving runs.

    Args:
        path: a version folder (`saved_models/NAME/1`) or a model folder (highest version).
        module: the SavedModel at `path`, already loaded (else it is loaded).
        call: `call(signature_name, inputs)` runs a whole-answer signature call on `{input: NumPy
            array}` and returns `{output: NumPy array}`; default: the signature, at once. `kgpt
            serve` passes its scheduler here, which batches such calls with other requests.
    """

    def __init__(self, path, module=None, call=None):
        import tensorflow_text  # noqa: F401  (registers the tokenizer ops the graph uses)

        self.path = saved_model_version_path(path)
        self.module = tf.saved_model.load(self.path) if module is None else module
        self.signature = self.module.signatures[GENERATE.name]
        self.sequence_length = int(self.module.sequence_length.numpy())
        self.vocabulary_size = int(self.module.vocabulary_size.numpy())
        self.default_max_new_tokens = int(self.module.default_max_new_tokens.numpy())
        self._inputs = set(self.signature.structured_input_signature[1])
        self._run_signature = call or self._signature_call

    def _signature_call(self, signature_name, inputs):
        outputs = self.module.signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        return {key: value.numpy() for key, value in outputs.items()}

    def _continue(self, prompts, max_new_tokens, sampling, truncate, num_return_sequences, num_beams,
                  length_penalty, stop, stop_token_ids):
        if num_beams > 1:
            return self._beam_search(prompts, max_new_tokens, truncate, num_return_sequences, num_beams,
                                     length_penalty, stop, stop_token_ids)
        stops = {} if Name.STOP not in self._inputs else _stop_arrays(stop, stop_token_ids)
        outputs = self._call(
            GENERATE.name,
            prompts=_strings([p for p in prompts for _ in range(num_return_sequences)]),
            max_new_tokens=np.array(max_new_tokens, np.int32),
            **{key: value.numpy() for key, value in sampling.graph_tensors().items()},
            **stops,
        )
        truncated = outputs[Name.TRUNCATED][::num_return_sequences]
        _report_truncation(int(truncated.sum()), prompt_room(self.sequence_length, max_new_tokens), truncate)
        counts = outputs[Name.TOKEN_COUNT]
        # An export without `stopped` (older than it) knows a stop only by a row ended early.
        stopped = outputs[Name.STOPPED] if Name.STOPPED in outputs else counts < max_new_tokens
        texts, prompt_counts = outputs[Name.TEXT], outputs[Name.PROMPT_TOKEN_COUNT]
        return [
            Completion(text.decode("utf-8"), int(count), int(prompt_count), "stop" if ended else "length")
            for text, count, prompt_count, ended in zip(texts, counts, prompt_counts, stopped)
        ]

    def _beam_search(self, prompts, max_new_tokens, truncate, num_return_sequences, num_beams,
                     length_penalty, stop, stop_token_ids):
        """The `beam_search` signature: each prompt's best `num_return_sequences` beams (`Completion`s)."""
        if BEAM_SEARCH.name not in self.module.signatures:
            raise ValueError(
                f"The SavedModel {self.path} was exported before beam search was part of exports; "
                "export the run again (kgpt export), or run it from the run directory."
            )
        outputs = self._call(
            BEAM_SEARCH.name, prompts=_strings(prompts), max_new_tokens=np.array(max_new_tokens, np.int32),
            num_beams=np.array(num_beams, np.int32), length_penalty=np.array(length_penalty, np.float32),
            **_stop_arrays(stop, stop_token_ids),
        )
        room = prompt_room(self.sequence_length, max_new_tokens, num_beams)
        _report_truncation(int(outputs[Name.TRUNCATED].sum()), room, truncate)
        keys = (Name.BEAM_TEXT, Name.BEAM_TOKEN_COUNT, Name.BEAM_STOPPED)
        beams = [outputs[key][:, :num_return_sequences] for key in keys]
        return [
            Completion(text.decode("utf-8"), int(count), int(prompt_count), "stop" if ended else "length")
            for prompt_count, *row in zip(outputs[Name.PROMPT_TOKEN_COUNT], *beams)
            for text, count, ended in zip(*row)
        ]

    def _call(self, signature_name, **inputs):
        """The signature's outputs for NumPy `inputs`; a refusal (e.g. an older export's narrower
        limits) as a ValueError."""
        try:
            return self._run_signature(signature_name, inputs)
        except tf.errors.InvalidArgumentError as error:
            match = re.search(r"assertion failed: \[(.*?)\]", error.message, re.DOTALL)
            reason = match.group(1) if match else error.message.splitlines()[0]
            raise ValueError(f"The SavedModel {self.path} refused the request: {reason}.") from error

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked):
        """The signature has no step: calls it for 1, 2, 4, ... new tokens from the prompt, each
        answer extending the last (per-position seeds), and yields what each call added."""
        no_stops = {} if Name.STOP not in self._inputs else dict(  # stops apply to the joined text
            stop=tf.constant([], tf.string), stop_token_ids=tf.constant([], tf.int32)
        )

        def call(count):
            outputs = self.signature(
                prompts=tf.constant([prompt] * num_return_sequences, tf.string),
                max_new_tokens=tf.constant(count, tf.int32), **sampling.graph_tensors(), **no_stops,
            )
            return {key: value.numpy() for key, value in outputs.items()}

        room = prompt_room(self.sequence_length, max_new_tokens)
        count = 1 if chunked else max_new_tokens
        outputs = call(count)
        prompt_tokens = int(outputs[Name.PROMPT_TOKEN_COUNT][0])
        if prompt_tokens > room:  # truncated differently for each count: one call keeps the answer
            count, outputs = max_new_tokens, call(max_new_tokens)
        _report_truncation(int(outputs[Name.TRUNCATED][0]), room, truncate)
        prompt_tokens = int(outputs[Name.PROMPT_TOKEN_COUNT][0])
        deltas = [TextDeltas() for _ in range(num_return_sequences)]
        finished = [False] * num_return_sequences
        while True:
            for index, (text, tokens) in enumerate(zip(outputs[Name.TEXT], outputs[Name.TOKEN_COUNT])):
                if finished[index]:
                    continue
                reason = "stop" if tokens < count else "length" if count == max_new_tokens else None
                finished[index] = reason is not None
                piece = deltas[index].update(text.decode("utf-8"), final=finished[index])
                yield Piece(index, piece, int(tokens), prompt_tokens, reason)
            if all(finished):
                return
            count = min(2 * count, max_new_tokens)
            outputs = call(count)


def _strings(texts):
    """A 1-D NumPy array of UTF-8 bytes, as a served request's string tensor arrives."""
    return np.array([text.encode("utf-8") for text in texts], object)


def _stop_tensors(stop, stop_token_ids):
    """`stop` and `stop_token_ids` as the tensors `[S]` and `[K]` of the graph's inputs."""
    return (tf.constant(stop, tf.string, shape=[len(stop)]),
            tf.constant(stop_token_ids, tf.int32, shape=[len(stop_token_ids)]))


def _stop_arrays(stop, stop_token_ids):
    return {Name.STOP: _strings(stop),
            Name.STOP_TOKEN_IDS: np.array(stop_token_ids, np.int32).reshape([len(stop_token_ids)])}


def load_generator(path, **kwargs):
    """A `SavedModelGenerator` for an export, else `Generator.from_run_directory(path, **kwargs)`."""
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
