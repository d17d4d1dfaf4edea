"""Notifications (kubetune.notify) sent by the pipeline's exit handler (stages.finish_run), against a
real MLflow store and a real HTTP receiver on loopback (tiny.WebhookReceiver): one JSON message per
event with Slack's and Teams' `text` field, no secret in any of them, and a webhook that is down,
slow or refusing never failing the run."""

from __future__ import annotations

import json
import time

import pytest

from kubetune import notify, stages, tracking
from kubetune.config import default_config
from kubetune.config_outputs import NotifyConfig

SECRET = "aws-secret-Zq81xK0p"


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)
    return uri


def _config(uri: str, **notify_settings) -> str:
    config = default_config()
    config["tracking"]["mlflow_uri"] = uri
    config["register"]["model_name"] = "quotes-lora"
    config["notify"].update(notify_settings)
    return json.dumps(config)


def _run(uri: str, pipeline_run: str, tags: dict, metrics: dict | None = None, status: str = "") -> str:
    run_id = tracking.start_run(uri, "notify-test", "r", default_config(), {tracking.PIPELINE_RUN_TAG: pipeline_run})
    logger = tracking.RunLogger(uri, run_id)
    logger.tags(tags)
    if metrics:
        logger.metrics(metrics)
    if status:
        logger.finish(status)
    return run_id


def test_a_failed_run_names_its_stage_and_error_with_secrets_masked(store, webhook, monkeypatch):
    monkeypatch.setenv("KUBETUNE_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    _run(store, "pr-1", {"kubetune.stage": "train",
                         "kubetune.error": f"CUDA out of memory with key {SECRET} at http://bob:pw123@mlflow:5000"})
    said = stages.finish_run(_config(store, kfp_ui_url="https://kfp.example.com/pipeline"), "pr-1", "FAILED",
                             "Task train failed.")
    assert "failed: sent to http://127.0.0.1:" in said and "webhook-s3cr3t" not in said
    (body,) = webhook.received
    assert body["kubetune"]["event"] == "failed" and body["kubetune"]["stage"] == "train"
    assert body["text"].startswith("kubetune: quotes-lora run FAILED in train: CUDA out of memory with key *** at "
                                   "http://bob:***@mlflow:5000")
    assert "KFP: https://kfp.example.com/pipeline/#/runs/details/pr-1" in body["text"]
    everything = json.dumps(webhook.received) + json.dumps(webhook.headers)
    assert SECRET not in everything and "pw123" not in everything and "webhook-s3cr3t" not in everything
    assert webhook.headers[0]["content-type"] == "application/json"


def test_success_sends_the_headline_and_a_new_champion_old_against_new(store, webhook, monkeypatch):
    from kubetune.tracking.models import ModelStore

    monkeypatch.setenv("KUBETUNE_WEBHOOK_URL", webhook.url)
    # the replaced champion's figures are its version's tags (registry.register writes them)
    models = ModelStore(store)
    models.client.create_registered_model("quotes-lora")
    old_run = _run(store, "pr-0", {}, status="FINISHED")
    models.client.create_model_version("quotes-lora", "runs:/x/model", run_id=old_run)
    models.tag_version("quotes-lora", "1", {"eval/tuned_perplexity": "31.02"})
    _run(store, "pr-2", {"kubetune.registered_model": "quotes-lora", "kubetune.registered_version": "2",
                         "kubetune.champion": "yes", "kubetune.previous_champion": "1",
                         "kubetune.champion_decision": "quotes-lora/2 is the new champion: perplexity 29.71 beats "
                                                       "31.02 of version 1 (lower is better)"},
         {"eval/base_perplexity": 55.25, "eval/tuned_perplexity": 29.71, "eval/perplexity_change_pct": -46.2},
         status="FINISHED")
    stages.finish_run(_config(store), "pr-2", "SUCCEEDED")
    assert webhook.events() == ["succeeded", "champion"]
    succeeded, champion = webhook.received
    assert succeeded["text"].startswith("kubetune: quotes-lora run succeeded: perplexity (held-out) 55.25 -> 29.71 "
                                        "(-46.2%, better); registered quotes-lora/2")
    assert succeeded["kubetune"]["figures"]["eval/tuned_perplexity"] == 29.71
    assert champion["text"].startswith("kubetune: quotes-lora/2 is the new champion: perplexity 29.71 beats 31.02")
    assert "(perplexity 31.02 -> 29.71)" in champion["text"] and champion["kubetune"]["previous"][
        "eval/tuned_perplexity"] == "31.02"


