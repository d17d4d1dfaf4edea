"""Preflight's bounds on the model and the machine (issue 23): sequences within the model's positions,
a run length and a generation budget that are estimated, logged, and refused where absurd. On tiny
models built from configs on the meta device, and on configs alone."""

import logging

import pytest
import torch

from kubetune import modeling, preflight
from kubetune.config import RunConfig
from kubetune.errors import ConfigError
from kubetune.tracking import models


def skeleton(kind: str):
    import transformers as t

    configs = {"gpt2": t.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=128),
               "llama": t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)}
    with torch.device("meta"):
        return t.AutoModelForCausalLM.from_config(configs[kind])


def config(task: str = "causal_lm", **sections) -> RunConfig:
    data = {"path": "quotes.json", "max_length": 64, **({"label_field": "output"} if task != "causal_lm" else {})}
    values = {"task": task, "data": data, "train": {"max_steps": 12, "batch_size": 8, "gradient_accumulation_steps": 1},
              "evaluate": {"max_samples": 16, "num_generations": 2, "max_new_tokens": 6, "prompt_tokens": 6}}
    for name, more in sections.items():
        values[name] = {**values.get(name, {}), **more}
    return RunConfig.from_dict(values)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_max_length_beyond_the_positions_is_refused_naming_the_limit(kind):
    positions = modeling.positions(skeleton(kind))
    preflight.check_lengths(config(data={"max_length": 128}), positions)
    key = "n_positions" if kind == "gpt2" else "max_position_embeddings"
    with pytest.raises(ConfigError, match=rf"^data.max_length = 129: the model has 128 .*\({key} in its config.json\); "
                                          r"set data.max_length to 128 or less$"):
        preflight.check_lengths(config(data={"max_length": 129}), positions)


def test_generation_past_absolute_positions_is_refused_with_the_room_left():
    positions = modeling.positions(skeleton("gpt2"))
    preflight.check_lengths(config("instruction", evaluate={"max_new_tokens": 64}), positions)  # 64 + 64 = 128
    with pytest.raises(ConfigError, match=r"^evaluate.max_new_tokens = 65: a held-out prompt of up to 64 tokens "
                                          r"\(data.max_length\) plus 65 new ones passes the last position: .*; set "
                                          r"evaluate.max_new_tokens to 64 or less$"):
        preflight.check_lengths(config("instruction", evaluate={"max_new_tokens": 65}), positions)
    with pytest.raises(ConfigError, match=r"lower data.max_length to leave room for the answer"):
        preflight.check_lengths(config("instruction", data={"max_length": 128}), positions)
    # causal_lm continues evaluate.prompt_tokens tokens; classification generates nothing.
    preflight.check_lengths(config(evaluate={"max_new_tokens": 122}), positions)
    preflight.check_lengths(config("classification", data={"max_length": 128}, evaluate={"max_new_tokens": 10**9}),
                            positions)


def test_rotary_models_refuse_only_generation_beyond_their_positions():
    positions = modeling.positions(skeleton("llama"))
    preflight.check_lengths(config("instruction", evaluate={"max_new_tokens": 128}), positions)
    with pytest.raises(ConfigError, match=r"^evaluate.max_new_tokens = 1000000000: generation would run past the "
                                          r"model's positions: the model has 128 positions it was trained for"):
        preflight.check_lengths(config(evaluate={"max_new_tokens": 10**9}), positions)


def test_a_model_without_a_position_limit_is_not_bounded():
    preflight.check_lengths(config(data={"max_length": 10**6}), None)


def test_run_length_is_logged_warned_about_and_refused_where_absurd(caplog):
    caplog.set_level(logging.INFO, logger="kubetune.preflight")
    facts = preflight.check_run_size(config(), train_rows=64, mean_tokens=20.0)
    assert facts == {"steps": 12, "passes": 1.5, "train_tokens": 1920, "generated_tokens": 24}
    assert "train: 12 optimizer steps of 8 rows are 1.5 passes over the 64 training rows, about 1,920 tokens" in caplog.text
    assert "evaluate: up to 24 generated tokens (2 models x 2 prompts x 6 evaluate.max_new_tokens)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    preflight.check_run_size(config(train={"max_steps": 2000}), train_rows=64, mean_tokens=20.0)  # 250 passes
    assert "250 passes over the 64 training rows" in caplog.text and "mostly memorises them" in caplog.text
    with pytest.raises(ConfigError, match=r"^train.max_steps = 1000000000000: 1,000,000,000,000 optimizer steps of 8 "
                                          r"rows are 125,000,000,000 passes over the 64 training rows, about "
                                          r"[\d,]+ tokens: more than 10,000 passes .*; set train.max_steps to at "
                                          r"most 80,000, e.g. 24 for 3 passes$"):
        preflight.check_run_size(config(train={"max_steps": 10**12}), train_rows=64, mean_tokens=20.0)
    # Beyond a 32-bit step counter even on a huge data set; epochs are bounded the same way.
    with pytest.raises(ConfigError, match=r"^train.max_steps = 4294967296: .*set train.max_steps to at most "
                                          r"2,147,483,647"):
        preflight.check_run_size(config(train={"max_steps": 2**32}), train_rows=10**12, mean_tokens=20.0)
    with pytest.raises(ConfigError, match=r"^train.epochs = 1000000.0: .*set train.epochs to a few passes, e.g. 3$"):
        preflight.check_run_size(config(train={"max_steps": None, "epochs": 1e6}), train_rows=64, mean_tokens=20.0)


def test_the_generation_budget_is_estimated_and_refused_where_absurd(caplog):
    caplog.set_level(logging.INFO, logger="kubetune.preflight")
    # instruction: every held-out row may be generated for, by the base and the tuned model.
    assert preflight.generated_tokens(config("instruction", evaluate={"max_new_tokens": 100})) == 2 * 16 * 100
    assert preflight.generated_tokens(config("classification")) == 0
    preflight.check_run_size(config("instruction", evaluate={"max_samples": 1000, "max_new_tokens": 100}), 64, 20.0)
    assert "up to 200,000 generated tokens (2 models x 1000 prompts x 100 evaluate.max_new_tokens); that takes long" \
        in caplog.text
    with pytest.raises(ConfigError, match=r"^evaluate.max_new_tokens = 1000: evaluate would generate up to "
                                          r"2,000,000 tokens \(2 models x 1000 prompts x 1000 evaluate.max_new_tokens\), "
                                          r"more than 1,000,000; lower evaluate.max_new_tokens"):
        preflight.check_run_size(config("instruction", evaluate={"max_samples": 1000, "max_new_tokens": 1000}), 64, 20.0)


@pytest.mark.parametrize("name", ["..\\x", ".", "a:b", "a%b", " "])
def test_register_model_name_follows_mlflow_rules(name):
    with pytest.raises(ConfigError, match=r"^register.model_name = .*: MLflow refuses it \("):
        models.check_model_name(name)


def test_register_model_name_mlflow_accepts_passes():
    for name in ("quotes-lora", "tiny_lora.v2", "Sentiment LoRA"):
        models.check_model_name(name)
