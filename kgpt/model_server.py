"""`ModelServer`: a loaded export (or run directory) answering TensorFlow Serving's REST requests,
with the request scheduler and the OpenAI completions it serves through `kgpt serve`.

One leniency against TF Serving: inputs a request leaves out take the SignatureDef's defaults.
"""

import base64
import json
import os
import re

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from kgpt.batching import Busy, Scheduler, batch_key, batch_rows
from kgpt.export import is_saved_model, saved_model_version_path
from kgpt.generate import Generator, SavedModelGenerator
from kgpt.openai_api import Completions, OpenAIError
from kgpt.rundir import RunDirectory
from kgpt.signatures import GENERATE, PADDED_OUTPUTS, SERVING_DEFAULT, read_signature_defs

PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
STATUS_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")
# Deep enough for any tensor (TensorFlow's rank limit is far below) inside a request object.
MAX_JSON_DEPTH = 100


class RequestError(Exception):
    """A request TF Serving would refuse: HTTP `status` and the `{"error": ...}` message."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _decode_value(value):
    """JSON -> Python values for `np.array`: `{"b64": ...}` objects become bytes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        raise RequestError("JSON objects are only allowed as {\"b64\": ...} inside a tensor.")
    if isinstance(value, list):
        return [_decode_value(item) for item in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _to_json(array):
    """NumPy -> JSON values; strings are UTF-8 (the export already replaced invalid bytes)."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        strings = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in array.flat]
        return np.array(strings, dtype=object).reshape(array.shape).tolist()
    return array.tolist()


def _error_message(error):
    """TF Serving's one-line message for a failed op: the assertion text, not the graph trace."""
    message = error.message
    match = re.search(r"assertion failed: \[(.*?)\] \[Condition", message, re.DOTALL)
    if match:
        return match.group(1).rstrip(". ")
    return message.splitlines()[-1] if "Graph execution error" in message else message


def parse_json(body):
    """The request object; nesting deeper than `MAX_JSON_DEPTH` is refused before it can recurse."""
    deep = f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels; send tensors as nested lists"
    try:
        value = json.loads(body)
    except RecursionError as error:  # deeper than Python's recursion limit
        raise RequestError(deep) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"JSON Parse error: {error}") from error
    level, containers = 0, [value]
    while containers:  # breadth first, one level at a time, without recursion
        level += 1
        if level > MAX_JSON_DEPTH:
            raise RequestError(deep)
        containers = [
            item for container in containers if isinstance(container, (list, dict))
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, (list, dict))
        ]
    return value


def _plain(value, signature_def, message):
    """`{the only input: value}`; a signature of several inputs refuses a plain value with `message`."""
    if len(signature_def.inputs) > 1:
        raise RequestError(f"{message} as multiple input tensors required as per tensorinfo_map")
    return {next(iter(signature_def.inputs)): value}


def _at_once(function):
    return function()


