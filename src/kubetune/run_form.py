"""The KFP run form: typed, optional pipeline parameters for what teams change between runs, applied over the config.

The whole config travels as one JSON string (`config_json`: KFP struct parameters cannot hold null,
and null means something here), which is hard to edit in the KFP UI's run form. The settings a team
changes from run to run get a typed, described parameter of their own. Each is a KFP optional input
(`Optional[T] = None`: `isOptional: true` with no default in the compiled YAML), so the form shows
it empty and a value left empty keeps what config_json says; 0 is a value like any other (and a bad
one is refused). Empty text ("", spaces) counts as left empty, as the UI may send it.

The preflight task applies them and hands the resulting config to every later task, so the MLflow
run's params show what actually ran. A bad value stops preflight with one message that names the
parameter (not the config key behind it), before any GPU is requested. On a cluster the same goes
for places a pod cannot reach: the compiled defaults name the demo's local data, so a run started
with them as they are stops with "train_data = '../shared/data/...': a pod cannot read this
machine's files ...".

KFP's backend resolves optional inputs left unset once it has kubeflow/pipelines PR #11788 (the root
DAG, merged April 2025) and PR #11980 (nested DAGs such as the exit handler's, merged mid-2025);
kfp.local does neither, so kubetune.launch.kfp_local fills that gap for `kubetune run`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.config import RunConfig
from kubetune.config_outputs import WEBHOOK_ENV, webhook_shown
from kubetune.errors import ConfigError
from kubetune.overrides import run_name
from kubetune.run_config import from_dict
from kubetune.tasks import KINDS


@dataclass(frozen=True)
class FormField:
    parameter: str  # the pipeline parameter's name
    key: str  # the config key it sets
    type: type  # str, int or float; the pipeline parameter is Optional[type] = None
    help: str
    choices: tuple[str, ...] = ()  # the values a str field accepts, where the config has a fixed list


RUN_FORM = (
    FormField("task", "task", str, "What kind of fine-tuning: " + ", ".join(KINDS) + " (sets task).",
              choices=tuple(KINDS)),
    FormField("base_model", "model.name_or_path", str,
              "Base model: a hub id, an s3:// snapshot or package:<name> (sets model.name_or_path)."),
    FormField("quantization", "model.quantization", str,
              "How the frozen base weights load: none, 8bit or 4bit (sets model.quantization).",
              choices=("none", "8bit", "4bit")),
    FormField("train_data", "data.path", str,
              "Training data: an s3:// file or folder of .json/.jsonl/.csv/.tsv/.txt/.parquet (sets data.path)."),
    FormField("text_field", "data.text_field", str, "Record field with the text to learn (sets data.text_field)."),
    FormField("label_field", "data.label_field", str,
              "Record field with the label (classification) or the answer (instruction, multitask) "
              "(sets data.label_field)."),
    FormField("instruction_field", "data.instruction_field", str,
              "Record field with the instruction (instruction, multitask) (sets data.instruction_field)."),
    FormField("input_field", "data.input_field", str,
              "Record field with the instruction's input text (sets data.input_field)."),
    FormField("messages_field", "data.messages_field", str,
              "Record field with the conversation (chat) (sets data.messages_field)."),
    FormField("epochs", "train.epochs", float,
              "Passes over the training data, may be fractional; sizes the run instead of max_steps, which "
              "it sets to null (sets train.epochs)."),
    FormField("max_steps", "train.max_steps", int, "Optimizer steps to run (sets train.max_steps)."),
    FormField("learning_rate", "train.learning_rate", float, "Peak learning rate of AdamW (sets train.learning_rate)."),
    FormField("lora_r", "model.lora.r", int, "LoRA rank (sets model.lora.r; alpha stays as configured)."),
    FormField("lora_alpha", "model.lora.alpha", int, "LoRA scaling numerator, usually 2 * rank (sets model.lora.alpha)."),
    FormField("eval_samples", "evaluate.max_samples", int,
              "Held-out examples scored for loss, perplexity and task metrics (sets evaluate.max_samples)."),
    FormField("model_name", "register.model_name", str,
              "Registered model in MLflow that gets the new version (sets register.model_name)."),
    FormField("experiment", "tracking.experiment", str,
              "MLflow experiment of the run; by default the registered model's name (sets tracking.experiment)."),
    FormField("storage_uri", "storage.uri", str,
              "s3://bucket/prefix for checkpoints and adapters, required on a cluster (sets storage.uri)."),
)
_BY_KEY = {field.key: field for field in RUN_FORM}
FORM_PARAMETERS = tuple(field.parameter for field in RUN_FORM)

EMPTY_HELP = "Leave empty to keep the value in config_json."


def is_empty(value: Any) -> bool:
    """A form value left empty: not given, None, or blank text."""
    return value is None or (isinstance(value, str) and not value.strip())


def _checked_value(field: FormField, value: Any) -> Any:
    wanted = (int, float) if field.type is float else field.type
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ConfigError(field.parameter, value, f"must be {field.type.__name__}: {field.help}")
    if isinstance(value, str):
        value = value.strip()
        if field.choices and value not in field.choices:
            raise ConfigError(field.parameter, value, f"use one of {', '.join(field.choices)} ({field.help})")
    return value


def apply(config: dict[str, Any], values: dict[str, Any]) -> RunConfig:
    """config_json with the run form's non-empty values on top, validated. Errors in a value the form
    set name the form's parameter."""
    unknown = sorted(set(values) - set(FORM_PARAMETERS))
    if unknown:
        raise ConfigError(unknown[0], values[unknown[0]], "not a run-form parameter; use one of "
                          + ", ".join(FORM_PARAMETERS))
    data = copy.deepcopy(config)
    applied: dict[str, FormField] = {}
    set_values: dict[str, Any] = {}  # what the form set, as set: the run's name says it
    for field in RUN_FORM:
        value = values.get(field.parameter)
        if is_empty(value):
            continue
        value = _checked_value(field, value)
        node = data
        *sections, last = field.key.split(".")
        for section in sections:
            if node.get(section) is None:
                raise ConfigError(field.parameter, value, f"config_json sets {'.'.join(sections)} to null, so there is "
                                  f"nothing for {field.parameter} to set; leave it empty or give config_json a "
                                  f"{'.'.join(sections)} section")
            node = node[section]
        node[last] = value
        applied[field.key] = field
        set_values[field.key] = value
    if "train.epochs" in applied and "train.max_steps" not in applied:
        data["train"]["max_steps"] = None  # epochs size the run (config: one of the two)
    tracking = data.setdefault("tracking", {})
    if applied and not tracking.get("run_name"):  # the name says what this run's form changed
        tracking["run_name"] = run_name(data.get("register", {}).get("model_name", "run"), set_values)
    try:
        return from_dict(data)
    except ConfigError as exc:
        field = applied.get(exc.field)
        if field is None:
            raise
        raise ConfigError(field.parameter, exc.value, f"{exc.fix} ({field.help})") from None


