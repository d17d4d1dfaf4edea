"""export: a registered adapter merged into its base model, written as a standalone model folder.

A registered kubetune version is an adapter plus a reference to its base: serving it needs the
base snapshot and PEFT (kubetune_serving loads it). The exported folder needs only
transformers: the LoRA update (B·A·alpha/r) is added into the base weights (PEFT's
merge_and_unload) and the result saved with save_pretrained as safetensors, with the tokenizer
beside it.

The base is loaded unquantized (fp32 unless --dtype says otherwise) even when the adapter was
trained on an 8-bit or 4-bit base: the merged weights are the dequantized base plus the update,
so the exported model differs from the registered one by the base's quantization error (for the
demo's Gemma 3 270M see docs/mlflow.md, on `kubetune export`, for the held-out perplexity of both).

Nothing is written unless the whole export succeeds: the folder is built beside the target and
renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from kubetune import tracking
from kubetune.config import LoraSettings, ModelConfig
from kubetune.errors import ConfigError, ModelError
from kubetune.model_source import fingerprint, resolve_model
from kubetune.modeling import load_base_model, load_tuned
from kubetune.registry import pins
from kubetune.tasks import get_task
from kubetune.tasks.base import CLASSES
from kubetune.tokenization import load_tokenizer
from kubetune.tracking import models

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Exported:
    path: Path
    source_uri: str
    base_model: str
    task: str
    bytes: int
    registered: Optional[str] = None  # "name/version" when registered


def model_uri(reference: str) -> str:
    """An MLflow model URI for what the user typed: NAME/VERSION, NAME@ALIAS, a run id (its `model`),
    or any models:/ or runs:/ URI as it is."""
    reference = reference.strip()
    if reference.startswith(("models:/", "runs:/")):
        return reference
    if _RUN_ID.match(reference):
        return f"runs:/{reference}/model"
    if re.match(r"^[^/@]+(/\d+|@[\w-]+)$", reference):
        return f"models:/{reference}"
    raise ConfigError("--model", reference, "give a registered version as NAME/VERSION (e.g. quotes-lora/3), "
                                            "NAME@ALIAS (e.g. quotes-lora@champion), a run id, or a models:/ URI")


def fetch(tracking_uri: str, reference: str, dest: Path) -> tuple[str, Path, dict[str, Any]]:
    """Downloads the registered model; returns (its URI, the adapter folder, the settings it was
    registered with)."""
    uri = model_uri(reference)
    local = models.download(tracking_uri, uri, dest, "--model", reference)
    adapter, settings = registered_parts(local)
    if adapter is None or "base_model" not in settings:
        raise ModelError("--model", reference, "this is not a model kubetune registered (its MLmodel has no adapter "
                                               "and base-model settings); export takes versions `kubetune run` made")
    return uri, adapter, settings


def registered_parts(local: Path) -> tuple[Optional[Path], dict[str, Any]]:
    """(the adapter folder, the settings) of a downloaded version; (None, {}) when it has none.

    Settings are the `settings` artifact (settings.json) of versions served from
    kubetune_serving (or the single file served_model.py before it), or the python_function `config`
    (pyfunc's model_config) of the versions registered before those, which were CloudPickled
    kubetune classes."""
    mlmodel = local / "MLmodel"
    flavor = (yaml.safe_load(mlmodel.read_text()) if mlmodel.exists() else {}).get("flavors", {}).get(
        "python_function", {})
    paths = {name: entry.get("path") for name, entry in (flavor.get("artifacts") or {}).items()
             if isinstance(entry, dict)}
    if paths.get("settings"):
        settings = json.loads((local / paths["settings"]).read_text())
    else:
        settings = flavor.get("config") or {}
    return (local / paths["adapter"] if paths.get("adapter") else None), settings


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError("--out", str(out_dir), "is not an empty folder; give a new or empty folder "
                                                 "(export never writes over files)")


def _readable_as_umask_allows(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def merge(settings: dict[str, Any], adapter_dir: Path, out_dir: Path, dtype: str = "float32",
          endpoint_url: Optional[str] = None) -> None:
    """The base at full precision plus the adapter, merged, saved to out_dir with the tokenizer."""
    import torch

    kind = get_task(settings.get("task", "causal_lm"))
    info = settings.get("task_info") or {}
    base_dir = resolve_model(settings["base_model"], endpoint_url=endpoint_url)
    expected = settings.get("base_fingerprint")
    if expected and fingerprint(base_dir) != expected:
        log.warning("export: the base model at %s is not the snapshot the adapter was trained on (fingerprint %s, "
                    "trained on %s); the merge goes ahead", base_dir, fingerprint(base_dir), expected)
    cfg = ModelConfig(name_or_path=settings["base_model"], quantization="none",
                      lora=LoraSettings() if settings.get("lora", True) else None)
    model = load_tuned(base_dir, adapter_dir, cfg, kind, info) if cfg.lora else load_base_model(
        adapter_dir, "none", kind, info)
    if cfg.lora:
        model = model.merge_and_unload()
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out_dir)


def export(tracking_uri: str, reference: str, out_dir: Path, dtype: str = "float32",
           register_as: Optional[str] = None, endpoint_url: Optional[str] = None) -> Exported:
    """Merges a registered version into its base and writes it to out_dir (new or empty); with
    register_as, also logs it as an MLflow transformers model and registers it under that name."""
    if dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, f"use one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir).expanduser().resolve()
    _check_target(out_dir)
    tracking_uri = tracking.resolve_uri(tracking_uri)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kubetune-export-", dir=out_dir.parent) as work:
        uri, adapter_dir, settings = fetch(tracking_uri, reference, Path(work) / "registered")
        built = Path(work) / "merged"
        merge(settings, adapter_dir, built, dtype, endpoint_url)
        (built / "kubetune_export.json").write_text(json.dumps(
            {"source": uri, "base_model": settings["base_model"], "task": settings.get("task", "causal_lm"),
             "dtype": dtype, "task_info": settings.get("task_info") or {}}, indent=2) + "\n")
        _readable_as_umask_allows(built)  # files written through temporary files come out 0600
        _check_target(out_dir)  # nothing appeared there while merging
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(built), str(out_dir))
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    exported = Exported(out_dir, uri, settings["base_model"], settings.get("task", "causal_lm"), size)
    log.info("export: %s merged into %s: %s (%.1f MB)", uri, settings["base_model"], out_dir, size / 1e6)
    if register_as:
        exported.registered = register_merged(tracking_uri, exported, register_as)
    return exported


def register_merged(tracking_uri: str, exported: Exported, model_name: str) -> str:
    """Logs the merged folder with MLflow's transformers flavor (loadable with mlflow and
    transformers alone, no kubetune) into a new run, with an input example, and registers it."""
    kind = get_task(exported.task)
    pipeline_task = "text-classification" if kind.scoring == CLASSES else "text-generation"
    example = "This is great" if pipeline_task == "text-classification" else "The best way to learn is"
    from transformers import pipeline

    # A pipeline object, not the folder's path: MLflow's path mode reads pipeline metadata that
    # transformers 5 no longer has (mlflow 3.17.2 fails with "'str' object has no attribute '__name__'").
    served = pipeline(pipeline_task, model=str(exported.path), tokenizer=str(exported.path))
    tags = {"kubetune.exported_from": exported.source_uri, "kubetune.base_model": exported.base_model}
    number, run_id = models.log_transformers_model(tracking_uri, f"export-{model_name}", tags, served, pipeline_task,
                                                   example, model_name, pins(["torch", "transformers"]))
    version = f"{model_name}/{number}"
    log.info("export: registered %s (run %s)", version, run_id)
    return version
