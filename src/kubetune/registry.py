"""register: the adapter, its tokenizer and a reference to the base model as one MLflow model version.

The base weights are not copied into the registry (a 6.7B base would be 13 GB per version): the
model carries the base model's name and fingerprint and loads it on first use. The new version
becomes the `champion` when it beats the current one on the task kind's registry score.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc

from kubetune import __version__, tracking
from kubetune.config import LoraSettings, ModelConfig
from kubetune.model_source import resolve_model
from kubetune.modeling import load_tuned
from kubetune.scoring import class_predictions, generate
from kubetune.tasks import TaskKind, get_task
from kubetune.tasks.base import CLASSES
from kubetune.tasks.prompts import build_prompt
from kubetune.tokenization import load_tokenizer

log = logging.getLogger(__name__)

CHAMPION = "champion"
#: Rows per forward pass when the served model predicts.
PREDICT_BATCH = 8


class AdapterModel(mlflow.pyfunc.PythonModel):
    """pyfunc over the base model plus the adapter. Classification returns the label name of each
    string in a `text` column; the language-model kinds complete the strings in a `prompt` column,
    and instruction models also take `instruction` (and optional `input`) columns and build the
    prompt with the template they were trained on."""

    def load_context(self, context):
        settings = context.model_config
        cfg = ModelConfig(name_or_path=settings["base_model"], quantization=settings["quantization"],
                          lora=LoraSettings() if settings.get("lora", True) else None)
        self.kind = get_task(settings.get("task", "causal_lm"))
        self.info = settings.get("task_info") or {}
        self.tokenizer = load_tokenizer(Path(context.artifacts["adapter"]))
        self.model = load_tuned(resolve_model(cfg.name_or_path), Path(context.artifacts["adapter"]), cfg,
                                self.kind, self.info)
        self.max_new_tokens = int(settings.get("max_new_tokens", 32))
        self.prompt_format = settings.get("prompt_format")

    def predict(self, context, model_input, params: Optional[dict[str, Any]] = None):
        if self.kind.scoring == CLASSES:
            texts = _column(model_input, "text")
            rows = self.tokenizer(texts, truncation=True)
            ids = class_predictions(self.model, self.tokenizer, [
                {"input_ids": ids, "attention_mask": mask} for ids, mask in zip(rows["input_ids"], rows["attention_mask"])
            ], PREDICT_BATCH)
            names = self.info.get("id2label", {})
            return [names.get(str(i), str(i)) for i in ids]
        limit = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        prompts = [self.tokenizer(prompt)["input_ids"] for prompt in self.prompts(model_input)]
        return generate(self.model, self.tokenizer, prompts, limit, PREDICT_BATCH)

    def prompts(self, model_input) -> list[str]:
        columns = set(getattr(model_input, "columns", []))
        if not self.prompt_format or "prompt" in columns or not columns & {"instruction", "input"}:
            return _column(model_input, "prompt")
        rows = len(model_input)
        fixed = (self.prompt_format.get("instruction") or "").strip()
        instructions = list(model_input["instruction"]) if "instruction" in columns else [fixed] * rows
        inputs = list(model_input["input"]) if "input" in columns else [""] * rows
        return [build_prompt(self.prompt_format["template"], str(instruction or fixed), str(text or ""))
                for instruction, text in zip(instructions, inputs)]


def _column(model_input, name: str) -> list[str]:
    """A DataFrame's column, or a plain list of strings as it is."""
    return list(model_input[name]) if hasattr(model_input, "columns") else list(model_input)


def requirements() -> list[str]:
    # Explicit, so MLflow does not guess (it otherwise looks for packages such as torchvision).
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")]
    return [f"kubetune=={__version__}", *pins]


def model_config(plan: dict[str, Any], kind: TaskKind, info: dict[str, Any],
                 prompt_format: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What AdapterModel.load_context needs to load and serve the model."""
    return {"base_model": plan["name_or_path"], "quantization": plan["quantization"], "task": kind.name,
            "task_info": info, "lora": plan["lora"] is not None,
            "base_fingerprint": plan.get("source", {}).get("fingerprint", ""), "prompt_format": prompt_format}


def register(tracking_uri: str, run_id: str, model_name: str, adapter_dir: Path, settings: dict[str, Any],
             metrics: dict[str, float], lineage: dict[str, str], score: tuple[str, bool]) -> dict[str, Any]:
    """Logs the model into the run, registers a new version tagged with its lineage and metrics, and
    moves the champion alias to it when it beats the current champion on score (metric, higher is
    better)."""
    import mlflow
    from mlflow import MlflowClient

    with tracking.process_uris(tracking_uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=AdapterModel(),
            artifacts={"adapter": str(adapter_dir)},  # the tokenizer is saved beside the adapter
            model_config=settings,
            pip_requirements=requirements(),
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
