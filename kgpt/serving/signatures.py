"""The serving contract as data: every signature of a kgpt export, with its inputs and outputs.

`kgpt.serving.serving_module` builds its signatures from these declarations and checks its
functions against them; `SavedModelGenerator`, `kgpt.serving.batching` and `kgpt serve` read
names, request-wide inputs and padded outputs from here instead of spelling them.
`read_signature_defs` reads what a SavedModel on disk declares.

Example:
    GENERATE.name, [spec.name for spec in GENERATE.inputs]  # "generate", ["prompts", ...]
    outputs[Name.TEXT]  # a signature call's text
"""

import dataclasses
import enum
import os

from kgpt.generation.sampling import SamplingOptions


class Name:
    """The input and output names of the signatures, as constants (plain strings, as TensorFlow and
    JSON take them)."""

    PROMPTS = "prompts"
    TEXTS = "texts"
    MAX_NEW_TOKENS = "max_new_tokens"
    SEED = "seed"  # the `SamplingOptions` field that no greedy request uses
    NUM_BEAMS = "num_beams"
    LENGTH_PENALTY = "length_penalty"
    STOP = "stop"
    STOP_TOKEN_IDS = "stop_token_ids"
    TEXT = "text"
    TOKEN_IDS = "token_ids"
    TOKEN_COUNT = "token_count"
    PROMPT_TOKEN_COUNT = "prompt_token_count"
    TRUNCATED = "truncated"
    STOPPED = "stopped"
    BEAM_TEXT = "beam_text"
    BEAM_TOKEN_COUNT = "beam_token_count"
    BEAM_STOPPED = "beam_stopped"
    LOG_LIKELIHOOD = "log_likelihood"
    PERPLEXITY = "perplexity"
    LOGITS = "logits"
    TOKEN = "token"  # the decode state that `prefill` and `step` return and `step` takes
    CACHE = "cache"
    POSITION = "position"
    OFFSET = "offset"
    RECENT = "recent"
    COUNTS = "counts"
    SEEN = "seen"
    LOGPROBS = "logprobs"  # -1: none; 0 to MAX_LOGPROBS: the chosen tokens' and this many alternatives
    TOKEN_LOGPROBS = "token_logprobs"
    TOP_TOKEN_IDS = "top_token_ids"
    TOP_LOGPROBS = "top_logprobs"


class Role(enum.Enum):
    """How an input's values relate to the request's rows."""

    ROWS = "rows"  # one value per row (a prompt); the batch axis
    OPTION = "option"  # one scalar for the whole request
    REQUEST_LIST = "request_list"  # one list (shape [n]) for the whole request, such as stop sequences
    STATE = "state"  # the decode state `step` takes back from `prefill` or the last `step`


class _ExportDefault:
    """The default of an input that each export sets (e.g. its `max_new_tokens`)."""

    def __repr__(self):
        return "EXPORT_DEFAULT"


EXPORT_DEFAULT = _ExportDefault()
# `beam_search`: beams per prompt when a request gives none.
DEFAULT_BEAMS = 4


@dataclasses.dataclass(frozen=True)
class Input:
    """One input of a signature.

    Args:
        name: the input's name in the SignatureDef (and the serving function's argument).
        dtype: a TensorFlow dtype name ("string", "int32", "float32", "bool"); None with `shape`
            None: set by the exported model (the packed cache).
        shape: dimensions, None for any size: `(None,)` rows or a list, `()` a scalar.
        role: a `Role`.
        default: the value recorded in the SignatureDef when a request leaves the input out;
            None: required; `EXPORT_DEFAULT`: set by each export.
    """

    name: str
    dtype: str
    shape: tuple
    role: Role = Role.OPTION
    default: object = None


@dataclasses.dataclass(frozen=True)
class Output:
    """One output of a signature; its first axis is the rows (but for the decode state's scalars).

    Args:
        count: padded along axis 1 to the longest row's value of this output (`token_ids` by
            `token_count`), so a batching server cuts each request's part back to its own width.
        request_width: axis 1's width is set by the request's options (`num_beams`), so it is
            equal within a batch.
        asked_by: the input that asks for this output (`logprobs`); at that input's default the
            output is empty.
    """

    name: str
    dtype: str
    shape: tuple
    count: str | None = None
    request_width: bool = False
    asked_by: str | None = None


@dataclasses.dataclass(frozen=True)
class Signature:
    """A signature: its name and its inputs and outputs, in order (the inputs in argument order)."""

    name: str
    inputs: tuple
    outputs: tuple

    def input(self, name):
        return next(spec for spec in self.inputs if spec.name == name)

    def output(self, name):
        return next(spec for spec in self.outputs if spec.name == name)

    def defaults(self, **export_values):
        """`{input: default}` of the inputs a request may leave out, `EXPORT_DEFAULT`s taken from
        `export_values` (`max_new_tokens=64`)."""
        defaults = {}
        for spec in self.inputs:
            if spec.default is EXPORT_DEFAULT:
                if spec.name not in export_values:
                    raise ValueError(f"The {self.name} signature needs the export's {spec.name}.")
                defaults[spec.name] = export_values[spec.name]
            elif spec.default is not None:
                defaults[spec.name] = spec.default
        return defaults


