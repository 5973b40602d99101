"""A recipe (`pipelines/*.toml`): its `[model]`, `[data]` and `[train]` sections validated together
(`Recipe`), `--set section.key=value` overrides, and what makes two recipes the same run
(`identity`, `config_differences`).
"""

import dataclasses
import os
import tomllib
import typing

from kgpt.config import ModelConfig, TrainConfig, _coerce, _did_you_mean, _jsonable
from kgpt.data.config import DataConfig

# Model kinds a recipe may train (`[model] kind`); `kgpt.model.saving.MODEL_CLASSES` maps each to its
# Keras class.
MODEL_KINDS = ("gpt", "gru")
RECIPE_SECTIONS = ("model", "data", "train")
# Where things are, not what they are: a run resumes after its data or its initial run moved, and
# samples shown during training (or how evaluation windows are batched) do not change the model.
_NOT_IDENTITY = {
    "data": ("dir", "cache_dir", "tokenizer_path"),
    "train": ("init_from", "sample_prompt", "sample_length", "sample_temperature", "sample_top_k",
              "eval_batch_size"),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe. `model` holds the `ModelConfig` fields it sets; `model_kind` is `[model] kind`."""

    model: dict
    data: DataConfig
    train: TrainConfig
    model_kind: str = "gpt"  # a name in MODEL_KINDS

    @classmethod
    def from_dict(cls, raw):
        """Validates a `{section: {key: value}}` dict (a parsed recipe or `config.json`)."""
        model = dict(raw.get("model", {}))
        kind = model.pop("kind", "gpt")
        if kind not in MODEL_KINDS:
            raise ValueError(
                f"Unknown model.kind={kind!r}.{_did_you_mean(kind, MODEL_KINDS)} Set model.kind "
                f"to one of: {', '.join(MODEL_KINDS)}."
            )
        ModelConfig.check_keys(model)
        hints = typing.get_type_hints(ModelConfig)
        model = {key: _coerce(f"model.{key}", value, hints[key]) for key, value in model.items()}
        data, train = DataConfig.from_dict(raw.get("data", {})), TrainConfig.from_dict(raw.get("train", {}))
        return cls(model=model, data=data, train=train, model_kind=kind)

    def to_dict(self):
        """The recipe as `config.json` stores it (`kind` only when not the default)."""
        model = _jsonable(self.model)
        if self.model_kind != "gpt":
            model["kind"] = self.model_kind
        return {"model": model, "data": self.data.to_dict(), "train": self.train.to_dict()}

    def identity(self):
        """What makes two recipes the same run: `to_dict` without locations and sample display."""
        return identity(self.to_dict())

    def model_config(self, vocabulary_size):
        """The `ModelConfig` of a new model for a tokenizer of `vocabulary_size` ids."""
        defaults = {"vocabulary_size": vocabulary_size, "sequence_length": self.data.sequence_length}
        return ModelConfig(**{**defaults, **self.model})


def identity(config):
    """A `{section: {key: value}}` config without the keys that are not identity (locations such
    as `data.dir`, and the training samples' settings); sections it lacks stay absent."""
    return {
        section: {k: v for k, v in values.items() if k not in _NOT_IDENTITY.get(section, ())}
        if isinstance(values, dict) else values
        for section, values in config.items()
    }


def config_differences(old, new, prefix=""):
    """The dotted keys whose values differ between two config dicts, as "key (old -> new)"."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return found


def parse_override(text):
    """Parses `--set key=value` into `(key, value)`: a TOML value if it parses, else a bare string."""
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
    """Reads a TOML recipe and applies overrides; returns `{section: {key: value}}` (unvalidated)."""
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


def load_recipe(path, overrides=()):
    """Reads, overrides and validates a recipe: `load_recipe("pipelines/tiny.toml", ["train.seed=1"])`."""
    return Recipe.from_dict(read_recipe(path, overrides))
