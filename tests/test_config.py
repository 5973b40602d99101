import pytest

from kgpt.config import ModelConfig, parse_override

TINY = dict(vocabulary_size=32, sequence_length=8, num_layers=2, num_heads=2, hidden_dim=16)


def test_defaults_fill_intermediate_dim():
    config = ModelConfig(**TINY)
    assert config.intermediate_dim == 64
    assert config.head_dim == 8
    assert config.layer_norm_epsilon == 1e-5
    assert config.normalize_first is True


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
