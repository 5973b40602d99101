"""TF Serving's REST API on a loaded SavedModel: status, metadata and predict, with TF Serving's
request formats, answers and error messages.

One leniency against TF Serving: inputs a request leaves out take the SignatureDef's defaults.
"""

import base64
import re

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from kgpt.serving.protocol import APIError, MetadataResponse, PredictResponse, StatusResponse
from kgpt.serving.signatures import SERVING_DEFAULT


def _decode_value(value):
    """JSON -> Python values for `np.array`: `{"b64": ...}` objects become bytes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        raise APIError("JSON objects are only allowed as {\"b64\": ...} inside a tensor.")
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


def _plain(value, signature_def, message):
    """`{the only input: value}`; a signature of several inputs refuses a plain value with `message`."""
    if len(signature_def.inputs) > 1:
        raise APIError(f"{message} as multiple input tensors required as per tensorinfo_map")
    return {next(iter(signature_def.inputs)): value}


class RestAPI:
    """Answers TF Serving's REST requests for one loaded version of a model.

    Args:
        name: the model name in URLs.
        version: the served version (a string of digits).
        signature_defs: `{name: SignatureDef}` (`kgpt.serving.signatures.read_signature_defs`).
        call: `call(signature_name, {input: np.ndarray}) -> {output: np.ndarray}`, e.g. a
            `kgpt.serving.batching.ScheduledSignatures` (raising `Busy`, a 503, when overloaded).

    Example:
        api = RestAPI("tiny", "1", read_signature_defs(path), ScheduledSignatures(module, defs, Scheduler()))
        api.predict(PredictRequest.parse(ModelSpec("tiny"), b'{"instances": ["Hi"]}', "serving_default"))
    """

    default_signature = SERVING_DEFAULT.name

    def __init__(self, name, version, signature_defs, call):
        self.name = name
        self.version = version
        self.signature_defs = signature_defs
        self._call = call

    def check_model(self, model):
        """Raises `APIError` 404 unless `model` (a `ModelSpec`) names the served version."""
        if model.name != self.name or (model.version is not None and model.version != self.version):
            raise APIError(f"Servable not found for request: {model.describe()}", status=404)

    def status(self, model):
        self.check_model(model)
        return StatusResponse(self.version)

    def metadata(self, model):
        self.check_model(model)
        signatures = {
            key: json_format.MessageToDict(value, preserving_proto_field_name=True)
            for key, value in self.signature_defs.items()
        }
        return MetadataResponse(self.name, self.version, signatures)

    def predict(self, request):
        """A `PredictRequest`'s `PredictResponse`; `APIError` for what TF Serving would refuse."""
        self.check_model(request.model)
        if request.signature_name not in self.signature_defs:
            raise APIError(f'Serving signature name: "{request.signature_name}" not found in signature def')
        signature_def = self.signature_defs[request.signature_name]
        read = self._rows if request.row_format else self._columns
        arrays = self._tensors(read(request.values, signature_def), signature_def)
        try:
            outputs = self._call(request.signature_name, arrays)
        except tf.errors.InvalidArgumentError as error:
            raise APIError(_error_message(error)) from error
        return PredictResponse({key: _to_json(value) for key, value in outputs.items()}, request.row_format)

    @staticmethod
    def _rows(instances, signature_def):
        if not isinstance(instances, list):
            raise APIError("Excepting 'instances' to be an list/array")
        if not instances:
            raise APIError("No values in 'instances' array")
        if not isinstance(instances[0], dict) or set(instances[0]) == {"b64"}:
            message = "instances is a plain list, but expecting list of objects"
            return _plain(instances, signature_def, message)
        columns = {}
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise APIError(f"Expecting object but got list at item {index} of input list")
            for key, value in instance.items():
                columns.setdefault(key, []).append(value)
        if any(len(values) != len(instances) for values in columns.values()):
            raise APIError("Every object in 'instances' needs the same named inputs.")
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
                expected = sorted(signature_def.inputs)
                raise APIError(f"Inputs contains invalid name: {key}; expected {expected}")
        for key, info in signature_def.inputs.items():
            dtype = tf.dtypes.as_dtype(info.dtype)
            if key in inputs:
                try:
                    numpy_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
                    tensor = np.array(_decode_value(inputs[key]), dtype=numpy_dtype)
                    tf.constant(tensor, dtype)  # refuses what TensorFlow would
                except (TypeError, ValueError, OverflowError) as error:
                    raise APIError(f"Input {key!r} is not a valid {dtype.name} tensor: {error}") from error
            elif key in signature_def.defaults:
                tensor = tf.make_ndarray(signature_def.defaults[key])
            else:
                raise APIError(f"Missing named input: {key} in 'inputs' object.")
            shape = tf.TensorShape(info.tensor_shape)
            if not shape.is_compatible_with(tensor.shape):
                raise APIError(
                    f"Input {key!r} has shape {list(tensor.shape)}; the signature expects "
                    f"{shape.as_list() if shape.rank is not None else 'any'} (-1/None: any size)."
                )
            tensors[key] = tensor
        return tensors
