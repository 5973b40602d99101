"""`ModelServer`: what `kgpt serve` serves from one folder. It loads an export (or a run directory)
and builds the two APIs on one request scheduler: `rest` (TF Serving's REST API, `kgpt.serving.rest`;
exports only) and `completions` (OpenAI's, `kgpt.serving.openai_api`; for a run directory, or an export
with a `generate` signature).
"""

import os

import tensorflow as tf

from kgpt.generation.generator import Generator
from kgpt.rundir import RunDirectory
from kgpt.serving.batching import ScheduledSignatures, Scheduler
from kgpt.serving.export import is_saved_model, saved_model_version_path
from kgpt.serving.openai_api import Completions
from kgpt.serving.protocol import APIError
from kgpt.serving.rest import RestAPI
from kgpt.serving.saved_model_generator import SavedModelGenerator
from kgpt.serving.signatures import GENERATE, TOKENIZE, read_signature_defs
from kgpt.serving.tokenization import Tokenization


def _at_once(function):
    return function()


class ModelServer:
    """Loads the highest version of `model_dir` (or a run directory) and builds its APIs.

    Args:
        model_dir: `saved_models/NAME` (numbered version folders), one version folder, or a run
            directory (OpenAI's API and the playground only: TF Serving's needs an export).
        name: the name in URLs; default: the model folder's name.
        max_concurrent_requests: model calls run at once; other requests wait up to `queue_timeout`
            seconds in a queue of at most `max_queued_requests` (then: 503).
        batching: run concurrent requests of one signature and equal options as one call (rows
            concatenated, at most `max_batch_size`, after waiting `batch_timeout` seconds for more),
            as TF Serving's `--enable_batching` does; greedy only, so the answers stay the same.

    Attributes:
        path, name, version: what is served (a run directory is version "1").
        scheduler: the `kgpt.serving.batching.Scheduler` every model call of both APIs goes through.
        rest: a `kgpt.serving.rest.RestAPI`, or None for a run directory.
        completions: a `kgpt.serving.openai_api.Completions`, or None for an export without `generate`.
        tokenization: a `kgpt.serving.tokenization.Tokenization`, or None for an export without
            `generate` and `tokenize`.
    """

    def __init__(self, model_dir, name=None, max_concurrent_requests=4, queue_timeout=30.0,
                 max_queued_requests=64, batching=True, max_batch_size=32, batch_timeout=0.005):
        import tensorflow_text  # noqa: F401  (registers the tokenizer ops)

        model_dir = os.path.normpath(model_dir)
        self.scheduler = Scheduler(
            max_concurrent_calls=max_concurrent_requests, max_queued_requests=max_queued_requests,
            timeout=queue_timeout, batching=batching, max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
        )
        self.rest, self.completions, self.tokenization = None, None, None
        if RunDirectory(model_dir).is_run() and not is_saved_model(model_dir):
            self.path, self.version = model_dir, "1"
            self.name = name or os.path.basename(os.path.abspath(model_dir))
            generator = Generator.from_run_directory(model_dir)
            self.completions = Completions(generator, self.name, self._schedule)
            self.tokenization = Tokenization(generator, self.name, self._schedule)
            return
        try:
            self.path = saved_model_version_path(model_dir)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error} (Nor is it a run directory: no config.json written by 'kgpt train'.)"
            ) from error
        version_dir = os.path.basename(self.path)
        numbered = version_dir.isdigit()
        self.version = version_dir if numbered else "1"
        self.name = name or os.path.basename(os.path.dirname(self.path) if numbered else self.path)
        module = tf.saved_model.load(self.path)
        signature_defs = read_signature_defs(self.path)
        calls = ScheduledSignatures(module, signature_defs, self.scheduler)
        self.rest = RestAPI(self.name, self.version, signature_defs, calls)
        if GENERATE.name in signature_defs:
            # Whole answers call the signatures through `calls`: batched like predict's.
            generator = SavedModelGenerator(self.path, module=module, call=calls)
            self.completions = Completions(generator, self.name, self._schedule, whole=_at_once)
            if TOKENIZE.name in signature_defs:  # its signature calls go through `calls`
                self.tokenization = Tokenization(generator, self.name, _at_once)

    def _schedule(self, function):
        """`function()` as one model call of the scheduler (its queue bound and timeout apply)."""
        return self.scheduler.run(lambda _: function(), {})

    def tf_serving(self):
        """`rest`, or the 404 that a run directory answers on TF Serving's routes."""
        if self.rest is None:
            raise APIError(
                f"{self.path} is a run directory: TF Serving's REST API needs an export ('kgpt export "
                f"{self.path} --name NAME', then 'kgpt serve saved_models/NAME'); this server answers "
                "/v1/completions, /v1/models and the playground at /.", status=404,
            )
        return self.rest

    def openai(self):
        """`completions`, or the 404 of an export without a `generate` signature."""
        if self.completions is None:
            raise APIError(
                f"{self.path} has no '{GENERATE.name}' signature, which completions need; serve a kgpt "
                "export or a run directory.", status=404, code="model_not_found",
            )
        return self.completions

    def tokenizer(self):
        """`tokenization`, or the 404 of an export without a `tokenize` signature."""
        if self.tokenization is None:
            raise APIError(
                f"{self.path} has no '{TOKENIZE.name}' signature (exported before it, or not by kgpt), "
                "which /tokenize, /detokenize and /tokenizer_info need; export the run again (kgpt "
                "export RUN --name NAME) or serve the run directory.", status=404, code="model_not_found",
            )
        return self.tokenization
