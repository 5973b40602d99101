"""Sampling: the one options structure (`SamplingOptions`) and the samplers, registered by name.

Python API, CLI flags and `generate` signature derive from the fields. TensorFlow is imported inside
the graph functions only, so `kgpt --help` does not wait for it.
"""

import dataclasses
import math
import operator

# Written into filtered-out logits; finite, so softmax and categorical stay NaN-free.
_FILTERED = -1e30


def option(default, dtype, help, signature_default=None, minimum=None, maximum=None,
           minimum_inclusive=True, hint="", signature_hint=""):
    """A `SamplingOptions` field: its default plus what validation, the CLI and the graph need.

    Args:
        dtype: the graph dtype of the field's scalar (`"float32"` or `"int32"`).
        signature_default: the exported `generate` signature's default (default: `default`).
        minimum, maximum: bounds (None: unbounded); `maximum` is inclusive.
        hint, signature_hint: how to fix a bad value, in the Python and the graph's errors.
    """
    bounds = [] if minimum is None else [(">=" if minimum_inclusive else ">", minimum)]
    if maximum is not None:
        bounds.append(("<=", maximum))
    text = " ".join(f"{comparison} {bound}" for comparison, bound in bounds)
    if len(bounds) == 2:
        text = f"in {'[' if minimum_inclusive else '('}{minimum}, {maximum}]"
    return dataclasses.field(default=default, metadata=dict(
        dtype=dtype, type=float if dtype.startswith("float") else int, help=help,
        signature_default=default if signature_default is None else signature_default, bounds=bounds,
        error=f"must be {text}" + (f"; {hint}" if hint else ""),
        signature_error=f"must be {text}" + (f"; {signature_hint or hint}" if signature_hint or hint else ""),
    ))


_COMPARISONS = {">=": (operator.ge, "assert_greater_equal"), ">": (operator.gt, "assert_greater"),
                "<=": (operator.le, "assert_less_equal")}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen; validated when built.

    Args:
        temperature: None for greedy decoding; else > 0, the logits are divided by it.
        top_k: draw among the `top_k` most likely tokens (0 keeps all); 1 is greedy.
        top_p: draw from the smallest set of most likely tokens whose probability reaches it.
        seed: the stateless seed of every draw (token `p` is drawn with `[seed, p]`).
        frequency_penalty, presence_penalty: OpenAI's: each token's logit is lowered by
            `frequency_penalty * count + presence_penalty * (count > 0)`, `count` the times it was
            generated so far (the prompt not counted); negative values favour repeats.
        repetition_penalty: Hugging Face's (CTRL's): the logit of each token in the prompt or
            generated so far is divided by it where positive, multiplied where negative; 1 is off.

    Penalties apply before the temperature, the filters and greedy decoding's argmax, repetition
    first, as vLLM orders them.
    """

    temperature: float = option(
        None, "float32", "sample at this temperature (> 0; default: greedy)",
        signature_default=1.0, minimum=0, minimum_inclusive=False,
        hint="for greedy decoding leave the temperature out (or use top_k=1)",
        signature_hint="for greedy decoding use top_k=1 or the serving_default signature",
    )
    top_k: int = option(0, "int32", "sample among the k best (0: all)", minimum=0,
                        hint="0 keeps every token", signature_hint="0 keeps all")
    top_p: float = option(1.0, "float32", "nucleus sampling mass (0, 1]", minimum=0,
                          maximum=1, minimum_inclusive=False, hint="1 keeps every token")
    seed: int = option(0, "int32", "sampling seed (default 0)")
    frequency_penalty: float = option(
        0.0, "float32", "lower each token's logit by this times its count so far (OpenAI's, -2 to 2)",
        minimum=-2, maximum=2, hint="0 is off")
    presence_penalty: float = option(
        0.0, "float32", "lower the logit of each token generated so far by this (OpenAI's, -2 to 2)",
        minimum=-2, maximum=2, hint="0 is off")
    repetition_penalty: float = option(
        1.0, "float32", "divide the logits of tokens seen so far by this (Hugging Face's, > 0)",
        minimum=0, minimum_inclusive=False, hint="1 is off, 1.2 is common")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue
            python_type = field.metadata["type"]
            wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
            if not wrong_type and not math.isfinite(value):  # inf would sample uniformly
                bounds = f" and {field.metadata['error']}" if field.metadata["bounds"] else ""
                raise ValueError(f"{field.name}={value!r} must be a finite number{bounds}.")
            if wrong_type or (python_type is int and not float(value).is_integer()):
                kind = "an integer" if python_type is int else "a number"
                raise ValueError(f"{field.name}={value!r} must be {kind}.")
            object.__setattr__(self, field.name, python_type(value))
            bounds = field.metadata["bounds"]
            if not all(_COMPARISONS[comparison][0](value, bound) for comparison, bound in bounds):
                raise ValueError(f"{field.name}={value} {field.metadata['error']}.")

    def graph_inputs(self):
        """`{field: Python scalar}` as the graph takes them; greedy is temperature 1, top_k 1."""
        values = dataclasses.asdict(self)
        if self.temperature is None:
            values.update(temperature=1.0, top_k=1)
        return values

    def graph_tensors(self):
        """`graph_inputs` as scalar tensors of each field's dtype."""
        import tensorflow as tf

        dtypes = signature_dtypes(type(self))
        return {name: tf.constant(value, dtypes[name]) for name, value in self.graph_inputs().items()}


