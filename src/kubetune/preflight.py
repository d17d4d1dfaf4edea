"""preflight: the checks that must pass before any GPU is asked for: config, data contract, model
fit, services.

Every failure is a UserError naming the field and the value; nothing here loads model weights
for training (the model's structure is built on the meta device). `kubetune run` and `kubetune
check` run the same checks in the CLI's process, so bad input fails before any task starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune import artifacts, modeling, retrieval, tracking
from kubetune.config import RunConfig
from kubetune.errors import ConfigError
from kubetune.data import prepare_data
from kubetune.evaluation import retention_texts
from kubetune.sources import head
from kubetune.model_source import check_snapshot, describe_source, resolve_model
from kubetune.storage import open_store
from kubetune.tasks import get_task
from kubetune.tokenization import load_tokenizer

log = logging.getLogger(__name__)

#: Set by `kubetune run` for the stages it starts: the config its own preflight passed and what that
#: preflight found, so the pipeline's preflight task, seconds later, does not check it all again.
PASSED_ENV = "KUBETUNE_PREFLIGHT_PASSED"


@dataclass
class PreflightReport:
    tracking_uri: str
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    storage_uri: str = ""


#: Training records preflight encodes with the model's tokenizer (chat: renders with its template).
ENCODED_SAMPLE = 32


def check_data(cfg: RunConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole data set read, checked against the data contract, normalised and split as
    prepare_data will (into a temporary folder, a batch at a time), and the task info tokenize will
    learn from it (its checks, such as at least two classes, run here too); and the first training
    records, for check_encoding."""
    with tempfile.TemporaryDirectory(prefix="kubetune-preflight-") as folder:
        splits = prepare_data(cfg.data, cfg.task, cfg.train.seed, cfg.storage.endpoint_url, out_dir=Path(folder))
        info = get_task(cfg.task).info(artifacts.split_rows(splits.folder, "train"), cfg.data)
        sample = head(artifacts.split_rows(splits.folder, "train"), ENCODED_SAMPLE)
    stats = splits.stats
    if cfg.evaluate.retention_path:
        retention_texts(cfg)
    return {"rows": stats["rows_source"], "train_rows": stats["rows_train"],
            "validation_rows": stats["rows_validation"], "sha256": stats["content_sha256"],
            "info": info}, sample


def check_encoding(cfg: RunConfig, model_dir: str, sample: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """The first training records encoded as tokenize will: a missing chat template, one that cannot
    render the data, or answers that never fit data.max_length fail here, not after training."""
    kind = get_task(cfg.task)
    tokenizer = load_tokenizer(Path(model_dir))
    kind.prepare_tokenizer(tokenizer, cfg.data)
    kind.encode(sample, tokenizer, cfg.data, info)


def check_model(cfg: RunConfig, info: dict[str, Any]) -> dict[str, Any]:
    model_dir = resolve_model(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)
    check_snapshot(cfg.model.name_or_path, model_dir)
    skeleton = modeling.meta_model(model_dir, get_task(cfg.task), info)
    modeling.check_quantizable(model_dir, skeleton, cfg.model.quantization)
    blocks = modeling.check_freeze(skeleton, cfg.model)
    if cfg.model.lora is not None:
        modeling.check_target_modules(skeleton, cfg.model.lora.target_modules)
    return {"path": str(model_dir), "architecture": type(skeleton).__name__, "blocks": blocks,
            **describe_source(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)}


def check_rag(cfg: RunConfig) -> None:
    """evaluate.rag: a kind it applies to, a corpus with at least top_k passages, an embedding model
    that loads (all before any training)."""
    rag = cfg.evaluate.rag
    if rag is None:
        return
    if not get_task(cfg.task).retrieval:
        raise ConfigError("task", cfg.task, "evaluate.rag (retrieval) is measured for instruction and multitask runs "
                          "(a prompt and its answer); set evaluate.rag: null for this task")
    passages = retrieval.load_passages(rag, cfg.data, cfg.storage.endpoint_url)
    if rag.top_k > len(passages):
        raise ConfigError("evaluate.rag.top_k", rag.top_k, f"the corpus holds only {len(passages)} passages; lower "
                          "top_k or give a larger evaluate.rag.corpus_path")
    retrieval.load_embedder(rag, cfg.storage.endpoint_url)


def check_precision(cfg: RunConfig, train_gpus: Optional[bool]) -> None:
    """fp16 and bf16 need a GPU where train runs: on this machine (train_gpus None) or, on a cluster,
    as the pipeline's accelerator settings grant. Whether a cluster GPU has bf16 is only known there."""
    if cfg.train.precision not in ("fp16", "bf16"):
        return
    if train_gpus is None:
        import torch

        train_gpus = torch.cuda.is_available()
        if train_gpus and cfg.train.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision", cfg.train.precision, "this GPU has no bf16 support; use auto, fp16 "
                              "or fp32")
    if not train_gpus:
        raise ConfigError("train.precision", cfg.train.precision,
                          f"{cfg.train.precision} training needs a GPU and train gets none here; use auto (picks "
                          "fp16/bf16 where a GPU has them) or fp32")


def check_services(cfg: RunConfig) -> tuple[str, str]:
    uri = tracking.resolve_uri(cfg.tracking.mlflow_uri)
    tracking.check_reachable(uri)
    store = open_store(cfg.storage.uri, cfg.storage.endpoint_url)
    store.check()
    return uri, store.uri()


def preflight(cfg: RunConfig, train_gpus: Optional[bool] = None) -> PreflightReport:
    """Cheap checks first: config, data, services, then the model's structure. train_gpus: whether
    the train stage gets GPUs (on a cluster, from the accelerator settings); None = this machine's."""
    cfg.validate()
    check_precision(cfg, train_gpus)
    data_facts, sample = check_data(cfg)
    check_rag(cfg)
    tracking_uri, storage_uri = check_services(cfg)
    model_facts = check_model(cfg, data_facts["info"])
    check_encoding(cfg, model_facts["path"], sample, data_facts["info"])
    log.info("preflight passed: the data contract held on all %d records (%d train / %d validation rows), %s with "
             "%d blocks", data_facts["rows"], data_facts["train_rows"], data_facts["validation_rows"],
             model_facts["architecture"], model_facts["blocks"])
    return PreflightReport(tracking_uri=tracking_uri, data=data_facts, model=model_facts, storage_uri=storage_uri)


def _digest(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def passed_record(cfg: RunConfig, report: PreflightReport) -> str:
    """What `kubetune run` hands its stages (in PASSED_ENV) after its preflight passed."""
    return json.dumps({"config": _digest(cfg), "report": dataclasses.asdict(report)}, default=str)


def passed_earlier(cfg: RunConfig, train_gpus: Optional[bool]) -> Optional[PreflightReport]:
    """The report of the preflight `kubetune run` passed for exactly this config, or None (a cluster,
    another config): then the checks run. The precision check runs again: it depends on the GPUs the
    stage is granted, which the run's own process did not know."""
    try:
        record = json.loads(os.environ.get(PASSED_ENV) or "null")
        if not isinstance(record, dict) or record.get("config") != _digest(cfg):
            return None
        report = PreflightReport(**record["report"])
    except (ValueError, TypeError, KeyError):
        return None
    check_precision(cfg, train_gpus)
    log.info("preflight passed in `kubetune run` for this config; not repeated")
    return report
