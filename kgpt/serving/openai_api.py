"""OpenAI's completions API over a `kgpt.generation.generator.TextGenerator`: `Completions` answers checked
`kgpt.serving.protocol.CompletionRequest`s whole (every prompt and choice decoded as one batch) or streamed
(chunk by chunk, stop sequences applied to the text), and lists the served model.

Requests follow OpenAI's legacy completions API (see `CompletionRequest.parse`); refusals are
`kgpt.serving.protocol.APIError`s, which `kgpt serve` answers in OpenAI's error shape.
"""

import dataclasses
import secrets
import time

from kgpt.generation.stopping import StopText
from kgpt.serving.protocol import (
    APIError,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionResponse,
    ModelList,
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
        prompt and choice, the stops ending rows early; with `echo` and `logprobs` (or `max_tokens`
        0) one batched forward pass over the prompts scores them first."""
        rows = 1 if request.sampling.temperature is None else request.n  # greedy: n copies of one

        def answer():
            scored = self._score(request) if _scores_prompts(request) else None
            if not request.max_tokens:  # echo alone: the prompts scored, nothing generated
                return scored, [None] * (len(request.prompts) * rows)
            return scored, self.generator.complete(
                request.prompts, request.max_tokens, sampling=request.sampling,
                num_return_sequences=rows, stop=request.stops, **_logprobs_option(request),
            )

        try:
            scored, completions = self.whole(answer)
        except ValueError as error:  # e.g. an export older than stop sequences refused the request
            raise APIError(str(error)) from error
        copies = request.n // rows
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for number, completion in enumerate(completions):
            prompt = number // rows
            echoed = self._echo(request, prompt, scored)
            if completion is None:
                choice, count = echoed, len(scored[prompt])
            else:
                choice = _joined(echoed, completion.text, completion.finish_reason, completion.logprobs,
                                 len(request.prompts[prompt]), request.logprobs is not None)
                count = completion.prompt_token_count
                completion_tokens += copies * completion.token_count
            prompt_tokens += count if number % rows == 0 else 0
            choices.extend(dataclasses.replace(choice, index=number * copies + copy)
                           for copy in range(copies))
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return CompletionResponse(**self._head(), choices=choices, usage=usage)

    def _score(self, request):
        """The prompts' `TokenLogprob`s (a tuple per prompt, its tokens as decoded), one forward
        pass for all."""
        return self.generator.prompt_logprobs(request.prompts, logprobs=request.logprobs or 0,
                                              max_new_tokens=request.max_tokens)

    @staticmethod
    def _echo(request, prompt, scored):
        """What an echo puts before prompt `prompt`'s continuations (a `CompletionChoice` with its
        logprobs if asked; "length" as its finish: with `max_tokens` 0 it is the whole choice, as
        vLLM answers it), or None without echo."""
        if not request.echo:
            return None
        text = request.prompts[prompt]
        logprobs = None
        if request.logprobs is not None:
            tokens = scored[prompt]
            logprobs = ChoiceLogprobs.of(tokens, len(text) - sum(len(token.text) for token in tokens))
        return CompletionChoice(text, 0, "length" if not request.max_tokens else None, logprobs)

    def stream(self, request):
        """A streamed answer: an iterator of `CompletionResponse` chunks, decoded prompt by prompt,
        one scheduler call per step as it is read. Its first chunk is computed now (so a refusal
        is still an HTTP error, not an event); closing it stops the decoding. An echo's prompts
        are scored first, as a whole answer scores them (one call, not nested in a step's)."""
        try:
            scored = self.whole(lambda: self._score(request)) if _scores_prompts(request) else None
            events = self._events(request, scored)
            first = self.run(lambda: next(events, None))
        except ValueError as error:
            raise APIError(str(error)) from error
        return self._chunks(request, self._head(), first, events)

    def _events(self, request, scored):
        """`(choice, prompt_tokens, completion_tokens)` per piece (a `CompletionChoice` of what it
        adds), stops applied; prompt-major choices, n copies of a greedy continuation. With echo,
        each choice's first is its prompt (with `scored`, `_score`'s, where it is needed)."""
        greedy = request.sampling.temperature is None
        copies = request.n if greedy else 1
        rows = 1 if greedy else request.n
        for number, prompt in enumerate(request.prompts):
            echoed = self._echo(request, number, scored)
            if echoed is not None:
                count = None if scored is None else len(scored[number])
                for index in range(number * request.n, (number + 1) * request.n):
                    yield dataclasses.replace(echoed, index=index), count, 0
            if not request.max_tokens:
                continue
            pieces = self.generator.stream(prompt, request.max_tokens, sampling=request.sampling,
                                           num_return_sequences=rows, **_logprobs_option(request))
            stops = [StopText(request.stops) for _ in range(rows)]
            offsets = [len(prompt)] * rows  # the completion's first token follows the prompt
            try:
                for piece in pieces:
                    stop = stops[piece.index]
                    if stop.stopped:
                        continue
                    text = stop.add(piece.text, final=piece.finish_reason is not None)
                    reason = "stop" if stop.stopped else piece.finish_reason
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = ChoiceLogprobs.of(piece.logprobs or (), offsets[piece.index])
                        offsets[piece.index] += sum(len(token.text) for token in logprobs.tokens)
                    if not text and reason is None and not (logprobs and logprobs.tokens):
                        continue  # held back by a stop that may follow, or inside a character
                    for copy in range(copies):
                        index = (number * rows + piece.index) * copies + copy
                        choice = CompletionChoice(text, index, reason, logprobs)
                        yield choice, piece.prompt_token_count, piece.token_count
                    if all(stop.stopped for stop in stops):
                        break
            finally:
                pieces.close()

    def _chunks(self, request, head, first, events):
        prompt_tokens, counts = {}, {}
        try:
            event = first
            while event is not None:
                choice, prompt_count, count = event
                if prompt_count is not None:
                    prompt_tokens[choice.index // request.n] = prompt_count
                counts[choice.index] = count
                yield CompletionResponse(**head, choices=[choice])
                event = self.run(lambda: next(events, None))
        finally:
            events.close()
        if request.include_usage:
            usage = Usage(sum(prompt_tokens.values()), sum(counts.values()))
            yield CompletionResponse(**head, choices=[], usage=usage)


def _scores_prompts(request):
    """Whether an answer scores its prompts: an echo with logprobs, or with `max_tokens` 0 (whose
    usage counts the prompts' tokens)."""
    return request.echo and (request.logprobs is not None or not request.max_tokens)


def _logprobs_option(request):
    """`complete`'s and `stream`'s `logprobs` keyword, only where the request asks for them (a
    generator without them still answers every other request)."""
    return {} if request.logprobs is None else {"logprobs": request.logprobs}


def _joined(echoed, text, finish_reason, tokens, start, with_logprobs):
    """A continuation as a `CompletionChoice`, after its echoed prompt if any: texts and logprobs
    joined, the continuation's token offsets from `start` (the prompt's length)."""
    logprobs = ChoiceLogprobs.of(tokens or (), start) if with_logprobs else None
    if echoed is None:
        return CompletionChoice(text, 0, finish_reason, logprobs)
    if logprobs is not None:
        logprobs = ChoiceLogprobs(echoed.logprobs.tokens + logprobs.tokens,
                                  echoed.logprobs.text_offset + logprobs.text_offset)
    return CompletionChoice(echoed.text + text, 0, finish_reason, logprobs)