def test_a_skipped_run_says_why_and_events_can_be_chosen(store, webhook, monkeypatch):
    monkeypatch.setenv("KUBETUNE_WEBHOOK_URL", webhook.url)
    reason = "skipped: data unchanged since version 3 (quotes-lora/3, the champion, was trained on the same data"
    _run(store, "pr-3", {"kubetune.skipped": reason}, status="FINISHED")
    stages.finish_run(_config(store), "pr-3", "SUCCEEDED")
    assert webhook.events() == ["skipped"] and webhook.received[0]["text"] == f"kubetune: quotes-lora {reason}"
    said = stages.finish_run(_config(store, events=["failed"]), "pr-3", "SUCCEEDED")
    assert "skipped: not sent (not in notify.events)" in said and len(webhook.received) == 1


def test_without_a_webhook_nothing_is_sent_and_the_handler_says_what_it_always_said(store, monkeypatch):
    monkeypatch.delenv("KUBETUNE_WEBHOOK_URL", raising=False)
    _run(store, "pr-4", {"kubetune.stage": "tokenize"})
    assert stages.finish_run(_config(store), "pr-4", "FAILED").startswith("pipeline run FAILED: marked MLflow run ")


@pytest.mark.parametrize("answers, delivered", [([500], True), ([503, 503], False), ([404], False)],
                         ids=["5xx retried once", "5xx twice", "404 not retried"])
def test_a_refusing_webhook_never_fails_the_run(store, webhook, monkeypatch, answers, delivered):
    monkeypatch.setattr(notify, "RETRY_PAUSE", 0.05)
    monkeypatch.setenv("KUBETUNE_WEBHOOK_URL", webhook.url)
    webhook.answers = list(answers)
    _run(store, "pr-5", {"kubetune.stage": "evaluate"})
    said = stages.finish_run(_config(store), "pr-5", "FAILED")
    assert ("failed: sent to" in said) is delivered, said
    assert len(webhook.received) == (2 if answers[0] >= 500 else 1)
    if not delivered:
        assert f"not delivered to http://127.0.0.1:{webhook.server.server_address[1]}/*** (HTTP {answers[-1]}" in said


def test_a_webhook_that_is_down_or_too_slow_costs_at_most_its_timeout(store, webhook, monkeypatch, free_port):
    monkeypatch.setattr(notify, "RETRY_PAUSE", 0.05)
    _run(store, "pr-6", {"kubetune.stage": "train"})
    monkeypatch.setenv("KUBETUNE_WEBHOOK_URL", f"http://127.0.0.1:{free_port}/hook")  # nothing listens there
    said = stages.finish_run(_config(store), "pr-6", "FAILED")
    assert "failed: not delivered to http://127.0.0.1:" in said and "ConnectionRefusedError" in said

    webhook.delay = 3.0
    monkeypatch.setenv("KUBETUNE_WEBHOOK_URL", webhook.url)
    started = time.monotonic()
    said = stages.finish_run(_config(store, timeout_seconds=0.5), "pr-6", "FAILED")
    assert "not delivered" in said and time.monotonic() - started < 2 * 0.5 + 0.05 + 2.0


def test_messages_for_each_event_without_a_store():
    """The wording, from plain facts (notify.events): what a person reads first."""
    base = dict(model_name="m", pipeline_run="pr", mlflow_page="http://mlflow/#/r", headline=())
    (failed,) = notify.events(notify.Outcome(state="CANCELED", error="Run was cancelled.\nmore", **base))
    assert failed.text == "kubetune: m run CANCELED in an unknown stage: Run was cancelled. — MLflow: http://mlflow/#/r"
    (plain,) = notify.events(notify.Outcome(state="SUCCEEDED", **base))
    assert plain.kind == "succeeded" and "no headline figures recorded" in plain.text
    assert notify.payload(failed, {"HF_TOKEN": "pr"})["text"].startswith("kubetune: m run CANCELED")  # too short to mask
    masked = notify.payload(failed, {"HF_TOKEN": "cancelled"})
    assert "cancelled" not in json.dumps(masked) and masked["kubetune"]["event"] == "failed"


def test_the_webhook_is_validated_and_never_recorded():
    from kubetune.config_outputs import webhook_shown
    from kubetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^notify.events = \['failure'\]: choose from failed, succeeded"):
        NotifyConfig(events=["failure"]).validate()
    with pytest.raises(ConfigError, match=r"^notify.webhook_url = '\*\*\*': give an http\(s\):// URL"):
        NotifyConfig(webhook_url="hooks.slack.com/services/s3cr3t").validate()
    assert webhook_shown("https://hooks.slack.com/services/T0/B0/xyz") == "https://hooks.slack.com/***"
    assert webhook_shown("https://u:p@example.com:8443/h?token=1") == "https://example.com:8443/***"
    config = {**default_config(), "notify": {**default_config()["notify"], "webhook_url": "https://h.io/s3cr3t"}}
    assert tracking.flatten(config)["notify.webhook_url"] == "https://h.io/***"
