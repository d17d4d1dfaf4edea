"""The KFP run form (kubetune.run_form): typed parameters applied over config_json, errors that name
the parameter, and the cluster check that the compiled defaults fail with one message."""

from __future__ import annotations

import pytest

from kubetune.config import default_config
from kubetune.errors import ConfigError
from kubetune.run_form import RUN_FORM, apply, check_for_cluster, cluster_defaults

CLUSTER_READY = {"train_data": "s3://team/data/quotes.jsonl", "storage_uri": "s3://team/kubetune"}


def test_empty_values_keep_the_config_and_set_values_win():
    kept = apply(default_config(), {field.parameter: None for field in RUN_FORM})
    assert kept.to_dict() == apply(default_config(), {}).to_dict()
    blank = apply(default_config(), {field.parameter: "  " for field in RUN_FORM if field.type is str})
    assert blank.to_dict() == kept.to_dict()  # the UI may send an emptied text field as ""
    cfg = apply(default_config(), {"base_model": " org/model ", "max_steps": 7, "learning_rate": 1e-3, "lora_r": 4,
                                   "lora_alpha": 8, "model_name": "sentiment", "storage_uri": "s3://b/p"})
    assert (cfg.model.name_or_path, cfg.train.max_steps, cfg.train.learning_rate) == ("org/model", 7, 1e-3)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.storage.uri) == (4, 8, "s3://b/p")
    assert cfg.register.model_name == "sentiment"


def test_the_experiment_defaults_to_the_registered_model_and_an_explicit_one_wins():
    assert apply(default_config(), {"model_name": "sentiment"}).tracking.experiment == "sentiment"
    assert apply(default_config(), {"model_name": "sentiment", "experiment": "team-a"}).tracking.experiment == "team-a"
    explicit = {**default_config(), "tracking": {"mlflow_uri": None, "experiment": "mine"}}
    assert apply(explicit, {"model_name": "sentiment"}).tracking.experiment == "mine"


@pytest.mark.parametrize("values, message", [
    ({"max_steps": -3}, "max_steps = -3: must be a positive integer"),
    ({"learning_rate": 2.0}, "learning_rate = 2.0: must be in (0, 1)"),
    ({"lora_r": -1}, "lora_r = -1: the LoRA rank must be a positive integer"),
    ({"max_steps": "20"}, "max_steps = '20': must be int"),
    ({"learning_rate": True}, "learning_rate = True: must be float"),
    ({"model_name": "a/b"}, "model_name = 'a/b': give a name without slashes"),
    ({"steps": 3}, "steps = 3: not a run-form parameter; use one of task, base_model"),
    ({"lora_r": 0}, "lora_r = 0: the LoRA rank must be a positive integer"),  # 0 is a value, not "keep"
    ({"max_steps": 0}, "max_steps = 0: must be a positive integer"),
    ({"task": "summarize"}, "task = 'summarize': use one of causal_lm"),
    ({"quantization": "3bit"}, "quantization = '3bit': use one of none, 8bit, 4bit"),
    ({"epochs": "2"}, "epochs = '2': must be float"),
    ({"eval_samples": -1}, "eval_samples = -1:"),
])
def test_bad_values_name_the_parameter(values, message):
    with pytest.raises(ConfigError) as caught:
        apply(default_config(), values)
    assert str(caught.value).startswith(message)


def test_a_lora_setting_on_a_config_without_lora_says_so():
    full = {**default_config(), "model": {**default_config()["model"], "lora": None}}
    with pytest.raises(ConfigError, match=r"lora_r = 8: config_json sets model.lora to null"):
        apply(full, {"lora_r": 8})


def test_errors_outside_the_form_keep_the_config_key():
    data = {**default_config(), "train": {**default_config()["train"], "batch_size": 0}}
    with pytest.raises(ConfigError, match=r"^train.batch_size = 0"):
        apply(data, {"max_steps": 5})


def test_compiled_defaults_fail_on_a_cluster_naming_what_to_set():
    with pytest.raises(ConfigError) as caught:
        check_for_cluster(apply(cluster_defaults(default_config()), {}))
    message = str(caught.value)
    assert message.startswith("train_data = '../shared/data/quotes/quotable_sample_quotes.json': a pod cannot read")
    assert "set the run form's train_data" in message and "(also to set for a cluster: storage_uri)" in message
    ready = check_for_cluster(apply(cluster_defaults(default_config()), CLUSTER_READY))
    assert ready.data.path == "s3://team/data/quotes.jsonl" and ready.evaluate.retention_path is None


def test_the_preflight_task_in_a_pod_refuses_the_compiled_defaults(monkeypatch):
    import json

    from kubetune import stages

    compiled = json.dumps(cluster_defaults(default_config()))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert json.loads(stages.run_config(compiled, {}))["data"]["path"] == default_config()["data"]["path"]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # what every pod has
    with pytest.raises(ConfigError, match=r"^train_data = "):
        stages.run_config(compiled, {})
    ready = json.loads(stages.run_config(compiled, CLUSTER_READY))
    assert ready["storage"]["uri"] == "s3://team/kubetune" and ready["tracking"]["experiment"] == "quotes-lora"
    with pytest.raises(ConfigError, match=r"^config_json = '\{not json': not JSON"):
        stages.run_config("{not json", {})


def test_a_run_is_named_after_the_model_and_what_its_form_set():
    cfg = apply(default_config(), {"learning_rate": 3e-3, "lora_r": 8})
    assert cfg.tracking.run_name == "quotes-lora learning_rate=0.003 r=8"
    assert apply(default_config(), {}).tracking.run_name is None  # nothing set: preflight names it by time
    named = default_config()
    named["tracking"]["run_name"] = "nightly"
    assert apply(named, {"lora_r": 8}).tracking.run_name == "nightly"


def test_the_new_fields_set_their_keys_and_epochs_size_the_run_instead_of_max_steps():
    cfg = apply(default_config(), {"task": "instruction", "quantization": "4bit", "text_field": "body",
                                   "label_field": "answer", "instruction_field": "question", "input_field": "context",
                                   "epochs": 2, "eval_samples": 12})
    assert (cfg.task, cfg.model.quantization, cfg.evaluate.max_samples) == ("instruction", "4bit", 12)
    assert (cfg.data.text_field, cfg.data.label_field, cfg.data.instruction_field, cfg.data.input_field) == (
        "body", "answer", "question", "context")
    assert cfg.train.epochs == 2 and cfg.train.max_steps is None
    with pytest.raises(ConfigError, match=r"^epochs = 1.5: a run is sized by steps or by epochs, not both"):
        apply(default_config(), {"epochs": 1.5, "max_steps": 30})
    chat = apply(default_config(), {"task": "chat", "messages_field": "conversation"})
    assert chat.data.messages_field == "conversation"


def test_a_webhook_url_in_the_config_is_refused_on_a_cluster_without_showing_it():
    data = {**cluster_defaults(default_config()), "notify": {**default_config()["notify"],
                                                            "webhook_url": "https://hooks.slack.com/services/T0/B0/s3cr3t"}}
    with pytest.raises(ConfigError) as caught:
        check_for_cluster(apply(data, CLUSTER_READY))
    message = str(caught.value)
    assert message.startswith("notify.webhook_url = 'https://hooks.slack.com/***': a URL in the config is visible")
    assert "s3cr3t" not in message and "kubetune-notify Secret" in message
