"""Text in, text out: `Generator` (in-process) and `SavedModelGenerator` (an export) on one base.

The base checks prompts and options, reports truncation and keeps prompts; subclasses only continue.
"""

import dataclasses
import os
import re
import warnings

import numpy as np
import tensorflow as tf

from kgpt.decoding import (
    CausalRecomputation,
    Decoder,
    cached,
    check_options,
    default_max_new_tokens,
    prompt_room,
)
from kgpt.export import STEP_STATE, is_saved_model, saved_model_version_path
from kgpt.rundir import RunDirectory
from kgpt.sampling import SamplingOptions
from kgpt.stopping import check_stops, cut_at_stop
from kgpt.streaming import Piece, RowTexts, StepDecoder, padded_rows, stream_pieces


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
        rows = self.decoder([row[-room:] for row in ids], max_new_tokens, sampling=sampling,
                            num_return_sequences=num_return_sequences, num_beams=num_beams,
                            length_penalty=length_penalty,
                            stop_sequences=self._stop_sequences(stop, stop_token_ids))
        enders = {end, *stop_token_ids}
        ended = [bool(row) and row[-1] in enders for row in rows]
        rows = [row[:-1] if ender else row for row, ender in zip(rows, ended)]
        texts = tokenizer.detokenize(tf.ragged.constant(rows, dtype=tf.int32, ragged_rank=1))
        completions = []
        for index, (row, text, ender) in enumerate(zip(rows, texts.numpy(), ended)):
            text = text.decode("utf-8")
            kept = cut_at_stop(text, stop)
            # Ended early (end-of-text, a stop id, a stop string's tokens), or cut at a stop string.
            stopped = ender or len(row) < max_new_tokens or kept != text
            prompt_tokens = min(len(ids[index // num_return_sequences]), room)
            completions.append(Completion(kept, len(row), prompt_tokens, "stop" if stopped else "length"))
        return completions

    def _stop_sequences(self, stop, stop_token_ids):
        """Token ids of each stop string that detokenize back to it (an early end), and each stop id."""
        encoded = [row.tolist() for row in self.tokenizer.encode_documents(stop)] if stop else []
        texts = self.tokenizer.detokenize(tf.ragged.constant(encoded, dtype=tf.int32, ragged_rank=1))
        round_trips = [text.decode("utf-8") for text in texts.numpy()] if stop else []
        sequences = [row for text, row, back in zip(stop, encoded, round_trips) if row and back == text]
        return sequences + [[token] for token in stop_token_ids]

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked):
        """One piece per token step (`StepDecoder`), whatever `chunked`."""
        end = self.tokenizer.end_of_text_id
        room = prompt_room(self.sequence_length, max_new_tokens)
        ids = list(self.tokenizer.encode_documents([prompt])[0]) or [end]
        _report_truncation(int(len(ids) > room), room, truncate)
        ids = ids[-room:]
        steps = self.step_decoder(ids, max_new_tokens, sampling, num_return_sequences)
        yield from stream_pieces(steps, self._row_texts, end, max_new_tokens, len(ids), num_return_sequences)


class SavedModelGenerator(TextGenerator):
    """`Generator`'s interface over an export's signatures, the graph TF Serving runs: `generate`
    and `beam_search` for whole answers, `prefill`, `step` and `detokenize` to stream.

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
        self.signature = self.module.signatures["generate"]
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
        stops = {} if "stop" not in self._inputs else _stop_arrays(stop, stop_token_ids)
        outputs = self._call(
            "generate",
            prompts=_strings([p for p in prompts for _ in range(num_return_sequences)]),
            max_new_tokens=np.array(max_new_tokens, np.int32),
            **{key: value.numpy() for key, value in sampling.graph_tensors().items()},
            **stops,
        )
        truncated = outputs["truncated"][::num_return_sequences]
        _report_truncation(int(truncated.sum()), prompt_room(self.sequence_length, max_new_tokens), truncate)
        counts = outputs["token_count"]
        # An export without `stopped` (older than it) knows a stop only by a row ended early.
        stopped = outputs["stopped"] if "stopped" in outputs else counts < max_new_tokens
        texts, prompt_counts = outputs["text"], outputs["prompt_token_count"]
        return [
            Completion(text.decode("utf-8"), int(count), int(prompt_count), "stop" if ended else "length")
            for text, count, prompt_count, ended in zip(texts, counts, prompt_counts, stopped)
        ]

    def _beam_search(self, prompts, max_new_tokens, truncate, num_return_sequences, num_beams,
                     length_penalty, stop, stop_token_ids):
        """The `beam_search` signature: each prompt's best `num_return_sequences` beams (`Completion`s)."""
        if "beam_search" not in self.module.signatures:
            raise ValueError(
                f"The SavedModel {self.path} was exported before beam search was part of exports; "
                "export the run again (kgpt export), or run it from the run directory."
            )
        outputs = self._call(
            "beam_search", prompts=_strings(prompts), max_new_tokens=np.array(max_new_tokens, np.int32),
            num_beams=np.array(num_beams, np.int32), length_penalty=np.array(length_penalty, np.float32),
            **_stop_arrays(stop, stop_token_ids),
        )
        room = prompt_room(self.sequence_length, max_new_tokens, num_beams)
        _report_truncation(int(outputs["truncated"].sum()), room, truncate)
        keys = ("beam_text", "beam_token_count", "beam_stopped")
        beams = [outputs[key][:, :num_return_sequences] for key in keys]
        return [
            Completion(text.decode("utf-8"), int(count), int(prompt_count), "stop" if ended else "length")
            for prompt_count, *row in zip(outputs["prompt_token_count"], *beams)
            for text, count, ended in zip(*row)
        ]

    def _call(self, signature_name, **inputs):
        """The signature's outputs for NumPy `inputs`; a refusal (e.g. an older export's narrower
        limits) as a ValueError."""
        try:
            return self._run_signature(signature_name, inputs)
        except tf.errors.InvalidArgumentError as error:
            raise self._refusal(error) from error

    def _refusal(self, error):
        """A ValueError naming the reason of a signature's InvalidArgumentError."""
        match = re.search(r"assertion failed: \[(.*?)\]", error.message, re.DOTALL)
        reason = match.group(1) if match else error.message.splitlines()[0]
        return ValueError(f"The SavedModel {self.path} refused the request: {reason}.")

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked):
        """One piece per token step through the export's `prefill` and `step` signatures; with
        `chunked=False`, or an export older than them, one `generate` call and one piece per row."""
        if chunked and "step" in self.module.signatures:
            return self._stream_steps(prompt, max_new_tokens, sampling, truncate, num_return_sequences)
        if chunked:
            warnings.warn(
                f"The SavedModel {self.path} has no prefill and step signatures (exported before "
                "them): each continuation comes as one piece; export the run again to stream token "
                "by token.", stacklevel=3,
            )
        return self._stream_whole(prompt, max_new_tokens, sampling, truncate, num_return_sequences)

    def _stream_steps(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences):
        """`prefill`, then one `step` per token while the iterator is read (none once it is closed)."""
        options = sampling.graph_tensors()
        outputs = self._invoke("prefill", prompts=tf.constant([prompt] * num_return_sequences),
                               max_new_tokens=tf.constant(max_new_tokens, tf.int32), **options)
        room = prompt_room(self.sequence_length, max_new_tokens)
        _report_truncation(int(outputs["truncated"].numpy()[0]), room, truncate)

        def steps(outputs):
            yield outputs["token"].numpy()
            for _ in range(max_new_tokens - 1):
                # The state stays in tensors from one call to the next, the cache never copied.
                outputs = self._invoke("step", **{key: outputs[key] for key in STEP_STATE}, **options)
                yield outputs["token"].numpy()

        end = int(self.module.end_of_text_id.numpy())
        prompt_tokens = int(outputs["prompt_token_count"].numpy()[0])
        yield from stream_pieces(steps(outputs), self._texts, end, max_new_tokens, prompt_tokens,
                                 num_return_sequences)

    def _texts(self, rows):
        """The `detokenize` signature's text of each list of token ids."""
        ids, counts = padded_rows(rows)
        outputs = self._invoke("detokenize", token_ids=tf.constant(ids), token_count=tf.constant(counts))
        return [text.decode("utf-8") for text in outputs["text"].numpy()]

    def _stream_whole(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences):
        completions = self.complete([prompt], max_new_tokens, sampling=sampling, truncate=truncate,
                                    num_return_sequences=num_return_sequences)
        for index, completion in enumerate(completions):
            yield Piece(index, completion.text, completion.token_count, completion.prompt_token_count,
                        completion.finish_reason)

    def _invoke(self, signature_name, **inputs):
        """A signature's outputs (tensors) for tensor `inputs`, called directly (not batched); a
        refusal as a ValueError."""
        try:
            return self.module.signatures[signature_name](**inputs)
        except tf.errors.InvalidArgumentError as error:
            raise self._refusal(error) from error


def _strings(texts):
    """A 1-D NumPy array of UTF-8 bytes, as a served request's string tensor arrives."""
    return np.array([text.encode("utf-8") for text in texts], object)


def _stop_arrays(stop, stop_token_ids):
    return {"stop": _strings(stop),
            "stop_token_ids": np.array(stop_token_ids, np.int32).reshape([len(stop_token_ids)])}


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
