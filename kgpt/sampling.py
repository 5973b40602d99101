"""Sampling: the one options structure (`SamplingOptions`) and the samplers, registered by name.

`SamplingOptions` is the single description of how a token is picked. Its fields carry their own
bounds, help text, graph dtype and the default the exported `generate` signature records, so the
Python API (`Generator.generate(sampling=...)`), the CLI flags (`add_sampling_arguments`), the SavedModel
signature (`kgpt.export`) and `kgpt serve` all derive from it. A new sampler is one filter
function registered under a field's name plus that field (see `register_filter`).

In the graph, options travel as a dict of scalar tensors keyed by field name (`graph_inputs`).
Greedy decoding (`temperature=None`) is represented there as `temperature=1, top_k=1`, which
`sample_logits` answers with an argmax, without sorting the vocabulary.

TensorFlow is imported inside the graph functions only: the CLI builds its flags from this
module, and `kgpt --help` must not wait for TensorFlow (nor import it before the CLI sets its
environment variables).
"""

import dataclasses

# Written into filtered-out logits; finite, so softmax and categorical stay NaN-free.
_FILTERED = -1e30


def option(default, dtype, help, signature_default=None, minimum=None, maximum=None,
           minimum_inclusive=True, hint="", signature_hint=""):
    """A `SamplingOptions` field: its default plus what validation, the CLI and the graph need.

    Args:
        default: the Python default.
        dtype: the graph dtype of the field's scalar (`"float32"` or `"int32"`).
        help: the CLI help text.
        signature_default: the default recorded in the exported `generate` signature (when it
            differs from `default`, e.g. for a field that may be None in Python).
        minimum, maximum: bounds (None: unbounded); `maximum` is inclusive.
        minimum_inclusive: whether `minimum` itself is allowed.
        hint: how to fix a bad value, appended to the Python error.
        signature_hint: the same for the graph's INVALID_ARGUMENT message.

    Returns:
        A `dataclasses.field`.
    """
    return dataclasses.field(
        default=default,
        metadata=dict(
            dtype=dtype, help=help,
            signature_default=default if signature_default is None else signature_default,
            minimum=minimum, maximum=maximum, minimum_inclusive=minimum_inclusive,
            hint=hint, signature_hint=signature_hint,
        ),
    )


def _bounds_text(metadata):
    minimum, maximum = metadata["minimum"], metadata["maximum"]
    if minimum is not None and maximum is not None:
        return f"in {'[' if metadata['minimum_inclusive'] else '('}{minimum}, {maximum}]"
    if minimum is not None:
        return f"{'>=' if metadata['minimum_inclusive'] else '>'} {minimum}"
    return f"<= {maximum}"


def _within_bounds(value, metadata):
    minimum, maximum = metadata["minimum"], metadata["maximum"]
    if minimum is not None and not (value >= minimum if metadata["minimum_inclusive"] else value > minimum):
        return False
    return maximum is None or value <= maximum


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen; validated when built.

    Args:
        temperature: None for greedy decoding; else > 0, the logits are divided by it and a
            token is drawn.
        top_k: draw among the `top_k` most likely tokens (0 keeps all); 1 is greedy.
        top_p: draw from the smallest set of most likely tokens whose probability reaches
            `top_p` (1 keeps all).
        seed: the same seed gives the same samples.

    Example:
        SamplingOptions(temperature=0.8, top_k=40, seed=1)
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

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue
            python_type = float if field.metadata["dtype"].startswith("float") else int
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                python_type is int and not float(value).is_integer()
            ):
                raise ValueError(
                    f"{field.name}={value!r} must be {'an integer' if python_type is int else 'a number'}."
                )
            object.__setattr__(self, field.name, python_type(value))
            if not _within_bounds(value, field.metadata):
                hint = field.metadata["hint"]
                raise ValueError(
                    f"{field.name}={value} must be {_bounds_text(field.metadata)}"
                    f"{'; ' + hint if hint else ''}."
                )

    @property
    def greedy(self):
        """True when no token is drawn: no temperature, or top_k=1."""
        return self.temperature is None or self.top_k == 1

    def graph_inputs(self):
        """The options as the graph takes them: `{field: Python scalar}` (greedy: temperature 1,
        top_k 1), for `sample_logits`, `kgpt.decoding.decode` and the `generate` signature."""
        values = dataclasses.asdict(self)
        if self.temperature is None:
            values.update(temperature=1.0, top_k=1)
        return values

    def graph_tensors(self):
        """`graph_inputs` as scalar tensors of each field's dtype."""
        import tensorflow as tf

        return {
            name: tf.constant(value, signature_dtypes(type(self))[name])
            for name, value in self.graph_inputs().items()
        }


def signature_dtypes(options_type=SamplingOptions):
    """`{field: tf.DType}` of an options class, in field order."""
    import tensorflow as tf

    return {f.name: tf.as_dtype(f.metadata["dtype"]) for f in dataclasses.fields(options_type)}