def on_cluster() -> bool:
    """In a pod of a Kubernetes cluster (every pod gets this variable), not under `kubetune run`."""
    return "KUBERNETES_SERVICE_HOST" in os.environ


def _is_local_path(location: str) -> bool:
    return location.startswith(("/", "./", "../", "~", "file:")) or Path(location).expanduser().exists()


def check_for_cluster(cfg: RunConfig) -> RunConfig:
    """A pod sees none of the submitting machine's files: every location must be remote. One message,
    naming the first place by its run-form parameter where there is one and listing the others."""
    problems: list[tuple[str, Any, str]] = []
    for key, value in (("data.path", cfg.data.path), ("data.test_path", cfg.data.test_path),
                       ("data.replay_path", cfg.data.replay_path),
                       ("evaluate.retention_path", cfg.evaluate.retention_path)):
        if value is not None and not value.startswith("s3://"):
            problems.append((key, value, "a pod cannot read this machine's files: upload it and give its "
                             "s3://bucket/key" + (" (or null to skip it)" if key != "data.path" else "")))
    if _is_local_path(cfg.model.name_or_path):
        problems.append(("model.name_or_path", cfg.model.name_or_path, "a pod cannot read this machine's files: "
                         "give a hub id, an s3:// snapshot or package:<name>"))
    if cfg.storage.uri is None or not cfg.storage.uri.startswith("s3://"):
        problems.append(("storage.uri", cfg.storage.uri, "on a cluster checkpoints and adapters must outlive the "
                         "pods: give s3://bucket/prefix"))
    if cfg.notify.webhook_url is not None:
        problems.append(("notify.webhook_url", webhook_shown(cfg.notify.webhook_url), "a URL in the config is "
                         "visible in the KFP run's parameters: put it in the kubetune-notify Secret (key "
                         f"{WEBHOOK_ENV}) and set notify.webhook_url to null"))
    uri = cfg.tracking.mlflow_uri
    if uri is not None and not uri.startswith(("http://", "https://")):
        problems.append(("tracking.mlflow_uri", uri, "pods need an MLflow server: give its http(s):// URL, or null "
                         "to use MLFLOW_TRACKING_URI from the kubetune-endpoints ConfigMap"))
    if problems:
        names = [_BY_KEY[key].parameter if key in _BY_KEY else key for key, _, _ in problems]
        key, value, fix = problems[0]
        if key in _BY_KEY:
            fix += f"; set the run form's {names[0]}"
        if len(problems) > 1:
            fix += f" (also to set for a cluster: {', '.join(names[1:])})"
        raise ConfigError(names[0], value, fix)
    return cfg


def cluster_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The config compiled into the pipeline: the embedded defaults without the optional local-only
    inputs (the retention text beside a checkout), so that the one thing a cluster run must be told
    is where its data and storage are, and preflight says so by parameter name."""
    data = copy.deepcopy(config)
    data["evaluate"]["retention_path"] = None
    return data


#: The preflight task's verdict, which the pipeline's dsl.If reads: train, or skip (when_data_changes
#: and the data is what the champion was trained on).
TRAIN, SKIP = "train", "skip"
