"""register: the adapter, its tokenizer and a reference to the base model as one MLflow model version.

The base weights are not copied into the registry (a 6.7B base would be 13 GB per version): the
model carries the base model's name, where it was resolved to, and its fingerprint, and loads it
on first use. The new version becomes the `champion` when it beats the current one on the task
kind's registry score.

The version is an MLflow "model from code": kubetune/served_model.py (which imports no kubetune)
plus two artifacts, the adapter folder and settings.json. So it loads, and `mlflow models serve`
serves it, where mlflow, torch, transformers and peft are installed and kubetune is not; its
requirements pin those (and bitsandbytes for a quantized base), never kubetune. The settings are
an artifact and not pyfunc's model_config: MLflow logs a model_config as params of the active run
(12 un-namespaced ones: `lora`, `quantization`, `task_info/...`), and the run's params are its
config. The signature and the input example say which columns the task kind reads.

MLflow checks the input example by loading the logged model and predicting it once
(pyfunc.log_model has no switch to skip it), so registering loads the base and the adapter once
more, from where the settings say the base is (the register stage in all: 1.2 s for the tests'
tiny Llama on an 8-bit base, on the CPU). A failed check is logged as a warning, not raised.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

from kubetune import __version__, served_model, tracking
from kubetune.config import ALPACA_TEMPLATE
from kubetune.errors import ConfigError
from kubetune.model_source import resolve_model
from kubetune.served_model import DEFAULT_MAX_NEW_TOKENS, LABELS, TEXT
from kubetune.tasks import TaskKind
from kubetune.tasks.base import CLASSES

log = logging.getLogger(__name__)

CHAMPION = "champion"
#: The code MLflow executes to load a registered version (models from code).
SERVED_MODEL_FILE = Path(served_model.__file__)
SETTINGS_FILE = "settings.json"
#: Input examples by what the model reads.
EXAMPLE_TEXT = "The battery lasts all day and the screen is lovely."
EXAMPLE_PROMPT = "The best way to learn is"
EXAMPLE_INSTRUCTION = "Is this review positive or negative?"
EXAMPLE_QUESTION = "What makes a good cup of tea?"


def check_model_name(name: str) -> None:
    """register.model_name by MLflow's own rules for a registered model's name, those of its file
    store (the strictest: it adds no path separators and no '%' to the rules every store applies), so
    a name MLflow would refuse fails in preflight, not in register after training."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise ConfigError("register.model_name", name, f"MLflow refuses it ({exc.message}); use letters, digits, "
                          "'-', '_' and '.', e.g. quotes-lora") from None


def pins(names: list[str]) -> list[str]:
    """name==version as installed, without a local version label: torch's CPU wheel is 2.13.0+cpu,
    which no index but PyTorch's serves, while ==2.13.0 matches it and PyPI's build alike."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def requirements(settings: dict[str, Any]) -> list[str]:
    """What the served model imports, pinned to what trained it; explicit, so MLflow does not
    guess (it otherwise looks for packages such as torchvision). bitsandbytes only for a quantized
    base (the served model loads it unquantized without bitsandbytes); never kubetune."""
    quantized = settings.get("quantization", "none") != "none"
    return pins(["torch", "transformers", "peft", "accelerate", *(["bitsandbytes"] if quantized else [])])


def model_config(plan: dict[str, Any], kind: TaskKind, info: dict[str, Any],
                 prompt_format: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What the served model (kubetune.served_model) needs to load and serve the model. The task
    kind's decisions travel as data: the model class, its config overrides (head size, label
    names, pad id), and what predict returns. An `alpaca` prompt format carries the Alpaca text, so
    a version keeps the prompt it was trained on whatever later kubetune versions change."""
    if prompt_format and prompt_format.get("template") == "alpaca":
        prompt_format = {**prompt_format, "alpaca_template": ALPACA_TEMPLATE}
    source = plan.get("source") or {}
    return {"base_model": plan["name_or_path"],
            "base_model_path": source.get("path") or str(resolve_model(plan["name_or_path"])),
            "quantization": plan["quantization"], "task": kind.name, "task_info": info,
            "lora": plan["lora"] is not None, "base_fingerprint": source.get("fingerprint", ""),
            "prompt_format": prompt_format, "model_class": kind.auto_model_class().__name__,
            "model_kwargs": kind.model_kwargs(info), "predicts": LABELS if kind.scoring == CLASSES else TEXT,
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}