def signature_defaults(options_type=SamplingOptions):
    """`{field: default}` that the exported `generate` signature records, in field order."""
    return {f.name: f.metadata["signature_default"] for f in dataclasses.fields(options_type)}


def graph_checks(options, options_type=SamplingOptions):
    """The bounds of every field as `tf.debugging` assertions on a dict of scalar tensors.

    Args:
        options: `{field: scalar tensor}` (the `generate` signature's inputs).
        options_type: the options class whose fields (and bounds) to check.

    Returns:
        A list of assertion ops; their messages are the signature's INVALID_ARGUMENT errors.
    """
    import tensorflow as tf

    checks = []
    for field in dataclasses.fields(options_type):
        metadata = field.metadata
        if metadata["minimum"] is None and metadata["maximum"] is None:
            continue
        hint = metadata["signature_hint"] or metadata["hint"]
        message = f"{field.name} must be {_bounds_text(metadata)}{'; ' + hint if hint else ''}"
        value = options[field.name]
        if metadata["minimum"] is not None:
            minimum = tf.cast(metadata["minimum"], value.dtype)
            if metadata["minimum_inclusive"]:
                checks.append(tf.debugging.assert_greater_equal(value, minimum, message=message))
            else:
                checks.append(tf.debugging.assert_greater(value, minimum, message=message))
        if metadata["maximum"] is not None:
            maximum = tf.cast(metadata["maximum"], value.dtype)
            checks.append(tf.debugging.assert_less_equal(value, maximum, message=message))
    return checks


def add_sampling_arguments(parser, options_type=SamplingOptions):
    """Adds one `--flag` per field (`top_k` -> `--top-k`) with its type, default and help.

    Args:
        parser: an `argparse.ArgumentParser`.
        options_type: the options class.
    """
    for field in dataclasses.fields(options_type):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=float if field.metadata["dtype"].startswith("float") else int,
            default=field.default,
            help=field.metadata["help"],
        )


def sampling_from_arguments(args, options_type=SamplingOptions):
    """The options parsed by `add_sampling_arguments` (an `argparse.Namespace`), validated.

    Returns:
        An `options_type` instance.
    """
    return options_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options_type)})


# --- samplers (graph code) ----------------------------------------------------------------------

FILTERS = {}


def register_filter(name):
    """Registers `function(sorted_logits, options) -> sorted_logits` under a field's name.

    A filter sees one row of logits per batch element sorted in descending order (after the
    temperature), and `options`, a dict of scalar tensors; it returns the logits with the tokens
    it drops set to a large negative number. Filters run in registration order, and only when
    the options carry their field. A new sampler is such a function plus its field.
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

    probabilities = tf.nn.softmax(sorted_logits)
    # A token stays in the nucleus if the mass before it is still below top_p.
    mass_before = tf.cumsum(probabilities, axis=-1, exclusive=True)
    keep = mass_before < tf.cast(options["top_p"], tf.float32)
    return tf.where(keep, sorted_logits, _FILTERED)


def sample_logits(logits, options=None, seed=None):
    """Picks one token per row from `(batch, vocabulary)` logits.

    Greedy (an argmax, the vocabulary is not sorted) when `temperature <= 0` or `top_k == 1`;
    otherwise the logits are divided by the temperature, sorted once, passed through every
    registered filter whose field `options` carries, and one token is drawn.

    Args:
        logits: float `(batch, vocabulary_size)`.
        options: a `SamplingOptions`, or `{field: scalar}` as `SamplingOptions.graph_inputs`
            gives (tensors inside a graph); default greedy.
        seed: int32 `(2,)` stateless seed of this draw; default `[options["seed"], 0]`.

    Returns:
        int32 `(batch,)` token ids.
    """
    import tensorflow as tf

    if options is None:
        options = SamplingOptions()
    if isinstance(options, SamplingOptions):
        options = options.graph_inputs()
    logits = tf.convert_to_tensor(logits, tf.float32)
    if seed is None:
        seed = tf.stack([tf.cast(options.get("seed", 0), tf.int32), 0])
    temperature = tf.cast(options["temperature"], tf.float32)
    top_k = tf.cast(options.get("top_k", 0), tf.int32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def draw():
        scaled = logits / tf.maximum(temperature, 1e-6)
        # Sort once; every filter cuts the sorted list.
        sorted_logits, sorted_ids = tf.math.top_k(scaled, k=tf.shape(scaled)[-1])
        for name, function in FILTERS.items():
            if name in options:
                sorted_logits = function(sorted_logits, options)
        choice = tf.random.stateless_categorical(sorted_logits, 1, seed=seed, dtype=tf.int32)
        return tf.gather(sorted_ids, choice[:, 0], batch_dims=1)

    return tf.cond(tf.logical_and(temperature > 0.0, tf.not_equal(top_k, 1)), draw, lambda: greedy)
