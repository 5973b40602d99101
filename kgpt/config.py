"""Configuration dataclasses, validated on creation, and the helpers that build them from dicts.

Every config is a frozen dataclass whose `__post_init__` rejects bad values with a `ValueError`
naming the field and the fix. `config_from_dict` turns a recipe section (or a `--set` override)
into one, rejecting unknown keys and wrong types by name.
"""

import dataclasses
import os
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
        dropout: dropout rate on embeddings, attention probabilities and residual branches (0
            disables it; GPT-2 uses 0.1 for all).
        layer_norm_epsilon: epsilon of every LayerNormalization.
        normalize_first: True for GPT-2's pre-LayerNorm blocks with a final LayerNorm; False for
            the original GPT / Transformer post-LayerNorm arrangement (no final LayerNorm).
        use_bias: biases in the attention and feed-forward projections (GPT-2 has them).
        initializer_range: standard deviation of the normal initialiser (GPT-2: 0.02); residual
            output projections use `initializer_range / sqrt(2 * num_layers)`.
        position_embedding: kind of position embedding, a name registered in `kgpt.layers`
            (`"learned"`: GPT-2's learned absolute positions); checked when the model is built.
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
    position_embedding: str = "learned"

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


STRATEGIES = ("auto", "default", "mirrored", "multiworker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: batch, schedule, optimiser, evaluation, callbacks and distribution.

    Args:
        batch_size: examples per replica per step; the global batch is
            `batch_size * num_replicas`.
        max_steps: optimiser steps in the whole run.
        eval_interval: steps between evaluations (one Keras "epoch"; checkpoints, backups,
            early stopping and samples happen at this cadence).
        eval_steps: validation batches per evaluation (the same first batches every time);
            None evaluates the whole split.
        learning_rate: peak learning rate reached after `warmup_steps`.
        warmup_steps: linear warm-up steps from 0.
        decay_steps: step at which the cosine decay reaches `min_learning_rate`; None means
            `max_steps`.
        min_learning_rate: learning-rate floor.
        weight_decay: AdamW decoupled weight decay, applied to weight matrices only.
        beta_1, beta_2: AdamW moment decay rates.
        epsilon: AdamW's denominator epsilon.
        clip_norm: global gradient-norm clip; 0 disables clipping.
        patience: evaluations without improvement before early stopping; 0 disables it.
        seed: seed of initialisation, shuffling, dropout and samples.
        strategy: `auto` (MirroredStrategy when more than one GPU is visible), `default`,
            `mirrored` or `multiworker` (MultiWorkerMirroredStrategy from `TF_CONFIG`).
        precision: `float32`, `mixed_bfloat16` or `mixed_float16` (the last two for GPUs).
        jit_compile: compile the train step with XLA.
        steps_per_execution: train steps per compiled call.
        init_from: a run directory whose weights and tokenizer start this run (fine-tuning).
        sample_prompt: text continued at each evaluation; empty disables samples.
        sample_length: new tokens in each sample.
    """

    batch_size: int = 12
    max_steps: int = 2000
    eval_interval: int = 250
    eval_steps: typing.Optional[int] = None
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: typing.Optional[int] = None
    min_learning_rate: float = 1e-4
    weight_decay: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    epsilon: float = 1e-8
    clip_norm: float = 1.0
    patience: int = 0
    seed: int = 1337
    strategy: str = "auto"
    precision: str = "float32"
    jit_compile: bool = True
    steps_per_execution: int = 1
    init_from: typing.Optional[str] = None
    sample_prompt: str = ""
    sample_length: int = 100

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _coerce(f"train.{f.name}", getattr(self, f.name), hints[f.name])
        _positive(self, "batch_size", "max_steps", "eval_interval", "steps_per_execution")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ValueError(f"train.eval_steps={self.eval_steps} must be positive, or omitted for all.")
        for name in ("learning_rate", "epsilon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be positive (e.g. 1e-3).")
        for name in ("warmup_steps", "min_learning_rate", "weight_decay", "clip_norm", "patience",
                     "sample_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must not be negative.")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"train.min_learning_rate={self.min_learning_rate} exceeds train.learning_rate="
                f"{self.learning_rate}; lower the floor or raise the peak."
            )
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            raise ValueError(
                f"train.decay_steps={self.decay_steps} is before the end of warm-up "
                f"(train.warmup_steps={self.warmup_steps}); make decay_steps >= warmup_steps."
            )
        for name in ("beta_1", "beta_2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be in [0, 1).")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}.")

    @property
    def total_decay_steps(self):
        return self.max_steps if self.decay_steps is None else self.decay_steps

    @classmethod
    def from_dict(cls, data, section="train"):
        return config_from_dict(cls, data, section)


RECIPE_SECTIONS = ("model", "data", "train")


def apply_overrides(recipe, overrides):
    """Returns a copy of a recipe dict with `--set section.key=value` overrides applied."""
    result = {section: dict(values) for section, values in recipe.items()}
    for text in overrides:
        key, value = parse_override(text)
        section, _, field = key.partition(".")
        if section not in RECIPE_SECTIONS or not field:
            raise ValueError(
                f"--set {text!r}: the key must be section.key with section one of "
                f"{', '.join(RECIPE_SECTIONS)} (e.g. train.max_steps=100)."
            )
        result.setdefault(section, {})[field] = value
    return result


def read_recipe(path, overrides=()):
    """Reads a TOML recipe and applies overrides; returns `{section: {key: value}}`.

    Only the section names are checked here; `kgpt.train.resolve_recipe` validates the keys.
    """
    import tomllib

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such recipe: {path}. Recipes live in pipelines/*.toml.")
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from error
    unknown = [name for name in recipe if name not in RECIPE_SECTIONS]
    if unknown:
        raise ValueError(
            f"{path}: unknown section(s) [{'], ['.join(unknown)}]; a recipe has [model], [data] "
            "and [train]."
        )
    for name, values in recipe.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: {name} must be a [{name}] table, not a value.")
    return apply_overrides(recipe, overrides)
