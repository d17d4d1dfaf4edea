from pathlib import Path

import pytest

from kubetune.config import RunConfig, apply_overrides, default_config, describe, load_config
from kubetune.errors import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_defaults_are_the_valid_demo_recipe():
    cfg = RunConfig.from_dict(default_config())
    assert cfg.task == "causal_lm"
    assert cfg.model.quantization == "8bit"
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (16, 32, 0.05)
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_overrides_parse_yaml_values():
    data = apply_overrides(default_config(), ["train.max_steps=7", "model.lora=null", "data.max_rows=20",
                                              "model.quantization=none"])
    cfg = RunConfig.from_dict(data)
    assert cfg.train.max_steps == 7 and cfg.model.lora is None and cfg.data.max_rows == 20


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  quantization: none\n  lora: {r: 4}\ntrain: {max_steps: 3}\n")
    cfg = load_config(path, ["train.max_steps=5"])
    assert cfg.model.quantization == "none"
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha == 32  # unspecified keys keep their defaults
    assert cfg.train.max_steps == 5


@pytest.mark.parametrize("overrides, field, shown", [
    (["model.lora.r=0"], "model.lora.r", "0"),
    (["train.max_steps=-1"], "train.max_steps", "-1"),
    (["train.max_steps=ten"], "train.max_steps", "'ten'"),
    (["model.quantization=3bit"], "model.quantization", "'3bit'"),
    (["train.learning_rate=2"], "train.learning_rate", "2.0"),
    (["data.validation_fraction=0"], "data.validation_fraction", "0.0"),
    (["model.lora=null"], "model.quantization", "'8bit'"),
    (["train.bogus=1"], "train.bogus", "1"),
    (["task=translation"], "task", "'translation'"),
])
def test_bad_values_name_the_field_and_value(overrides, field, shown):
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    message = str(raised.value)
    assert message.startswith(f"{field} = {shown}:"), message


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"train.max_step = 10: unknown key; valid keys here are .*max_steps"):
        load_config(path)


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_has_help():
    rows = describe()
    assert {"model.lora.r", "train.max_steps", "tracking.mlflow_uri", "storage.uri"} <= {r[0] for r in rows}
    assert all(help_text for _, help_text, _ in rows)


def test_examples_are_valid_configs():
    assert EXAMPLES, "examples/ holds no configs"
    for path in EXAMPLES:
        load_config(path)
