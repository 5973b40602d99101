"""Text in, text out: `Generator` (in-process) and `SavedModelGenerator` (an export) on one base.

Both take the same arguments and give the same result: the base class checks prompts and
options, reports prompts truncated to fit the context, and puts prompts back in front of their
continuations; a subclass only turns prompts into continuations. Token-level decoding lives in
`kgpt.decoding`, the sampling options in `kgpt.sampling`.
"""

import dataclasses
import os
import warnings

import tensorflow as tf

from kgpt.decoding import CausalRecomputation, Decoder, cached, check_options, default_max_new_tokens
from kgpt.export import is_saved_model, saved_model_version_path
from kgpt.sampling import SamplingOptions
from kgpt.rundir import RunDirectory


def _check_prompts(prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts given; pass at least one (an empty string is allowed).")
    return prompts


def _report_truncation(count, room, truncate):
    if not count:
        return
    message = (
        f"{count} prompt(s) longer than the {room} tokens that fit in the model's context "
        "before max_new_tokens"
    )
    if not truncate:
        raise ValueError(f"{message}; shorten them, lower max_new_tokens, or allow truncation.")
    warnings.warn(f"{message} were left-truncated to their last {room} tokens.", stacklevel=4)


def sampling_options(sampling=None, **fields):
    """`sampling` (default greedy `SamplingOptions()`) with `fields` replaced, validated.

    Args:
        sampling: a `SamplingOptions` or None.
        **fields: `SamplingOptions` fields (`temperature=0.8, seed=1`).

    Returns:
        A `SamplingOptions` (of `sampling`'s own class).
    """
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


class TextGenerator:
    """The text interface both generators share: checks, truncation reports, `keep_prompt`.

    Subclasses set `sequence_length` and `default_max_new_tokens` and implement `_continue`.
    """

    sequence_length = None
    default_max_new_tokens = None

    def generate(
        self,
        prompts,
        max_new_tokens=None,
        *,
        sampling=None,
        num_beams=1,
        length_penalty=1.0,
        num_return_sequences=1,
        keep_prompt=False,
        truncate=True,
        **sampling_fields,
    ):
        """Continues each prompt.

        Args:
            prompts: a list of strings (an empty string starts from end-of-text).
            max_new_tokens: tokens to add per prompt (fewer if end-of-text comes first);
                default `min(64, sequence_length // 2)` (for an export, its own default).
            sampling: a `kgpt.sampling.SamplingOptions` (default greedy).
            num_beams: > 1 for beam search, with `length_penalty`.
            num_return_sequences: continuations per prompt (samples or best beams).
            keep_prompt: return prompt + continuation.
            truncate: left-truncate prompts too long for the context (with a warning);
                False raises `ValueError` instead.
            **sampling_fields: `SamplingOptions` fields (`temperature=`, `top_k=`, `top_p=`,
                `seed=`), replacing those of `sampling`; `temperature=None` is greedy.

        Returns:
            `len(prompts) * num_return_sequences` strings, prompt-major, without end-of-text.
        """
        prompts = _check_prompts(prompts)
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        sampling = sampling_options(sampling, **sampling_fields)
        check_options(max_new_tokens, self.sequence_length, sampling, num_beams, num_return_sequences)
        texts = self._continue(
            prompts, max_new_tokens, sampling, num_beams, length_penalty, num_return_sequences,
            truncate,
        )
        if keep_prompt:
            texts = [prompts[i // num_return_sequences] + t for i, t in enumerate(texts)]
        return texts

    def _continue(self, prompts, max_new_tokens, sampling, num_beams, length_penalty,
                  num_return_sequences, truncate):
        """Continuations only, `len(prompts) * num_return_sequences` strings, prompt-major."""
        raise NotImplementedError


class Generator(TextGenerator):
    """Text in, text out for a trained model, in-process (the compiled `kgpt.decoding.Decoder`).

    Build it from a run directory with `Generator.from_run_directory`, or use `load_generator`,
    which also accepts an exported SavedModel.

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a key/value cache (the GRU
            baseline `kgpt.recurrent.RecurrentLanguageModel`), decoded by full recomputation.
        tokenizer: the run's tokenizer (`kgpt.tokenizer.load_tokenizer`).
        jit_compile: compile the decode loop with XLA (default: on for a model with a
            key/value cache, where on 2 CPU cores it is about 2x the graph without XLA at batch 1
            and 1.3x at batch 8, see benchmarks/RESULTS.md; off for recomputation).

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
        self.default_max_new_tokens = default_max_new_tokens(self.sequence_length)
        self.decoder = Decoder(model, tokenizer.end_of_text_id, jit_compile=jit_compile)

    @classmethod
    def from_run_directory(cls, run_dir, **kwargs):
        """Loads the run's model (`best.keras`, else `final.keras`) and `tokenizer/`.

        Args:
            run_dir: a run directory written by `kgpt train`.
            **kwargs: passed to `Generator` (`jit_compile`).

        Returns:
            A `Generator`.
        """
        run = RunDirectory(run_dir)
        return cls(run.load_model(), run.load_tokenizer(), **kwargs)

    def _continue(self, prompts, max_new_tokens, sampling, num_beams, length_penalty,
                  num_return_sequences, truncate):
        end = self.tokenizer.end_of_text_id
        room = self.sequence_length - max_new_tokens
        # Empty prompts start from end-of-text; prompts over `room` tokens keep their last `room`.
        ids = [list(row) or [end] for row in self.tokenizer.encode_documents(prompts)]
        _report_truncation(sum(len(row) > room for row in ids), room, truncate)
        rows = self.decoder(
            [row[-room:] for row in ids],
            max_new_tokens,
            sampling=sampling,
            num_beams=num_beams,
            length_penalty=length_penalty,
            num_return_sequences=num_return_sequences,
        )
        rows = [row[:-1] if row and row[-1] == end else row for row in rows]
        texts = self.tokenizer.detokenize(tf.ragged.constant(rows, dtype=tf.int32, ragged_rank=1))
        return [t.decode("utf-8") for t in texts.numpy()]


class SavedModelGenerator(TextGenerator):
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

    def _continue(self, prompts, max_new_tokens, sampling, num_beams, length_penalty,
                  num_return_sequences, truncate):
        if num_beams > 1:
            raise ValueError(
                "Beam search is not part of the exported SavedModel; run it from the run "
                "directory (kgpt generate RUN_DIR --beams N)."
            )
        repeated = [p for p in prompts for _ in range(num_return_sequences)]
        outputs = self.signature(
            prompts=tf.constant(repeated, tf.string),
            max_new_tokens=tf.constant(max_new_tokens, tf.int32),
            **sampling.graph_tensors(),  # greedy: temperature 1, top_k 1
        )
        _report_truncation(
            int(outputs["truncated"].numpy()[::num_return_sequences].sum()),
            self.sequence_length - max_new_tokens,
            truncate,
        )
        return [t.decode("utf-8") for t in outputs["text"].numpy()]


def load_generator(path, **kwargs):
    """A `SavedModelGenerator` for an exported model, else a `Generator` for a run directory.

    Args:
        path: a run directory, or `saved_models/NAME[/VERSION]`.
        **kwargs: passed to `Generator.from_run_directory` (`jit_compile`).

    Returns:
        A `TextGenerator`.
    """
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