def signature_dtypes(options_type=SamplingOptions):
    """`{field: tf.DType}` of an options class, in field order."""
    import tensorflow as tf

    return {f.name: tf.as_dtype(f.metadata["dtype"]) for f in dataclasses.fields(options_type)}


def signature_defaults(options_type=SamplingOptions):
    """`{field: default}` that the exported `generate` signature records, in field order."""
    return {f.name: f.metadata["signature_default"] for f in dataclasses.fields(options_type)}


def graph_checks(options, options_type=SamplingOptions):
    """Assertion ops of every field's bounds on `{field: scalar tensor}` (INVALID_ARGUMENT messages)."""
    import tensorflow as tf

    checks = []
    for field in dataclasses.fields(options_type):
        value = options[field.name]
        if value.dtype.is_floating:  # inf and nan pass no bound check of their own
            checks.append(tf.debugging.assert_equal(
                tf.math.is_finite(value), True, message=f"{field.name} must be a finite number"))
        for comparison, bound in field.metadata["bounds"]:
            check = getattr(tf.debugging, _COMPARISONS[comparison][1])
            message = f"{field.name} {field.metadata['signature_error']}"
            checks.append(check(value, tf.cast(bound, value.dtype), message=message))
    return checks


def draws_at_random(graph_inputs):
    """True when `sample_logits` draws for these `{field: scalar}` graph inputs (not an argmax).

    A draw depends on its row's place in the batch (one stateless seed per call), so a served
    request that draws is never batched with others (`kgpt.serving.server`).
    """
    temperature = float(graph_inputs.get("temperature", 0.0))
    return temperature > 0.0 and int(graph_inputs.get("top_k", 0)) != 1


def add_sampling_arguments(parser, options_type=SamplingOptions):
    """Adds one `--flag` per field (`top_k` -> `--top-k`) to an `argparse` parser."""
    for field in dataclasses.fields(options_type):
        parser.add_argument("--" + field.name.replace("_", "-"), type=field.metadata["type"],
                            default=field.default, help=field.metadata["help"])


def sampling_from_arguments(args, options_type=SamplingOptions):
    """The options parsed by `add_sampling_arguments`, validated."""
    return options_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options_type)})


# --- samplers (graph code) ----------------------------------------------------------------------

FILTERS = {}


def register_filter(name):
    """Registers `function(sorted_logits, options) -> sorted_logits`, run when options have field `name`.

    Logits arrive sorted in descending order; a filter sets the tokens it drops to `_FILTERED`.
    """

    def register(function):
        FILTERS[name] = function
        return function

    return register


@register_filter("top_k")
def keep_top_k(sorted_logits, options):
    """Keeps the `top_k` best tokens (0 keeps all)."""
    import tensorflow as tf

    top_k = tf.cast(options["top_k"], tf.int32)
    ranks = tf.range(tf.shape(sorted_logits)[-1])[None, :]
    return tf.where(tf.logical_or(top_k <= 0, ranks < top_k), sorted_logits, _FILTERED)


@register_filter("top_p")
def keep_top_p(sorted_logits, options):
    """Keeps the smallest set of best tokens whose probability reaches `top_p` (the nucleus)."""
    import tensorflow as tf

    # A token stays in the nucleus if the mass before it is still below top_p.
    mass_before = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
    keep = mass_before < tf.cast(options["top_p"], tf.float32)
    return tf.where(keep, sorted_logits, _FILTERED)


def sample_logits(logits, options=None, seed=None):
    """Picks one token per row of float `(batch, vocabulary_size)` logits; returns int32 `(batch,)`.

    An argmax when `temperature <= 0` or `top_k == 1`, else a draw after the registered filters.

    Args:
        options: a `SamplingOptions` (default greedy), or its `graph_inputs()` (tensors in a graph).
        seed: int32 `(2,)` stateless seed of this draw; default `[options["seed"], 0]`.
    """
    import tensorflow as tf

    if options is None or isinstance(options, SamplingOptions):
        options = (options or SamplingOptions()).graph_inputs()
    logits = tf.convert_to_tensor(logits, tf.float32)
    if seed is None:
        seed = tf.stack([tf.cast(options.get("seed", 0), tf.int32), 0])
    temperature = tf.cast(options["temperature"], tf.float32)
    top_k = tf.cast(options.get("top_k", 0), tf.int32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def draw():
        scaled = logits / tf.maximum(temperature, 1e-6)
        sorted_logits, sorted_ids = tf.math.top_k(scaled, k=tf.shape(scaled)[-1])
        for name, function in FILTERS.items():
            if name in options:
                sorted_logits = function(sorted_logits, options)
        choice = tf.random.stateless_categorical(sorted_logits, 1, seed=seed, dtype=tf.int32)
        return tf.gather(sorted_ids, choice[:, 0], batch_dims=1)

    return tf.cond(tf.logical_and(temperature > 0.0, tf.not_equal(top_k, 1)), draw, lambda: greedy)