_STOPS = (
    Input(Name.STOP, "string", (None,), Role.REQUEST_LIST, ()),
    Input(Name.STOP_TOKEN_IDS, "int32", (None,), Role.REQUEST_LIST, ()),
)
_CONTINUATIONS = (
    Output(Name.TEXT, "string", (None,)),
    Output(Name.TOKEN_IDS, "int32", (None, None), count=Name.TOKEN_COUNT),
    Output(Name.TOKEN_COUNT, "int32", (None,)),
    Output(Name.PROMPT_TOKEN_COUNT, "int32", (None,)),
    Output(Name.TRUNCATED, "bool", (None,)),
    Output(Name.STOPPED, "bool", (None,)),
)
_PROMPTS = Input(Name.PROMPTS, "string", (None,), Role.ROWS)
_LOGPROBS = Input(Name.LOGPROBS, "int32", (), Role.OPTION, -1)


def _logprobs_outputs(shape, asked_by=None):
    """The log-probabilities of tokens of `shape` (`(None,)` one per row, `(None, None)` per
    token of each row, padded to the longest `token_count`) and their best alternatives."""
    count = Name.TOKEN_COUNT if len(shape) > 1 else None
    return (
        Output(Name.TOKEN_LOGPROBS, "float32", shape, count=count, asked_by=asked_by),
        Output(Name.TOP_TOKEN_IDS, "int32", shape + (None,), count=count, asked_by=asked_by),
        Output(Name.TOP_LOGPROBS, "float32", shape + (None,), count=count, asked_by=asked_by),
    )


def _sampling_inputs(sampling_type):
    """One scalar input per field of the sampling options class, with its recorded default."""
    return tuple(
        Input(field.name, field.metadata["dtype"], (), Role.OPTION, field.metadata["signature_default"])
        for field in dataclasses.fields(sampling_type)
    )


_MAX_NEW_TOKENS = Input(Name.MAX_NEW_TOKENS, "int32", (), Role.OPTION, EXPORT_DEFAULT)


def generate_signature(sampling_type=SamplingOptions):
    """`generate`: prompts, `max_new_tokens`, the sampling fields, stop sequences, `logprobs`; the
    continuations and, with `logprobs` >= 0, their tokens' log-probabilities (else of width 0)."""
    return Signature("generate", (
        _PROMPTS, _MAX_NEW_TOKENS, *_sampling_inputs(sampling_type), *_STOPS, _LOGPROBS,
    ), _CONTINUATIONS + _logprobs_outputs((None, None), asked_by=Name.LOGPROBS))


def _state(role=Role.STATE):
    """The decode state (`kgpt.generation.decoding.DecodeState` and the token to feed), as
    `prefill` and `step` output it and `step` takes it: the cache packed in one tensor whose dtype
    and shape the model sets."""
    spec = Input if role is Role.STATE else Output
    extra = {"role": role} if role is Role.STATE else {}
    return (
        spec(Name.TOKEN, "int32", (None,), **extra), spec(Name.CACHE, None, None, **extra),
        spec(Name.POSITION, "int32", (), **extra), spec(Name.OFFSET, "int32", (), **extra),
        spec(Name.RECENT, "int32", (None, None), **extra),
        spec(Name.COUNTS, "int32", (None, None), **extra), spec(Name.SEEN, "bool", (None, None), **extra),
    )


def prefill_signature(sampling_type=SamplingOptions):
    """`prefill`: prompts of one token count, `max_new_tokens`, the sampling fields, `logprobs`;
    the first token, its log-probabilities (zeros unless `logprobs` >= 0) and the state `step` takes."""
    return Signature("prefill", (_PROMPTS, _MAX_NEW_TOKENS, *_sampling_inputs(sampling_type), _LOGPROBS),
                     _state(role=None) + _logprobs_outputs((None,)) + (
        Output(Name.PROMPT_TOKEN_COUNT, "int32", (None,)), Output(Name.TRUNCATED, "bool", (None,)),
    ))


def step_signature(sampling_type=SamplingOptions):
    """`step`: the state, the sampling fields and `logprobs`; the next token, its log-probabilities
    and the state."""
    return Signature("step", _state() + _sampling_inputs(sampling_type) + (_LOGPROBS,),
                     _state(role=None) + _logprobs_outputs((None,)))


def contract_for(signature, sampling_type):
    """`signature` with the sampling fields of `sampling_type` where it has them."""
    makers = {"generate": generate_signature, "prefill": prefill_signature, "step": step_signature}
    return makers[signature.name](sampling_type) if signature.name in makers else signature


