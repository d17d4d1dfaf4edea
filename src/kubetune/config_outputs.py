"""The config sections about where a run's results go and who hears of them: the registered
model, MLflow, object storage and notifications (the others are in kubetune.config)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from kubetune.config_fields import OUTPUT, described as _help, no_credentials as _no_credentials, require as _require
from kubetune.overrides import RUN_NAME_LIMIT


@dataclass
class RegisterConfig:
    model_name: str = _help("Registered model in MLflow; each run adds a version.", "quotes-lora")

    def validate(self) -> None:
        _require(bool(self.model_name.strip()) and "/" not in self.model_name, "register.model_name",
                 self.model_name, "give a name without slashes, e.g. quotes-lora")


@dataclass
class TrackingConfig:
    mlflow_uri: Optional[str] = _help(
        "MLflow tracking URI; null uses MLFLOW_TRACKING_URI, else an embedded sqlite store in .kubetune/.",
        None, location=OUTPUT,
    )
    experiment: Optional[str] = _help(
        "MLflow experiment that holds the runs; null = one experiment per registered model "
        "(register.model_name), so runs compared side by side measure the same thing.", None)
    run_name: Optional[str] = _help(
        "The MLflow run's name, what chart legends show; null = the model name and the values this run "
        "set differently from its config (`kubetune run --set`, the KFP run form), else the start time. "
        "`kubetune run --run-name` sets it.", None)

    def validate(self) -> None:
        _require(self.experiment is None or bool(self.experiment.strip()), "tracking.experiment", self.experiment,
                 "name the experiment, or null for the registered model's name")
        _require(self.run_name is None or 0 < len(self.run_name.strip()) <= RUN_NAME_LIMIT, "tracking.run_name",
                 self.run_name, f"give a name of 1 to {RUN_NAME_LIMIT} characters, or null for one made from the "
                 "model name and what the run set")
        name, uri = ("tracking.mlflow_uri", self.mlflow_uri) if self.mlflow_uri else \
            ("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI"))
        if uri and uri.startswith(("http://", "https://")):  # a database URI holds its own login
            _no_credentials(name, uri, "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD", "kubetune-mlflow")


@dataclass
class StorageConfig:
    uri: Optional[str] = _help(
        "Where checkpoints and adapters are copied: s3://bucket/prefix or a local directory (not /); "
        "null = .kubetune/storage.",
        None, location=OUTPUT,
    )
    endpoint_url: Optional[str] = _help(
        "S3 endpoint for MinIO or other S3-compatible stores; null uses AWS_ENDPOINT_URL or AWS.", None
    )
    retry_seconds: float = _help(
        "How long a storage call that fails for a passing reason (endpoint down, 5xx, throttling) is "
        "retried, with backoff, before the stage gives up; 0 = no retries. A checkpoint upload that still "
        "fails is retried at the next save instead of failing training.", 120.0)

    def validate(self) -> None:
        _require(self.retry_seconds >= 0, "storage.retry_seconds", self.retry_seconds, "must be 0 or more, e.g. 120")
        _no_credentials("storage.endpoint_url", self.endpoint_url, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                        "kubetune-s3")
        if self.uri is not None:
            _require(bool(self.uri.strip()) and self.uri != "s3://", "storage.uri", self.uri,
                     "give s3://bucket/prefix, a local directory, or null")


#: What a notification is sent for (kubetune.notify).
EVENTS = ("failed", "succeeded", "champion", "skipped")
WEBHOOK_ENV = "KUBETUNE_WEBHOOK_URL"  # on a cluster: from the optional Secret kubetune-notify


@dataclass
class NotifyConfig:
    webhook_url: Optional[str] = _help(
        f"Incoming webhook (Slack, Teams, any HTTP endpoint) that gets one JSON message per event; null reads "
        f"${WEBHOOK_ENV} (on a cluster, from the kubetune-notify Secret), and neither set sends nothing. The URL "
        "is a secret: prefer the variable; its path and query are never logged or shown.", None)
    events: list[str] = _help("Which events are sent: " + ", ".join(EVENTS) + " (a new version became the "
                              "champion; the data was unchanged, nothing trained).", factory=lambda: list(EVENTS))
    kfp_ui_url: Optional[str] = _help(
        "The Kubeflow Pipelines UI's address, for a link to the pipeline run in messages, e.g. "
        "https://kubeflow.example.com/pipeline; null: no such link.", None)
    timeout_seconds: float = _help("How long one delivery may take; a webhook that is down never fails the run.",
                                   10.0)

    def validate(self) -> None:
        for name, url in (("notify.webhook_url", self.webhook_url), ("notify.kfp_ui_url", self.kfp_ui_url)):
            shown = webhook_shown(url) if name == "notify.webhook_url" and url else url  # its path is the secret
            _require(url is None or url.startswith(("http://", "https://")), name, shown,
                     "give an http(s):// URL, or null")
        unknown = [event for event in self.events if event not in EVENTS]
        _require(not unknown, "notify.events", self.events, f"choose from {', '.join(EVENTS)}")
        _require(self.timeout_seconds > 0, "notify.timeout_seconds", self.timeout_seconds, "must be above 0, e.g. 10")


def webhook_shown(url: str) -> str:
    """A webhook URL as it may be shown or recorded: its scheme and host; the path and query are
    its secret (Slack's and Teams' URLs carry the token there)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rpartition('@')[2]}/***" if rest else "***"


#: Config keys whose values are secrets, as the run's params record them.
SECRET_KEYS = {"notify.webhook_url": webhook_shown}
