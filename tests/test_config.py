import json

import pytest

from kgpt.config import ModelConfig, TrainConfig
from kgpt.data.config import DataConfig
from kgpt.recipe import Recipe, load_recipe, parse_override

TINY = dict(vocabulary_size=32, sequence_length=8, num_layers=2, num_heads=2, hidden_dim=16)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(**TINY),
        DataConfig(corpus="text", files=("a.txt", "b/*.txt"), tokenizer="char"),
        TrainConfig(max_steps=500, eval_interval=50, decay_steps=400, init_from="runs/x"),
    ],
)
def test_every_config_round_trips_through_json(config):
    stored = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(stored) == config


@pytest.mark.parametrize("path", ["pipelines/shakespeare_char.toml", "pipelines/shakespeare_char_gpu.toml",
                                  "pipelines/wikitext2.toml", "pipelines/imdb.toml"])
def test_a_recipe_round_trips_through_its_config_json(path):
    recipe = load_recipe(path, ["model.kind=gru"])
    stored = json.loads(json.dumps(recipe.to_dict()))
    assert stored["model"]["kind"] == "gru"
    assert Recipe.from_dict(stored) == recipe


@pytest.mark.parametrize(
    "section, key, message",
    [
        ("data", {"sequence_len": 8}, r"Unknown key data\.sequence_len\. Did you mean data\.sequence_length"),
        ("train", {"max_step": 8}, r"Unknown key train\.max_step\. Did you mean train\.max_steps"),
        ("data", {"mode": "packd"}, r"Unknown data\.mode='packd'\. Did you mean 'packed'"),
        ("model", {"kind": "lstm"}, r"Unknown model\.kind='lstm'.*one of: gpt, gru"),
    ],
)
def test_every_section_names_unknown_keys_and_values(section, key, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict({"data": {"corpus": "imdb"}, section: key})


def test_locations_and_sample_settings_are_not_recipe_identity():
    recipe = load_recipe("pipelines/tiny.toml")
    moved = load_recipe("pipelines/tiny.toml", ["data.dir=/elsewhere", "data.cache_dir=/tmp/c",
                                                  "train.sample_prompt=JULIET:"])
    assert moved.identity() == recipe.identity() and moved != recipe
    assert load_recipe("pipelines/tiny.toml", ["data.lowercase=true"]).identity() != recipe.identity()


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocabulary_size", 0),
        ("sequence_length", -1),
        ("num_layers", 0),
        ("num_heads", 0),
        ("hidden_dim", -16),
        ("intermediate_dim", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("layer_norm_epsilon", 0.0),
        ("initializer_range", 0.0),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**TINY, field: value})


def test_hidden_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"hidden_dim=30 is not divisible by num_heads=4.*choose"):
        ModelConfig(**{**TINY, "hidden_dim": 30, "num_heads": 4})


@pytest.mark.parametrize(
    "field, value", [("num_layers", "4"), ("num_layers", 2.5), ("normalize_first", 1), ("dropout", "0")]
)
def test_wrong_type_names_the_field_and_type(field, value):
    with pytest.raises(ValueError, match=rf"{field}=.*expected"):
        ModelConfig(**{**TINY, field: value})


def test_from_dict_rejects_unknown_key_with_suggestion():
    with pytest.raises(ValueError, match=r"Unknown key model\.num_layer\. Did you mean model\.num_layers"):
        ModelConfig.from_dict({**TINY, "num_layer": 3})


def test_from_dict_reports_missing_required_keys():
    with pytest.raises(ValueError, match=r"model\.vocabulary_size"):
        ModelConfig.from_dict({"sequence_length": 8})


def test_from_dict_accepts_int_for_float_and_round_trips():
    config = ModelConfig.from_dict({**TINY, "dropout": 0})
    assert config.dropout == 0.0 and isinstance(config.dropout, float)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model.num_layers=4", ("model.num_layers", 4)),
        ("train.learning_rate=1e-3", ("train.learning_rate", 1e-3)),
        ("model.normalize_first=false", ("model.normalize_first", False)),
        ("data.corpus=wikitext2", ("data.corpus", "wikitext2")),
        ('data.corpus="imdb"', ("data.corpus", "imdb")),
        ("data.files=[1, 2]", ("data.files", [1, 2])),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["num_layers", "=4"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ValueError, match="key=value"):
        parse_override(text)


def test_max_steps_need_not_be_a_multiple_of_eval_interval():
    config = TrainConfig(max_steps=25, eval_interval=10, warmup_steps=2)  # used to be refused
    assert config.num_evaluations == 3  # after 10, 20 and 25 steps
    assert [config.evaluations_done(step) for step in (0, 10, 20, 25, 30)] == [0, 1, 2, 3, 3]


@pytest.mark.parametrize(
    "settings, fitted, note",
    [
        # pipelines/imdb.toml --set train.max_steps=50: its warm-up and interval are longer than the run.
        (dict(max_steps=50, eval_interval=250, warmup_steps=200), dict(warmup_steps=5, eval_interval=50),
         "Fitted to train.max_steps=50: warmup_steps 200 -> 5, eval_interval 250 -> 50."),
        (dict(max_steps=100, eval_interval=50, warmup_steps=10, decay_steps=3000), dict(decay_steps=100),
         "Fitted to train.max_steps=100: decay_steps 3000 -> 100."),
        # The last interval must end on time: executions of steps that divide max_steps.
        (dict(max_steps=130, eval_interval=250, warmup_steps=10, steps_per_execution=50),
         dict(eval_interval=130, steps_per_execution=10), None),
    ],
)
def test_what_does_not_fit_in_max_steps_is_fitted_with_a_note(settings, fitted, note):
    config, message = TrainConfig(**settings).fit_to_max_steps()
    assert {key: getattr(config, key) for key in fitted} == fitted
    assert config.warmup_steps <= config.total_decay_steps <= config.max_steps
    assert config.eval_interval % config.steps_per_execution == 0
    assert config.max_steps % config.steps_per_execution == 0
    assert message == note if note else all(f"{key} " in message for key in fitted)
    assert len(message.splitlines()) == 1
    unchanged = TrainConfig(max_steps=100, eval_interval=30, warmup_steps=10, decay_steps=80)
    assert unchanged.fit_to_max_steps() == (unchanged, None)
