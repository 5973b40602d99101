"""OpenAI's completions API over a `kgpt.generation.generator.TextGenerator`: `Completions` answers checked
`kgpt.serving.protocol.CompletionRequest`s whole (every prompt and choice decoded as one batch) or streamed
(chunk by chunk, stop sequences applied to the text), and lists the served model.

Requests follow OpenAI's legacy completions API (see `CompletionRequest.parse`); refusals are
`kgpt.serving.protocol.APIError`s, which `kgpt serve` answers in OpenAI's error shape.
`Tokenization` answers vLLM's tokenizer routes beside them, with the served model's own tokenizer.
"""

import secrets
import time

from kgpt.generation.stopping import StopText
from kgpt.serving.protocol import (
    APIError,
    CompletionChoice,
    CompletionResponse,
    DetokenizeResponse,
    ModelList,
    TokenizeResponse,
    TokenizerInfo,
    Usage,
)


class Completions:
    """Answers the `/v1` routes for one `TextGenerator` served as `name`.

    Args:
        generator: a `kgpt.generation.generator.Generator` or `SavedModelGenerator`.
        run: `run(function)` calls `function()` and returns its value; the server passes its
            scheduler here (a bounded queue, a limit on model calls at once).
        whole: runs a whole answer's `complete` call like `run` (default: `run`); the server runs
            it at once for an export, whose generator puts each signature call in the scheduler.

    Example:
        completions = Completions(Generator.from_run_directory("checkpoints/tiny"), "tiny")
        completions.create(CompletionRequest.parse({"model": "tiny", "prompt": "Hi"}, "tiny")).to_json()
    """

    def __init__(self, generator, name, run=None, whole=None):
        self.generator = generator
        self.name = name
        self.created = int(time.time())
        self.run = run or (lambda function: function())
        self.whole = whole or self.run

    def models(self):
        return ModelList(self.name, self.created)

    def _head(self):
        return dict(id=f"cmpl-{secrets.token_hex(12)}", created=int(time.time()), model=self.name)

    def create(self, request):
        """A whole answer (`CompletionResponse`): one call of the generator's batched decode for every
        prompt and choice, the stops ending rows early."""
        rows = 1 if request.sampling.temperature is None else request.n  # greedy: n copies of one
        try:
            completions = self.whole(lambda: self.generator.complete(
                request.prompts, request.max_tokens, sampling=request.sampling,
                num_return_sequences=rows, stop=request.stops,
            ))
        except ValueError as error:  # e.g. an export older than stop sequences refused the request
            raise APIError(str(error)) from error
        copies = request.n // rows
        choices = [
            CompletionChoice(completion.text, number * copies + copy, completion.finish_reason)
            for number, completion in enumerate(completions) for copy in range(copies)
        ]
        usage = Usage(
            prompt_tokens=sum(c.prompt_token_count for c in completions[::rows]),
            completion_tokens=copies * sum(c.token_count for c in completions),
        )
        return CompletionResponse(**self._head(), choices=choices, usage=usage)

    def stream(self, request):
        """A streamed answer: an iterator of `CompletionResponse` chunks, decoded prompt by prompt,
        one scheduler call per step as it is read. Its first chunk is computed now (so a refusal
        is still an HTTP error, not an event); closing it stops the decoding."""
        events = self._events(request)
        try:
            first = self.run(lambda: next(events, None))
        except ValueError as error:
            raise APIError(str(error)) from error
        return self._chunks(request, self._head(), first, events)

    def _events(self, request):
        """`(index, text, finish_reason, prompt_tokens, completion_tokens)` per piece, stops applied;
        prompt-major choices, n copies of a greedy continuation."""
        greedy = request.sampling.temperature is None
        copies = request.n if greedy else 1
        for number, prompt in enumerate(request.prompts):
            rows = 1 if greedy else request.n
            pieces = self.generator.stream(prompt, request.max_tokens, sampling=request.sampling,
                                           num_return_sequences=rows)
            stops = [StopText(request.stops) for _ in range(rows)]
            try:
                for piece in pieces:
                    stop = stops[piece.index]
                    if stop.stopped:
                        continue
                    text = stop.add(piece.text, final=piece.finish_reason is not None)
                    reason = "stop" if stop.stopped else piece.finish_reason
                    if not text and reason is None:
                        continue
                    for copy in range(copies):
                        index = (number * rows + piece.index) * copies + copy
                        yield index, text, reason, piece.prompt_token_count, piece.token_count
                    if all(stop.stopped for stop in stops):
                        break
            finally:
                pieces.close()

    def _chunks(self, request, head, first, events):
        prompt_tokens, counts = {}, {}
        try:
            event = first
            while event is not None:
                index, text, reason, prompt_count, count = event
                prompt_tokens[index // request.n] = prompt_count
                counts[index] = count
                yield CompletionResponse(**head, choices=[CompletionChoice(text, index, reason)])
                event = self.run(lambda: next(events, None))
        finally:
            events.close()
        if request.include_usage:
            usage = Usage(sum(prompt_tokens.values()), sum(counts.values()))
            yield CompletionResponse(**head, choices=[], usage=usage)


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
