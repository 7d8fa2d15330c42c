"""The config: YAML + CLI overrides, every problem reported at once, built-in defaults layered under."""

import pytest

from lite_sft.config import (
    BUILTIN_MODEL,
    ConfigError,
    RunConfig,
    field_docs,
    load_config,
    save_config,
)
from lite_sft.config import BUILTIN_DEFAULTS as DEMO_DEFAULTS


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: some/model\n  quant: 4bit\ntrain:\n  lr: 0.001\n  epochs: 3\n")
    cfg = load_config(path, {"train.lr": 5e-5, "lora.target_modules": "q_proj, v_proj", "train.max_steps": None})
    assert cfg.model.quant == "4bit"
    assert cfg.train.lr == 5e-5  # the flag wins over the file
    assert cfg.train.epochs == 3.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None  # an unset flag leaves the file's value alone


def test_validate_reports_every_problem_at_once():
    cfg = load_config(None, {"model.name_or_path": "x/y", "model.quant": "3bit", "train.lr": -1.0,
                             "data.overlong": "chop", "lora.dropout": 1.5})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    message = str(err.value)
    for field in ("model.quant", "train.lr", "data.overlong", "lora.dropout"):
        assert field in message


def test_unknown_field_and_wrong_type_name_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n  micro_batch_size: lots\nlora:\n  use_dora: maybe\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "train.learning_rate: unknown field" in message
    assert "train.micro_batch_size" in message and "lora.use_dora" in message


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, {"model.name_or_path": "org/model", "lora.use_dora": True, "data.packing": False})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_builtin_defaults_sit_under_user_values():
    cfg = load_config(None, {})
    assert cfg.model.name_or_path == BUILTIN_MODEL
    for section, values in DEMO_DEFAULTS.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value
    if "train" in DEMO_DEFAULTS and "lr" in DEMO_DEFAULTS["train"]:
        assert load_config(None, {"train.lr": 1e-5}).train.lr == 1e-5
    # A real model gets the plain defaults.
    assert load_config(None, {"model.name_or_path": "org/model"}).train == RunConfig().train


def test_every_field_is_documented():
    docs = field_docs()
    cfg = RunConfig().to_dict()
    names = {f"{section}.{key}" for section, values in cfg.items() if isinstance(values, dict) for key in values}
    names |= {key for key, value in cfg.items() if not isinstance(value, dict)}
    assert names == set(docs), names ^ set(docs)
    assert all(len(text) > 10 for text in docs.values())