class ModelServer:
    """Loads the highest version of `model_dir` and answers TF Serving REST requests; its
    `completions` (a `kgpt.openai_api.Completions`, or None) answers OpenAI's.

    Args:
        model_dir: `saved_models/NAME` (numbered version folders), one version folder, or a run
            directory (OpenAI's API and the playground only: TF Serving's needs an export).
        name: the name in URLs; default: the model folder's name.
        max_concurrent_requests: model calls run at once; other requests wait up to `queue_timeout`
            seconds in a queue of at most `max_queued_requests` (then: 503).
        batching: run concurrent requests of one signature and equal options as one call (rows
            concatenated, at most `max_batch_size`, after waiting `batch_timeout` seconds for more),
            as TF Serving's `--enable_batching` does; greedy only, so the answers stay the same.
    """

    def __init__(self, model_dir, name=None, max_concurrent_requests=4, max_request_bytes=1 << 20,
                 queue_timeout=30.0, max_queued_requests=64, batching=True, max_batch_size=32,
                 batch_timeout=0.005):
        import tensorflow_text  # noqa: F401  (registers the tokenizer ops)

        model_dir = os.path.normpath(model_dir)
        self.max_request_bytes = max_request_bytes
        self.scheduler = Scheduler(
            max_concurrent_calls=max_concurrent_requests, max_queued_requests=max_queued_requests,
            timeout=queue_timeout, batching=batching, max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
        )
        self.module, self.signature_defs, self.completions = None, {}, None
        if RunDirectory(model_dir).is_run() and not is_saved_model(model_dir):
            self.path, self.version = model_dir, "1"
            self.name = name or os.path.basename(os.path.abspath(model_dir))
            generator = Generator.from_run_directory(model_dir)
            self.completions = Completions(generator, self.name, self._schedule)
        else:
            self._load_saved_model(model_dir, name)
            if GENERATE.name in self.signature_defs:
                # Whole answers call the signatures through `run_signature`: batched like predict's.
                generator = SavedModelGenerator(self.path, module=self.module, call=self.run_signature)
                self.completions = Completions(generator, self.name, self._schedule, whole=_at_once)
        self._batch_rows = {key: batch_rows(value) for key, value in self.signature_defs.items()}

    def _load_saved_model(self, model_dir, name):
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
        self.module = tf.saved_model.load(self.path)
        self.signature_defs = read_signature_defs(self.path)

    def run_signature(self, signature_name, arrays):
        """One signature call on `{input: array}` through the scheduler, batched with concurrent
        calls of equal options (predict's and OpenAI's alike); `OpenAIError` 503 when overloaded."""
        try:
            return self._scheduled(signature_name, arrays)
        except Busy as error:
            raise OpenAIError(str(error), status=503, kind="server_error", code="overloaded") from error

    def _scheduled(self, signature_name, arrays):
        """The signature's call through the scheduler, batched where `batch_key` allows (or Busy)."""
        rows = self._batch_rows[signature_name]
        return self.scheduler.run(
            self._call(signature_name), arrays, rows=rows, padded=PADDED_OUTPUTS,
            key=batch_key(signature_name, rows, arrays),
        )

    def _schedule(self, function):
        """`function()` as one model call of the scheduler (its queue bound and timeout apply)."""
        try:
            return self.scheduler.run(lambda _: function(), {})
        except Busy as error:
            raise OpenAIError(str(error), status=503, kind="server_error", code="overloaded") from error

    def _check_model(self, name, version):
        if self.module is None:
            raise RequestError(
                f"{self.path} is a run directory: TF Serving's REST API needs an export ('kgpt export "
                f"{self.path} --name NAME', then 'kgpt serve saved_models/NAME'); this server answers "
                "/v1/completions, /v1/models and the playground at /.", status=404,
            )
        if name != self.name or (version is not None and version != self.version):
            wanted = f"Specific({name}, {version})" if version else f"Latest({name})"
            raise RequestError(f"Servable not found for request: {wanted}", status=404)

    def status(self, name, version=None):
        self._check_model(name, version)
        status = {"error_code": "OK", "error_message": ""}
        return {"model_version_status": [{"version": self.version, "state": "AVAILABLE", "status": status}]}

    def metadata(self, name, version=None):
        self._check_model(name, version)
        signatures = {
            key: json_format.MessageToDict(value, preserving_proto_field_name=True)
            for key, value in self.signature_defs.items()
        }
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": self.version},
            "metadata": {"signature_def": {"signature_def": signatures}},
        }

    def predict(self, name, version, body):
        self._check_model(name, version)
        request = parse_json(body)
        if not isinstance(request, dict):
            raise RequestError("JSON Value: request must be an object with 'instances' or 'inputs'.")
        signature_name = request.get("signature_name") or SERVING_DEFAULT.name
        if signature_name not in self.signature_defs:
            raise RequestError(f'Serving signature name: "{signature_name}" not found in signature def')
        signature_def = self.signature_defs[signature_name]
        row_format = "instances" in request
        if row_format == ("inputs" in request):
            raise RequestError(
                "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"
                if row_format
                else "Missing 'inputs' or 'instances' key"
            )
        read, key = (self._rows, "instances") if row_format else (self._columns, "inputs")
        arrays = self._tensors(read(request[key], signature_def), signature_def)
        try:
            outputs = self._scheduled(signature_name, arrays)
        except Busy as error:
            raise RequestError(str(error), status=503) from error
        except tf.errors.InvalidArgumentError as error:
            raise RequestError(_error_message(error)) from error
        outputs = dict(sorted(outputs.items()))
        answer = "predictions" if row_format else "outputs"
        if len(outputs) == 1:
            return {answer: _to_json(next(iter(outputs.values())))}
        if row_format:
            rows = range(len(next(iter(outputs.values()))))
            return {answer: [{key: _to_json(value[row]) for key, value in outputs.items()} for row in rows]}
        return {answer: {key: _to_json(value) for key, value in outputs.items()}}

    def _call(self, signature_name):
        signature = self.module.signatures[signature_name]

        def call(arrays):
            outputs = signature(**{key: tf.constant(value) for key, value in arrays.items()})
            return {key: value.numpy() for key, value in outputs.items()}

        return call

    @staticmethod
    def _rows(instances, signature_def):
        if not isinstance(instances, list):
            raise RequestError("Excepting 'instances' to be an list/array")
        if not instances:
            raise RequestError("No values in 'instances' array")
        if not isinstance(instances[0], dict) or set(instances[0]) == {"b64"}:
            message = "instances is a plain list, but expecting list of objects"
            return _plain(instances, signature_def, message)
        columns = {}
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise RequestError(f"Expecting object but got list at item {index} of input list")
            for key, value in instance.items():
                columns.setdefault(key, []).append(value)
        if any(len(values) != len(instances) for values in columns.values()):
            raise RequestError("Every object in 'instances' needs the same named inputs.")
        return columns

    @staticmethod
    def _columns(inputs, signature_def):
        if isinstance(inputs, dict) and set(inputs) != {"b64"}:
            return inputs
        return _plain(inputs, signature_def, "inputs is a plain value/list, but expecting an object")

    @staticmethod
    def _tensors(inputs, signature_def):
        tensors = {}
        for key in inputs:
            if key not in signature_def.inputs:
                raise RequestError(
                    f"Inputs contains invalid name: {key}; expected {sorted(signature_def.inputs)}"
                )
        for key, info in signature_def.inputs.items():
            dtype = tf.dtypes.as_dtype(info.dtype)
            if key in inputs:
                try:
                    numpy_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
                    tensor = np.array(_decode_value(inputs[key]), dtype=numpy_dtype)
                    tf.constant(tensor, dtype)  # refuses what TensorFlow would
                except (TypeError, ValueError, OverflowError) as error:
                    message = f"Input {key!r} is not a valid {dtype.name} tensor: {error}"
                    raise RequestError(message) from error
            elif key in signature_def.defaults:
                tensor = tf.make_ndarray(signature_def.defaults[key])
            else:
                raise RequestError(f"Missing named input: {key} in 'inputs' object.")
            shape = tf.TensorShape(info.tensor_shape)
            if not shape.is_compatible_with(tensor.shape):
                raise RequestError(
                    f"Input {key!r} has shape {list(tensor.shape)}; the signature expects "
                    f"{shape.as_list() if shape.rank is not None else 'any'} (-1/None: any size)."
                )
            tensors[key] = tensor
        return tensors
