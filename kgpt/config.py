"""The configuration schema's base (`Config`: frozen dataclasses checked against their annotations,
errors naming `section.key` and the fix, did-you-mean for unknown keys) and the sections that need
no registry: `ModelConfig` (`[model]`) and `TrainConfig` (`[train]`). `DataConfig` lives with the
data (`kgpt.data.config`, it checks corpus and tokenizer names), `Recipe` in `kgpt.recipe`.
"""

import dataclasses
import difflib
import math
import types
import typing


def _type_name(annotation):
    if annotation in (int, float, str, bool):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _coerce(key, value, annotation):
    """Checks `value` against a field annotation; returns it with ints as floats, lists as tuples."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in typing.get_args(annotation):
            return None
        errors = []
        for option in (a for a in typing.get_args(annotation) if a is not type(None)):
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


def _jsonable(values):
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def _did_you_mean(value, options):
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class Config:
    """Base of every configuration dataclass: field checks, `from_dict`/`to_dict`, clear errors.

    Subclasses are frozen dataclasses that set `section` (the recipe section, for `section.key`
    in messages) and override `validate`.
    """

    section = None

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _coerce(self.key(field.name), getattr(self, field.name), hints[field.name])
            object.__setattr__(self, field.name, value)
        self.validate()

    def validate(self):
        """Raises `ValueError` naming the key and the fix for a value that cannot work."""

    def key(self, name):
        """`name` as the user writes it in a recipe: `section.name`."""
        return f"{self.section}.{name}" if self.section else name

    def check_positive(self, *names):
        for name in names:
            value = getattr(self, name)
            if value <= 0:
                least = "; set it to at least 1" if isinstance(value, int) else ""
                raise ValueError(f"{self.key(name)}={value} must be positive{least}.")

    def check_range(self, name, low, high, fix=""):
        """Raises unless `low <= value < high` (`None` values pass: they mean "unset")."""
        value = getattr(self, name)
        if value is not None and not low <= value < high:
            bounds = f">= {low}" if high == float("inf") else f"in [{low}, {high})"
            raise ValueError(f"{self.key(name)}={value} must be {bounds}{fix}.")

    def check_choice(self, name, options):
        value = getattr(self, name)
        if value not in options:
            raise ValueError(
                f"Unknown {self.key(name)}={value!r}.{_did_you_mean(value, options)} "
                f"Set {self.key(name)} to one of: {', '.join(map(str, options))}."
            )

    @classmethod
    def check_keys(cls, keys):
        """Raises for a key that is not a field, with a did-you-mean hint."""
        fields = [f.name for f in dataclasses.fields(cls)]
        prefix = f"{cls.section}." if cls.section else ""
        for key in keys:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean {prefix}{close[0]}?" if close else ""
                raise ValueError(
                    f"Unknown key {prefix}{key}.{hint} Valid keys: {', '.join(sorted(fields))}."
                )

    @classmethod
    def from_dict(cls, data):
        """Builds the config from a recipe section or `to_dict()`; bad keys raise `ValueError`."""
        cls.check_keys(data)
        prefix = f"{cls.section}." if cls.section else ""
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"Missing required key(s): {', '.join(prefix + m for m in missing)}.")
        return cls(**data)

    def to_dict(self):
        """The fields as a JSON-ready dict (tuples become lists, as `config.json` stores them)."""
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """Size and arrangement of a GPT model (the `[model]` section)."""

    vocabulary_size: int  # token ids, special tokens included
    sequence_length: int  # the context: positions the model sees
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # attention heads per block; must divide hidden_dim
    hidden_dim: int = 128  # width of the residual stream
    intermediate_dim: int | None = None  # feed-forward width; default 4 * hidden_dim
    dropout: float = 0.0  # on embeddings, attention probabilities, residual branches (GPT-2: 0.1)
    layer_norm_epsilon: float = 1e-5
    normalize_first: bool = True  # GPT-2's pre-LayerNorm; False: the original post-LayerNorm
    use_bias: bool = True  # biases in the attention and feed-forward projections
    initializer_range: float = 0.02  # normal init std; residual projections / sqrt(2 num_layers)
    position_embedding: str = "learned"  # "learned", "alibi": kinds registered in kgpt.model.layers

    section = "model"

    def __post_init__(self):
        if self.intermediate_dim is None:
            object.__setattr__(self, "intermediate_dim", 4 * self.hidden_dim)
        super().__post_init__()

    def validate(self):
        self.check_positive(
            "vocabulary_size", "sequence_length", "num_layers", "num_heads", "hidden_dim",
            "intermediate_dim",
        )
        if self.hidden_dim % self.num_heads:
            divisors = [d for d in range(1, min(self.hidden_dim, 64) + 1) if self.hidden_dim % d == 0]
            raise ValueError(
                f"hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}; "
                f"choose num_heads that divides hidden_dim (one of {divisors}) or change hidden_dim."
            )
        self.check_range("dropout", 0.0, 1.0, "; use 0.0 to disable dropout")
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


STRATEGIES = ("auto", "default", "mirrored", "multiworker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def evaluations_done(step, eval_interval, max_steps=None):
    """The evaluations a run has done once its optimizer reached `step` at an evaluation: one after
    each multiple of `eval_interval` steps, the last one at `max_steps` (None: no end)."""
    if max_steps is not None:
        step = min(step, max_steps)
    return -(-step // eval_interval)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How to train: batch, schedule, optimiser, evaluation, callbacks, distribution (`[train]`)."""

    batch_size: int = 12  # per replica; the global batch is batch_size * replicas
    max_steps: int = 2000  # optimiser steps in the whole run
    eval_interval: int = 250  # steps per Keras epoch: evaluation, checkpoint, backup, sample
    eval_steps: int | None = None  # the same first validation batches each time; None: all
    eval_batch_size: int | None = None  # windows per evaluation batch (same windows); None: batch_size
    learning_rate: float = 1e-3  # peak, reached after warmup_steps
    warmup_steps: int = 100  # linear warm-up from 0
    decay_steps: int | None = None  # cosine reaches min_learning_rate here; None: max_steps
    min_learning_rate: float = 1e-4
    weight_decay: float = 0.1  # AdamW, on weight matrices only
    beta_1: float = 0.9
    beta_2: float = 0.99
    epsilon: float = 1e-8
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables it
    patience: int = 0  # evaluations without improvement before early stopping; 0 disables it
    seed: int = 1337  # initialisation, shuffling, dropout and samples
    strategy: str = "auto"  # auto (mirrored with several GPUs), default, mirrored, multiworker
    precision: str = "float32"  # or mixed_bfloat16 / mixed_float16 (GPUs)
    jit_compile: bool = True  # XLA for the train step
    steps_per_execution: int = 1  # train steps per compiled call
    init_from: str | None = None  # a run directory whose weights and tokenizer start this one
    sample_prompt: str = ""  # continued at each evaluation; empty: no samples
    sample_length: int = 100  # new tokens per sample (past the context, from its last half)
    sample_temperature: float = 0.8  # nanoGPT's
    sample_top_k: int = 200  # nanoGPT's; 0: all tokens

    section = "train"

    def validate(self):
        self.check_positive("batch_size", "max_steps", "eval_interval", "steps_per_execution",
                            "learning_rate", "epsilon", "sample_temperature")
        self.check_range("eval_steps", 1, float("inf"), ", or omitted to evaluate the whole split")
        self.check_range("eval_batch_size", 1, float("inf"), ", or omitted for batch_size")
        for name in ("warmup_steps", "min_learning_rate", "weight_decay", "clip_norm", "patience",
                     "sample_length", "sample_top_k"):
            self.check_range(name, 0, float("inf"))
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
        self.check_range("beta_1", 0.0, 1.0)
        self.check_range("beta_2", 0.0, 1.0)
        self.check_choice("strategy", STRATEGIES)
        self.check_choice("precision", PRECISIONS)
        if self.eval_interval % self.steps_per_execution:
            raise ValueError(
                f"train.eval_interval={self.eval_interval} is not a multiple of "
                f"train.steps_per_execution={self.steps_per_execution}; Keras runs whole "
                "executions, so make eval_interval a multiple (or lower steps_per_execution)."
            )

    @property
    def total_decay_steps(self):
        return self.max_steps if self.decay_steps is None else self.decay_steps

    @property
    def num_evaluations(self):
        """Evaluation intervals (Keras epochs) in the run: the last is shorter when `max_steps`
        is not a multiple of `eval_interval`."""
        return -(-self.max_steps // self.eval_interval)

    def evaluations_done(self, step):
        """The evaluations a run has done once its optimizer reached `step` at an evaluation."""
        return evaluations_done(step, self.eval_interval, self.max_steps)

    def fit_to_max_steps(self):
        """`(config, note)`: this config with what does not fit in `max_steps` steps fitted in,
        and a one-line note of what changed (None when nothing did).

        A warm-up as long as the run becomes a tenth of it, a decay past the end ends at
        `max_steps`, an `eval_interval` longer than the run becomes the run, and
        `steps_per_execution` divides `max_steps`, so the last interval ends on time.

        Example:
            config, note = TrainConfig(max_steps=50, eval_interval=250).fit_to_max_steps()
            # warmup_steps 100 -> 5, eval_interval 250 -> 50
        """
        changes = {}
        if self.decay_steps is not None and self.decay_steps > self.max_steps:
            changes["decay_steps"] = self.max_steps
        if self.warmup_steps and self.warmup_steps >= self.max_steps:
            changes["warmup_steps"] = self.max_steps // 10
        if self.eval_interval > self.max_steps:
            changes["eval_interval"] = self.max_steps
        if self.max_steps % self.steps_per_execution:
            changes["steps_per_execution"] = math.gcd(self.steps_per_execution, self.max_steps)
        if not changes:
            return self, None
        note = (
            f"Fitted to train.max_steps={self.max_steps}: "
            + ", ".join(f"{key} {getattr(self, key)} -> {value}" for key, value in changes.items())
            + "."
        )
        return dataclasses.replace(self, **changes), note