SERVING_DEFAULT = Signature("serving_default", (_PROMPTS,), _CONTINUATIONS)
GENERATE = generate_signature()
PREFILL = prefill_signature()
STEP = step_signature()
# The outputs of `prefill` and `step` that the next `step` takes as its inputs of the same names.
STEP_STATE = tuple(spec.name for spec in STEP.inputs if spec.role is Role.STATE)
DETOKENIZE = Signature("detokenize", (
    Input(Name.TOKEN_IDS, "int32", (None, None), Role.ROWS),
    Input(Name.TOKEN_COUNT, "int32", (None,), Role.ROWS),
), (Output(Name.TEXT, "string", (None,)),))
BEAM_SEARCH = Signature("beam_search", (
    _PROMPTS,
    Input(Name.MAX_NEW_TOKENS, "int32", (), Role.OPTION, EXPORT_DEFAULT),
    Input(Name.NUM_BEAMS, "int32", (), Role.OPTION, DEFAULT_BEAMS),
    Input(Name.LENGTH_PENALTY, "float32", (), Role.OPTION, 1.0),
    *_STOPS,
), _CONTINUATIONS + (
    Output(Name.BEAM_TEXT, "string", (None, None), request_width=True),
    Output(Name.BEAM_TOKEN_COUNT, "int32", (None, None), request_width=True),
    Output(Name.BEAM_STOPPED, "bool", (None, None), request_width=True),
))
SCORE = Signature("score", (Input(Name.TEXTS, "string", (None,), Role.ROWS),), (
    Output(Name.LOG_LIKELIHOOD, "float32", (None,)),
    Output(Name.TOKEN_COUNT, "int32", (None,)),
    Output(Name.PERPLEXITY, "float32", (None,)),
))
PROMPT_LOGPROBS = Signature("prompt_logprobs", (
    _PROMPTS, Input(Name.MAX_NEW_TOKENS, "int32", (), Role.OPTION, 0), Input(Name.LOGPROBS, "int32", (),
                                                                             Role.OPTION, 0),
), (
    Output(Name.TOKEN_IDS, "int32", (None, None), count=Name.TOKEN_COUNT),
    Output(Name.TOKEN_COUNT, "int32", (None,)),
    *_logprobs_outputs((None, None)),
    Output(Name.TRUNCATED, "bool", (None,)),
))
LOGITS = Signature("logits", (Input(Name.TOKEN_IDS, "int32", (None, None), Role.ROWS),), (
    Output(Name.LOGITS, "float32", (None, None, None)),
))
# The export's own tokenization of each prompt (no special tokens added, "" is no token), so that
# a client counts tokens as the server does.
TOKENIZE = Signature("tokenize", (_PROMPTS,), (
    Output(Name.TOKEN_IDS, "int32", (None, None), count=Name.TOKEN_COUNT),
    Output(Name.TOKEN_COUNT, "int32", (None,)),
))
SIGNATURES = (SERVING_DEFAULT, GENERATE, BEAM_SEARCH, SCORE, PROMPT_LOGPROBS, LOGITS, PREFILL, STEP,
              DETOKENIZE, TOKENIZE)

# What a batching server needs to know of any signature, by input and output name.
PADDED_OUTPUTS = {o.name: o.count for s in SIGNATURES for o in s.outputs if o.count}
REQUEST_LISTS = frozenset(i.name for s in SIGNATURES for i in s.inputs if i.role is Role.REQUEST_LIST)
REQUEST_WIDTH_OUTPUTS = frozenset(o.name for s in SIGNATURES for o in s.outputs if o.request_width)
# `{(signature, output): (input, default)}`: outputs empty unless a request sets that input.
ASKED_OUTPUTS = {(s.name, o.name): (o.asked_by, s.input(o.asked_by).default)
                 for s in SIGNATURES for o in s.outputs if o.asked_by}


def check_outputs(signature, outputs):
    """Raises `ValueError` unless `outputs` (`{name: tensor or tf.TensorSpec}`, e.g. a concrete
    function's `structured_outputs`) are `signature`'s: the same names, dtypes and compatible shapes."""
    import tensorflow as tf

    declared = {spec.name: spec for spec in signature.outputs}
    if set(outputs) != set(declared):
        raise ValueError(
            f"The {signature.name} function returns {sorted(outputs)}, but kgpt.serving.signatures declares "
            f"{sorted(declared)}; change the two together."
        )
    for name, tensor in outputs.items():
        spec = declared[name]
        if spec.dtype is None:  # set by the model (the packed cache)
            continue
        if tensor.dtype != tf.as_dtype(spec.dtype) or not tensor.shape.is_compatible_with(spec.shape):
            raise ValueError(
                f"The {signature.name} output {name!r} is {tensor.dtype.name} {tensor.shape}; "
                f"kgpt.serving.signatures declares {spec.dtype} {list(spec.shape)}."
            )


def read_saved_model(saved_model_dir):
    """The `SavedModel` protocol buffer of `saved_model_dir/saved_model.pb` (nothing is loaded)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as file:
        proto.ParseFromString(file.read())
    return proto


def read_signature_defs(saved_model_dir):
    """`{name: SignatureDef}` that a SavedModel serves, as TF Serving lists them (without
    `__saved_model_init_op`, which it neither lists nor runs).

    Example:
        GENERATE.name in read_signature_defs("saved_models/tiny/1")
    """
    signature_defs = read_saved_model(saved_model_dir).meta_graphs[0].signature_def
    return {key: value for key, value in signature_defs.items() if not key.startswith("__")}
