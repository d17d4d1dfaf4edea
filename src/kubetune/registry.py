"""register: the adapter, its tokenizer and a reference to the base model as one MLflow model version.

The base weights are not copied into the registry (a 6.7B base would be 13 GB per version): the
model carries the base model's name, where it was resolved to, and its fingerprint, and loads it
on first use. The new version becomes the `champion` when it beats the current one on the task
kind's registry score.

The version is an MLflow "model from code": kubetune_serving/mlflow_model.py with the
kubetune_serving package beside it (code_paths; it imports no kubetune), plus two artifacts, the
adapter folder and settings.json. So it loads, and `mlflow models serve` serves it, where mlflow,
torch, transformers and peft are installed and kubetune is not; its
requirements pin those (and bitsandbytes for a quantized base), never kubetune. The settings are
an artifact and not pyfunc's model_config: MLflow logs a model_config as params of the active run
(12 un-namespaced ones: `lora`, `quantization`, `task_info/...`), and the run's params are its
config. The signature and the input example say which columns the task kind reads.

MLflow checks the input example by loading the logged model and predicting it once
(pyfunc.log_model has no switch to skip it), so registering loads the base and the adapter once
more, from where the settings say the base is (the register stage in all: 1.2 s for the tests'
tiny Llama on an 8-bit base, on the CPU). A failed check is logged as a warning, not raised.

What MLflow is told, and how, is kubetune.tracking.models; this module decides what a version
holds and whether it becomes the champion (promote_if_better takes any store with aliased() and
set_alias(), so the rule is tested on plain data).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Protocol

import kubetune_serving
from kubetune_serving.model import DEFAULT_MAX_NEW_TOKENS, LABELS, TEXT
from kubetune_serving.prompts import ALPACA_TEMPLATE

from kubetune import __version__
from kubetune.model_source import resolve_model
from kubetune.tasks import TaskKind
from kubetune.tasks.base import CLASSES
from kubetune.tracking import models

log = logging.getLogger(__name__)

CHAMPION = "champion"
#: The package a registered version is served with, and the file of it MLflow executes (models from code).
SERVING_PACKAGE = Path(kubetune_serving.__file__).parent
SERVED_MODEL_FILE = SERVING_PACKAGE / "mlflow_model.py"
SETTINGS_FILE = "settings.json"
#: Input examples by what the model reads.
EXAMPLE_TEXT = "The battery lasts all day and the screen is lovely."
EXAMPLE_PROMPT = "The best way to learn is"
EXAMPLE_INSTRUCTION = "Is this review positive or negative?"
EXAMPLE_QUESTION = "What makes a good cup of tea?"


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
    """What the served model (kubetune_serving) needs to load and serve the model. The task
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
    if settings["predicts"] == LABELS:
        return models.signature([("text", "string", True)], [])
    if (settings.get("prompt_format") or {}).get("chat"):
        inputs = [("messages", models.MESSAGES, False), ("prompt", "string", False)]
    elif settings.get("prompt_format"):
        inputs = [(name, "string", False) for name in ("prompt", "instruction", "input")]
    else:
        inputs = [("prompt", "string", True)]
    params = [("max_new_tokens", "long", settings["max_new_tokens"]),
              *([("retrieve", "boolean", True)] if settings.get("retrieval") else [])]
    return models.signature(inputs, params)


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


def served_code(work: Path) -> Path:
    """A clean copy of the serving package to log with the version (no __pycache__ or editor files)."""
    return Path(shutil.copytree(SERVING_PACKAGE, work / SERVING_PACKAGE.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*")))


def register(tracking_uri: str, run_id: str, model_name: str, adapter_dir: Path, settings: dict[str, Any],
             metrics: dict[str, float], lineage: dict[str, str], score: tuple[str, bool],
             retrieval: Optional[tuple[Path, dict[str, Any]]] = None) -> dict[str, Any]:
    """Logs the model into the run, registers a new version tagged with its lineage and metrics, and
    moves the champion alias to it when it beats the current champion on score (metric, higher is
    better). retrieval: evaluate.rag's index folder and settings; the version then retrieves as
    evaluation did (its passages and vectors travel with it; the embedding model is referenced)."""
    settings = {**settings, "unquantized_modules": unquantized_modules(settings, adapter_dir),
                **({"retrieval": retrieval[1]} if retrieval else {})}
    files = {"adapter": str(adapter_dir), **({"retrieval": str(retrieval[0])} if retrieval else {})}
    with tempfile.TemporaryDirectory(prefix="kubetune-register-") as work:
        settings_file = Path(work) / SETTINGS_FILE
        settings_file.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        code = served_code(Path(work))
        version, model_uri = models.log_code_model(
            tracking_uri, run_id, model_name, code_file=code / SERVED_MODEL_FILE.name, code_paths=[code],
            # the tokenizer is saved beside the adapter
            artifacts={**files, "settings": str(settings_file)},
            signature=signature(settings), input_example=input_example(settings),
            requirements=requirements(settings))
    store = models.ModelStore(tracking_uri)
    tags = {**lineage, "run_id": run_id, "base_model": settings["base_model"], "kubetune_version": __version__,
            **{k: str(v) for k, v in metrics.items()}}
    store.tag_version(model_name, version, tags)

    score_key, higher_is_better = score
    promoted = promote_if_better(store, model_name, version, score_key, metrics.get(score_key), higher_is_better)
    log.info("registered %s version %s (champion: %s)", model_name, version, promoted)
    return {"model_name": model_name, "version": version, "model_uri": model_uri, "champion": promoted}


class Versions(Protocol):
    """What the promotion rule reads and moves: kubetune.tracking.models.ModelStore, or a stand-in."""

    def aliased(self, name: str, alias: str) -> Optional[tuple[str, dict[str, str]]]: ...

    def set_alias(self, name: str, alias: str, version: str) -> None: ...


def beats(score: float, best: Optional[str], higher_is_better: bool) -> bool:
    """The new version's score against the champion's recorded one (a version tag, so text); a
    champion without the score (registered before the metric existed) is beaten by any score. A tie
    keeps the champion: moving the alias for no gain would change what serves for nothing."""
    if best is None:
        return True
    return score > float(best) if higher_is_better else score < float(best)


def promote_if_better(store: Versions, model_name: str, version: str, score_key: str, score: Optional[float],
                      higher_is_better: bool) -> bool:
    """Moves the champion alias to version when its score beats the champion's; True when it did."""
    if score is None:
        return False
    current = store.aliased(model_name, CHAMPION)
    if current is not None and not beats(score, current[1].get(score_key), higher_is_better):
        return False
    store.set_alias(model_name, CHAMPION, version)
    return True
