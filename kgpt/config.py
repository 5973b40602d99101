"""Configuration dataclasses, validated on creation, and the helpers that build them from dicts.

Every config is a frozen dataclass whose `__post_init__` rejects bad values with a `ValueError`
naming the field and the fix. `config_from_dict` turns a recipe section (or a `--set` override)
into one, rejecting unknown keys and wrong types by name.
"""

import dataclasses
import difflib
import typing


def _type_name(annotation):
    if annotation in (int, float, str, bool):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _coerce(key, value, annotation):
    """Checks `value` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X] and friends
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(key, value, option)
            except ValueError as error:
                errors.append(error)
        raise errors[0]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(
                f"{key}={value!r} has type {type(value).__name__}; expected a list "
                f"({_type_name(annotation)})."
            )
        (item_type, *_) = typing.get_args(annotation) or (typing.Any,)
        return tuple(_coerce(key, item, item_type) for item in value)
    if annotation is typing.Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} has type {type(value).__name__}; expected bool (true/false).")
    if annotation is int and isinstance(value, bool):
        raise ValueError(f"{key}={value!r} has type bool; expected int.")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ValueError(
            f"{key}={value!r} has type {type(value).__name__}; expected {_type_name(annotation)}."
        )
    return value


def config_from_dict(cls, data, section=None):
    """Builds the dataclass `cls` from a dict, rejecting unknown keys and wrong types.

    Args:
        cls: a dataclass type such as `ModelConfig`.
        data: mapping of field name to value (e.g. a parsed TOML section).
        section: name used in error messages (e.g. `"model"` gives `model.num_heads`).

    Returns:
        An instance of `cls`.

    Example:
        config = config_from_dict(ModelConfig, {"vocabulary_size": 32, ...}, "model")
    """
    prefix = f"{section}." if section else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ValueError(
                f"Unknown key {prefix}{key}.{hint} Valid keys: {', '.join(sorted(fields))}."
            )
        values[key] = _coerce(prefix + key, value, hints[key])
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"Missing required key(s): {', '.join(prefix + m for m in missing)}.")
    return cls(**values)


def parse_override(text):
    """Parses one `--set key=value` override into `(key, value)`.

    The value is read as a TOML value when it parses as one (`4`, `1e-3`, `true`, `"x"`,
    `[1, 2]`) and as a bare string otherwise, so `--set data.corpus=wikitext2` works unquoted.
    """
    import tomllib

    if "=" not in text:
        raise ValueError(f"--set {text!r} is not of the form key=value (e.g. model.num_layers=4).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set {text!r} has an empty key; write it as key=value.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"{name}={value} must be a positive integer; set {name} to at least 1.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Size and arrangement of a GPT model.

    Args:
        vocabulary_size: number of token ids, including special tokens.
        sequence_length: context length; the size of the learned position table.
        num_layers: decoder blocks.
        num_heads: attention heads per block; must divide `hidden_dim`.
        hidden_dim: width of the residual stream.
        intermediate_dim: width of the feed-forward layer; defaults to `4 * hidden_dim`.
        dropout: dropout rate on embeddings and residual branches (0 disables it).
        layer_norm_epsilon: epsilon of every LayerNormalization.
        normalize_first: True for GPT-2's pre-LayerNorm blocks with a final LayerNorm; False for
            the original GPT / Transformer post-LayerNorm arrangement (no final LayerNorm).
        use_bias: biases in the attention and feed-forward projections (GPT-2 has them).
        initializer_range: standard deviation of the normal initialiser (GPT-2: 0.02); residual
            output projections use `initializer_range / sqrt(2 * num_layers)`.
    """

    vocabulary_size: int
    sequence_length: int
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: typing.Optional[int] = None
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    normalize_first: bool = True
    use_bias: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.intermediate_dim is None:
            object.__setattr__(self, "intermediate_dim", 4 * self.hidden_dim)
        for f in dataclasses.fields(self):
            _coerce(f.name, getattr(self, f.name), typing.get_type_hints(type(self))[f.name])
        _positive(
            self,
            "vocabulary_size",
            "sequence_length",
            "num_layers",
            "num_heads",
            "hidden_dim",
            "intermediate_dim",
        )
        if self.hidden_dim % self.num_heads:
            divisors = [d for d in range(1, min(self.hidden_dim, 64) + 1) if self.hidden_dim % d == 0]
            raise ValueError(
                f"hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}; "
                f"choose num_heads that divides hidden_dim (one of {divisors}) or change hidden_dim."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); use 0.0 to disable dropout.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(
                f"layer_norm_epsilon={self.layer_norm_epsilon} must be positive (GPT-2 uses 1e-5)."
            )
        if self.initializer_range <= 0:
            raise ValueError(
                f"initializer_range={self.initializer_range} must be positive (GPT-2 uses 0.02)."
            )

    @property
    def head_dim(self):
        return self.hidden_dim // self.num_heads

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, section="model"):
        return config_from_dict(cls, data, section)
