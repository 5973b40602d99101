"""An export behind the text interface of `kgpt.generation.generator.TextGenerator`
(`SavedModelGenerator`: whole answers from its `generate` and `beam_search` signatures, streams
through `prefill`, `step` and `detokenize`), and `load_generator` for an export or a run directory.
"""

import os
import re
import warnings

import numpy as np
import tensorflow as tf

from kgpt.generation.decoding import prompt_room
from kgpt.generation.generator import (
    Completion,
    Generator,
    TextGenerator,
    check_token_ids,
    report_truncation,
    well_formed,
)
from kgpt.generation.logprobs import TokenLogprobs, records
from kgpt.generation.streaming import Piece, padded_rows, stream_pieces
from kgpt.serving.export import is_saved_model, saved_model_version_path
from kgpt.serving.signatures import (
    BEAM_SEARCH,
    DETOKENIZE,
    GENERATE,
    PREFILL,
    PROMPT_LOGPROBS,
    STEP,
    STEP_STATE,
    TOKENIZE,
    Name,
)


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
        self.signature = self.module.signatures[GENERATE.name]
        self.sequence_length = int(self.module.sequence_length.numpy())
        self.vocabulary_size = int(self.module.vocabulary_size.numpy())
        self.default_max_new_tokens = int(self.module.default_max_new_tokens.numpy())
        self._inputs = set(self.signature.structured_input_signature[1])
        self._run_signature = call or self._signature_call

    def _signature_call(self, signature_name, inputs):
        outputs = self.module.signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        return {key: value.numpy() for key, value in outputs.items()}

    def _older(self, missing, what):
        """A ValueError for an export without the input or signature `missing`, which `what` needs."""
        return ValueError(f"The SavedModel {self.path} was exported before {what} (it has no {missing!r}); "
                          "export the run again (kgpt export), or run it from the run directory.")

    def _sampling_arrays(self, sampling):
        """The sampling inputs of `generate`, `prefill` and `step`; an export older than a field takes
        it only at its default (the penalties)."""
        arrays = {key: value.numpy() for key, value in sampling.graph_tensors().items()}
        defaults = type(sampling)().graph_inputs()
        for key in set(arrays) - self._inputs:
            if arrays[key] != defaults[key]:
                raise self._older(key, "penalties were part of exports")
            del arrays[key]
        return arrays

    def _logprobs_input(self, logprobs):
        """`{"logprobs": k}` (-1: none) for the signatures; `{}` for an export older than them."""
        if Name.LOGPROBS in self._inputs:
            return {Name.LOGPROBS: np.array(-1 if logprobs is None else logprobs, np.int32)}
        if logprobs is not None:
            raise self._older(Name.LOGPROBS, "log-probabilities were part of exports")
        return {}

    def _token_texts(self, ids):
        """Each token id's text alone (the `detokenize` signature)."""
        return self._texts([[token] for token in ids])

    def _continue(self, prompts, max_new_tokens, sampling, truncate, num_return_sequences, num_beams,
                  length_penalty, stop, stop_token_ids, logprobs):
        if num_beams > 1:
            return self._beam_search(prompts, max_new_tokens, truncate, num_return_sequences, num_beams,
                                     length_penalty, stop, stop_token_ids)
        stops = {} if Name.STOP not in self._inputs else _stop_arrays(stop, stop_token_ids)
        outputs = self._call(
            GENERATE.name,
            prompts=_strings([p for p in prompts for _ in range(num_return_sequences)]),
            max_new_tokens=np.array(max_new_tokens, np.int32),
            **self._sampling_arrays(sampling),
            **stops,
            **self._logprobs_input(logprobs),
        )
        truncated = outputs[Name.TRUNCATED][::num_return_sequences]
        report_truncation(int(truncated.sum()), prompt_room(self.sequence_length, max_new_tokens), truncate)
        counts = outputs[Name.TOKEN_COUNT]
        # An export without `stopped` (older than it) knows a stop only by a row ended early.
        stopped = outputs[Name.STOPPED] if Name.STOPPED in outputs else counts < max_new_tokens
        texts, prompt_counts = outputs[Name.TEXT], outputs[Name.PROMPT_TOKEN_COUNT]
        token_logprobs = [None] * len(texts)
        if logprobs is not None:
            rows = [ids[:count].tolist() for ids, count in zip(outputs[Name.TOKEN_IDS], counts)]
            token_logprobs = records(rows, _row_logprobs(outputs), logprobs, self._token_texts)
        return [
            Completion(text.decode("utf-8"), int(count), int(prompt_count), "stop" if ended else "length",
                       recorded)
            for text, count, prompt_count, ended, recorded
            in zip(texts, counts, prompt_counts, stopped, token_logprobs)
        ]

    def _prompt_logprobs(self, prompts, logprobs, max_new_tokens, room, truncate):
        """One call of the `prompt_logprobs` signature (batched by `kgpt serve` like `generate`)."""
        if PROMPT_LOGPROBS.name not in self.module.signatures:
            raise self._older(PROMPT_LOGPROBS.name, "log-probabilities were part of exports")
        outputs = self._call(PROMPT_LOGPROBS.name, prompts=_strings(prompts),
                             max_new_tokens=np.array(max_new_tokens, np.int32),
                             logprobs=np.array(logprobs, np.int32))
        report_truncation(int(outputs[Name.TRUNCATED].sum()), room, truncate)
        counts = outputs[Name.TOKEN_COUNT]
        rows = [ids[:count].tolist() for ids, count in zip(outputs[Name.TOKEN_IDS], counts)]
        return records(rows, _row_logprobs(outputs), logprobs, self._token_texts, first_is_prompt=True)

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
        report_truncation(int(outputs[Name.TRUNCATED].sum()), room, truncate)
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
            raise self._refusal(error) from error

    def _refusal(self, error):
        """A ValueError naming the reason of a signature's InvalidArgumentError."""
        match = re.search(r"assertion failed: \[(.*?)\]", error.message, re.DOTALL)
        reason = match.group(1) if match else error.message.splitlines()[0]
        return ValueError(f"The SavedModel {self.path} refused the request: {reason}.")

    def _stream(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, chunked, logprobs):
        """One piece per token step through the export's `prefill` and `step` signatures; with
        `chunked=False`, or an export older than them, one `generate` call and one piece per row."""
        if logprobs is not None and not chunked:
            raise ValueError("Log-probabilities are streamed token by token; leave chunked=True.")
        if chunked and STEP.name in self.module.signatures:
            return self._stream_steps(prompt, max_new_tokens, sampling, truncate, num_return_sequences,
                                      logprobs)
        if chunked:
            warnings.warn(
                f"The SavedModel {self.path} has no prefill and step signatures (exported before "
                "them): each continuation comes as one piece; export the run again to stream token "
                "by token.", stacklevel=3,
            )
        if logprobs is not None:
            raise self._older(STEP.name, "log-probabilities were part of exports")
        return self._stream_whole(prompt, max_new_tokens, sampling, truncate, num_return_sequences)

    def _stream_steps(self, prompt, max_new_tokens, sampling, truncate, num_return_sequences, logprobs):
        """`prefill`, then one `step` per token while the iterator is read (none once it is closed)."""
        options = {key: tf.constant(value) for key, value in self._sampling_arrays(sampling).items()}
        options.update({key: tf.constant(value) for key, value in self._logprobs_input(logprobs).items()})
        outputs = self._invoke(PREFILL.name, prompts=tf.constant([prompt] * num_return_sequences),
                               max_new_tokens=tf.constant(max_new_tokens, tf.int32), **options)
        room = prompt_room(self.sequence_length, max_new_tokens)
        report_truncation(int(outputs[Name.TRUNCATED].numpy()[0]), room, truncate)

        state = [key for key in STEP_STATE if key in outputs]  # an older export has no counts

        def step_outputs(outputs):
            if logprobs is None:
                return outputs[Name.TOKEN].numpy(), None
            return outputs[Name.TOKEN].numpy(), _logprobs(outputs)

        def steps(outputs):
            yield step_outputs(outputs)
            for _ in range(max_new_tokens - 1):
                # The state stays in tensors from one call to the next, the cache never copied.
                outputs = self._invoke(STEP.name, **{key: outputs[key] for key in state}, **options)
                yield step_outputs(outputs)

        end = int(self.module.end_of_text_id.numpy())
        prompt_tokens = int(outputs[Name.PROMPT_TOKEN_COUNT].numpy()[0])
        yield from stream_pieces(steps(outputs), self._texts, end, max_new_tokens, prompt_tokens,
                                 num_return_sequences, logprobs)

    def _texts(self, rows):
        """The `detokenize` signature's text of each list of token ids."""
        ids, counts = padded_rows(rows)
        inputs = {Name.TOKEN_IDS: tf.constant(ids), Name.TOKEN_COUNT: tf.constant(counts)}
        outputs = self._invoke(DETOKENIZE.name, **inputs)
        return [text.decode("utf-8") for text in outputs[Name.TEXT].numpy()]

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

    # The export's own tokenizer behind the text interface (`kgpt serve`'s tokenizer routes).

    @property
    def tokenizer_kind(self):
        """The kind of the export's tokenizer (`char`, `bpe`, `gpt2`, `tiktoken:NAME`); None for an
        export older than the record."""
        kind = getattr(self.module, "tokenizer_kind", None)
        return None if kind is None else kind.numpy().decode("utf-8")

    @property
    def end_of_text_id(self):
        return int(self.module.end_of_text_id.numpy())

    @property
    def end_of_text(self):
        """The end-of-text token's text, as the export's `detokenize` signature writes it."""
        return self.detokenize([[self.end_of_text_id]])[0]

    def tokenize(self, texts):
        """Each text's token ids from the export's `tokenize` signature (its in-graph tokenizer, as
        `generate` reads a prompt before truncation; "" is `[]`)."""
        if TOKENIZE.name not in self.module.signatures:
            raise ValueError(
                f"The SavedModel {self.path} has no {TOKENIZE.name} signature (exported before it); "
                "export the run again (kgpt export) to tokenize with it."
            )
        outputs = self._call(TOKENIZE.name, prompts=_strings([well_formed(text) for text in texts]))
        ids, counts = outputs[Name.TOKEN_IDS], outputs[Name.TOKEN_COUNT]
        return [row[:count].tolist() for row, count in zip(ids, counts)]

    def detokenize(self, rows):
        """The text of each list of token ids, from the export's `detokenize` signature (ids from 0 to
        `vocabulary_size - 1`, else ValueError)."""
        ids, counts = padded_rows([check_token_ids(row, self.vocabulary_size) for row in rows])
        outputs = self._call(DETOKENIZE.name, **{Name.TOKEN_IDS: ids, Name.TOKEN_COUNT: counts})
        return [text.decode("utf-8") for text in outputs[Name.TEXT]]


def _logprobs(outputs):
    """The `TokenLogprobs` of a signature's `token_logprobs`, `top_token_ids` and `top_logprobs`."""
    names = (Name.TOKEN_LOGPROBS, Name.TOP_TOKEN_IDS, Name.TOP_LOGPROBS)
    return TokenLogprobs(*(np.asarray(outputs[name]) for name in names))


def _row_logprobs(outputs):
    """`_logprobs` of `(rows, tokens)` outputs, one `TokenLogprobs` per row."""
    recorded = _logprobs(outputs)
    return [TokenLogprobs(*(value[row] for value in recorded)) for row in range(len(recorded.chosen))]


def _strings(texts):
    """A 1-D NumPy array of UTF-8 bytes, as a served request's string tensor arrives."""
    return np.array([text.encode("utf-8") for text in texts], object)


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
        generate("checkpoints/shakespeare_char", ["ROMEO:"], max_new_tokens=40)
    """
    return load_generator(path).generate(prompts, **options)