def unquantized_modules(settings: dict[str, Any], adapter_dir: Path) -> Optional[list[str]]:
    """The modules training kept out of 8-bit/4-bit quantization (a new task head), for the served
    model to keep out too: the adapter's modules_to_save, the fully trained modules it holds
    (prepare_for_training puts the head there; PEFT adds its own guesses for the task type, such
    as `score` next to BERT's `classifier`, which name nothing in a model without them). A
    quantized base always trains with LoRA: full fine-tuning needs quantization none."""
    if settings["quantization"] == "none" or not settings["lora"]:
        return None
    saved = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save")
    return sorted(set(saved)) if saved else None


def signature(settings: dict[str, Any]):
    """Classification reads `text`; the language models read `prompt`, instruction models also
    `instruction` and `input`, chat models `messages` (lists of {role, content}; each column then
    optional); every model returns one string a row."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    outputs = Schema([ColSpec("string")])
    if settings["predicts"] == LABELS:
        return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=outputs)
    if (settings.get("prompt_format") or {}).get("chat"):
        message = Object([Property("role", "string"), Property("content", "string")])
        inputs = Schema([ColSpec(Array(message), "messages", required=False), ColSpec("string", "prompt", required=False)])
    elif settings.get("prompt_format"):
        inputs = Schema([ColSpec("string", name, required=False) for name in ("prompt", "instruction", "input")])
    else:
        inputs = Schema([ColSpec("string", "prompt")])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", settings["max_new_tokens"]),
                          *([ParamSpec("retrieve", "boolean", True)] if settings.get("retrieval") else [])])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(settings: dict[str, Any]):
    import pandas as pd

    if settings["predicts"] == LABELS:
        return pd.DataFrame({"text": [EXAMPLE_TEXT]})
    prompt_format = settings.get("prompt_format")
    if prompt_format and prompt_format.get("chat"):
        return pd.DataFrame({"messages": [[{"role": "user", "content": EXAMPLE_QUESTION}]]})
    if prompt_format:
        return pd.DataFrame({"instruction": [prompt_format.get("instruction") or EXAMPLE_INSTRUCTION],
                             "input": [EXAMPLE_TEXT]})
    return pd.DataFrame({"prompt": [EXAMPLE_PROMPT]})


def register(tracking_uri: str, run_id: str, model_name: str, adapter_dir: Path, settings: dict[str, Any],
             metrics: dict[str, float], lineage: dict[str, str], score: tuple[str, bool],
             retrieval: Optional[tuple[Path, dict[str, Any]]] = None) -> dict[str, Any]:
    """Logs the model into the run, registers a new version tagged with its lineage and metrics, and
    moves the champion alias to it when it beats the current champion on score (metric, higher is
    better). retrieval: evaluate.rag's index folder and settings; the version then retrieves as
    evaluation did (its passages and vectors travel with it; the embedding model is referenced)."""
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    settings = {**settings, "unquantized_modules": unquantized_modules(settings, adapter_dir),
                **({"retrieval": retrieval[1]} if retrieval else {})}
    files = {"adapter": str(adapter_dir), **({"retrieval": str(retrieval[0])} if retrieval else {})}
    with tempfile.TemporaryDirectory(prefix="kubetune-register-") as work, tracking.process_uris(tracking_uri), \
            mlflow.start_run(run_id=run_id, log_system_metrics=False):
        settings_file = Path(work) / SETTINGS_FILE
        settings_file.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVED_MODEL_FILE),
            # the tokenizer is saved beside the adapter
            artifacts={**files, "settings": str(settings_file)},
            signature=signature(settings),
            input_example=input_example(settings),
            pip_requirements=requirements(settings),
            registered_model_name=model_name,
            await_registration_for=60,
        )
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = str(info.registered_model_version)
    tags = {**lineage, "run_id": run_id, "base_model": settings["base_model"], "kubetune_version": __version__,
            **{k: str(v) for k, v in metrics.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)

    score_key, higher_is_better = score
    promoted = promote_if_better(client, model_name, version, score_key, metrics.get(score_key), higher_is_better)
    log.info("registered %s version %s (champion: %s)", model_name, version, promoted)
    return {"model_name": model_name, "version": version, "model_uri": info.model_uri, "champion": promoted}


def promote_if_better(client, model_name: str, version: str, score_key: str, score: Optional[float],
                      higher_is_better: bool) -> bool:
    if score is None:
        return False
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except Exception:  # no champion yet: the registry raises when the alias does not exist
        current = None
    if current is not None:
        best = current.tags.get(score_key)
        if best is not None and (float(best) >= score if higher_is_better else float(best) <= score):
            return False
    client.set_registered_model_alias(model_name, CHAMPION, version)
    return True
