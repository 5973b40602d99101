"""vLLM's tokenizer routes beside OpenAI's completions (`/tokenize`, `/detokenize`,
`/tokenizer_info`): their typed requests and responses, and `Tokenization`, which answers them with
the served model's own tokenizer (an export's in-graph one, a run directory's in-process), so a
client counts tokens as the server does without a copy of the tokenizer.
"""

import dataclasses
import json

from kgpt.generation.generator import check_token_ids
from kgpt.serving.protocol import APIError


def _fields(request, known, served_name):
    """Checks a tokenizer request's JSON value: an object of `known` fields, its optional `model`
    the served one (else 404, as completions answer); raises `APIError`."""
    if not isinstance(request, dict):
        raise APIError("The request body must be a JSON object.")
    for name in request:
        if name not in known:
            raise APIError(f"Unrecognized request argument supplied: {name}", param=name)
    model = request.get("model")
    if model is not None and model != served_name:
        raise APIError(f"The model {model!r:.80} does not exist; this server serves "
                       f"{served_name!r}.", status=404, param="model", code="model_not_found")


@dataclasses.dataclass(frozen=True)
class TokenizeRequest:
    """`POST /tokenize`: `{"model"?, "prompt", "add_special_tokens"?}`.

    kgpt's tokenizers add no special tokens (GPT-2's convention): `add_special_tokens` is accepted
    and changes nothing, and "" is no token (generation starts an empty prompt from end-of-text).
    """

    prompt: str
    add_special_tokens: bool = True

    @classmethod
    def parse(cls, request, served_name):
        """Checks a request's JSON value; raises `APIError` naming the field."""
        _fields(request, {"model", "prompt", "add_special_tokens"}, served_name)
        if not isinstance(request.get("prompt"), str):
            got = "none" if "prompt" not in request else json.dumps(request["prompt"])[:80]
            raise APIError(f"prompt must be a string (the text to tokenize); got {got}.", param="prompt")
        add_special_tokens = request.get("add_special_tokens", True)
        if not isinstance(add_special_tokens, bool):
            raise APIError(f"add_special_tokens={json.dumps(add_special_tokens)[:80]} must be true or "
                           "false.", param="add_special_tokens")
        return cls(request["prompt"], add_special_tokens)


@dataclasses.dataclass(frozen=True)
class TokenizeResponse:
    """The prompt's token ids, their count and the model's context (vLLM's `max_model_len`)."""

    tokens: list
    max_model_len: int

    def to_json(self):
        return {"tokens": self.tokens, "count": len(self.tokens), "max_model_len": self.max_model_len}


@dataclasses.dataclass(frozen=True)
class DetokenizeRequest:
    """`POST /detokenize`: `{"model"?, "tokens": [ids]}`."""

    tokens: list

    @classmethod
    def parse(cls, request, served_name, vocabulary_size):
        """Checks a request's JSON value, its ids against `vocabulary_size`; raises `APIError`
        naming the field."""
        _fields(request, {"model", "tokens"}, served_name)
        tokens = request.get("tokens")
        if not isinstance(tokens, list):
            got = "none" if "tokens" not in request else json.dumps(tokens)[:80]
            raise APIError(f"tokens must be a list of token ids (integers); got {got}.", param="tokens")
        try:
            return cls(check_token_ids(tokens, vocabulary_size))
        except ValueError as error:
            raise APIError(str(error), param="tokens") from error


@dataclasses.dataclass(frozen=True)
class DetokenizeResponse:
    prompt: str

    def to_json(self):
        return {"prompt": self.prompt}


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """`GET /tokenizer_info`: what a client needs to count tokens as the server does.

    Args:
        kind: the tokenizer's kind (`char`, `bpe`, `gpt2`, `tiktoken:NAME`; None: an export older
            than its record), also vLLM's `tokenizer_class`.
        vocabulary_size: token ids run from 0 to `vocabulary_size - 1`.
        end_of_text, end_of_text_id: the end-of-text token (Hugging Face's `eos_token`), which
            ends a continuation and starts an empty prompt.
        max_model_len: the model's context (Hugging Face's `model_max_length`).
    """

    kind: str | None
    vocabulary_size: int
    end_of_text: str
    end_of_text_id: int
    max_model_len: int

    def to_json(self):
        return {"tokenizer_class": self.kind, "tokenizer_kind": self.kind,
                "vocabulary_size": self.vocabulary_size, "eos_token": self.end_of_text,
                "eos_token_id": self.end_of_text_id, "model_max_length": self.max_model_len,
                "max_model_len": self.max_model_len}


class Tokenization:
    """vLLM's tokenizer routes (`/tokenize`, `/detokenize`, `/tokenizer_info`) for one
    `TextGenerator` served as `name`, with its own tokenizer: an export's in-graph one (its
    `tokenize` and `detokenize` signatures), a run directory's in-process.

    Args:
        run: `run(function)` calls `function()` and returns its value; the server passes its
            scheduler for a run directory, and calls at once for an export, whose generator puts
            each signature call in the scheduler.

    Example:
        tokenization = Tokenization(Generator.from_run_directory("checkpoints/tiny"), "tiny")
        tokenization.tokenize(TokenizeRequest.parse({"prompt": "Hi"}, "tiny")).to_json()
    """

    def __init__(self, generator, name, run=None):
        self.generator = generator
        self.name = name
        self.run = run or (lambda function: function())

    def _run(self, function):
        try:
            return self.run(function)
        except ValueError as error:  # e.g. the export refused the ids
            raise APIError(str(error)) from error

    def info(self):
        generator = self.generator
        return TokenizerInfo(generator.tokenizer_kind, generator.vocabulary_size,
                             self._run(lambda: generator.end_of_text), generator.end_of_text_id,
                             generator.sequence_length)

    def tokenize(self, request):
        """`TokenizeResponse` of a checked `TokenizeRequest` (no special tokens are added)."""
        [tokens] = self._run(lambda: self.generator.tokenize([request.prompt]))
        return TokenizeResponse(tokens, self.generator.sequence_length)

    def detokenize(self, request):
        """`DetokenizeResponse` of a checked `DetokenizeRequest`."""
        [text] = self._run(lambda: self.generator.detokenize([request.tokens]))
        return DetokenizeResponse(text)
