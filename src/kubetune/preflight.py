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

from kubetune import artifacts, modeling, retrieval, tracking, trainjob
from kubetune.config import RunConfig
from kubetune.errors import ConfigError
from kubetune.data import prepare_data
from kubetune.evaluation import retention_texts
from kubetune.images import CUDA_IMAGE
from kubetune.sources import head
from kubetune.model_source import check_snapshot, describe_source, resolve_model
from kubetune.registry import skip_reason
from kubetune.storage import open_store
from kubetune.tasks import get_task
from kubetune.run_config import checked
from kubetune.tokenization import load_tokenizer
from kubetune.tracking.models import check_model_name

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
    skipped: str = ""  # why nothing will be trained (when_data_changes on data the champion has seen)


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


def check_encoding(cfg: RunConfig, model_dir: str, sample: list[dict[str, Any]], info: dict[str, Any]) -> float:
    """The first training records encoded as tokenize will: a missing chat template, one that cannot
    render the data, or answers that never fit data.max_length fail here, not after training. Returns
    their mean length in tokens."""
    kind = get_task(cfg.task)
    tokenizer = load_tokenizer(Path(model_dir))
    kind.prepare_tokenizer(tokenizer, cfg.data)
    encoded = kind.encode(sample, tokenizer, cfg.data, info)["input_ids"]
    return sum(len(ids) for ids in encoded) / max(1, len(encoded))


def check_model(cfg: RunConfig, info: dict[str, Any]) -> dict[str, Any]:
    model_dir = resolve_model(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)
    check_snapshot(cfg.model.name_or_path, model_dir)
    modeling.check_model_type(cfg.model.name_or_path, model_dir)
    skeleton = modeling.meta_model(model_dir, get_task(cfg.task), info)
    modeling.check_quantizable(model_dir, skeleton, cfg.model.quantization)
    blocks = modeling.check_freeze(skeleton, cfg.model)
    if cfg.model.lora is not None:
        modeling.check_target_modules(skeleton, cfg.model.lora.target_modules)
    positions = modeling.positions(skeleton)
    check_lengths(cfg, positions)
    return {"path": str(model_dir), "architecture": type(skeleton).__name__, "blocks": blocks,
            "positions": positions.limit if positions else None,
            **describe_source(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)}


def longest_prompt(cfg: RunConfig) -> tuple[int, str]:
    """The most tokens a held-out prompt that evaluate continues can have, and why."""
    if cfg.task == "causal_lm":
        return min(cfg.evaluate.prompt_tokens, cfg.data.max_length), "evaluate.prompt_tokens"
    if cfg.evaluate.rag is not None:
        return (cfg.data.max_length + cfg.evaluate.rag.context_tokens,
                "data.max_length + evaluate.rag.context_tokens")
    return cfg.data.max_length, "data.max_length"


def check_lengths(cfg: RunConfig, positions: Optional[modeling.Positions]) -> None:
    """No sequence longer than the model's positions: a training row of data.max_length tokens, and
    (where positions are learned absolute ones, so that no later position exists) a held-out prompt
    plus evaluate.max_new_tokens. Generation never runs past the positions on any model."""
    if positions is None:
        return
    if cfg.data.max_length > positions.limit:
        raise ConfigError("data.max_length", cfg.data.max_length,
                          f"{positions.describe()}; set data.max_length to {positions.limit} or less")
    new = cfg.evaluate.max_new_tokens
    if cfg.task == "classification":  # it predicts a class and generates nothing
        return
    prompt, why = longest_prompt(cfg)
    if positions.absolute and prompt + new > positions.limit:
        room = positions.limit - prompt
        fix = (f"set evaluate.max_new_tokens to {room} or less" if room > 0 else
               "lower data.max_length to leave room for the answer, then evaluate.max_new_tokens")
        raise ConfigError("evaluate.max_new_tokens", new, f"a held-out prompt of up to {prompt} tokens ({why}) "
                          f"plus {new} new ones passes the last position: {positions.describe()}; {fix}")
    if new > positions.limit:
        raise ConfigError("evaluate.max_new_tokens", new, f"generation would run past the model's positions: "
                          f"{positions.describe()}; generate at most that many, e.g. 64")


#: A run of more passes over its training rows than this is refused (after about 10 passes a model
#: has learned what it will from the data; thousands are a typo, or a week of GPU time); above
#: WARN_PASSES it is warned about. Optimizer steps beyond a 32-bit counter are refused too.
MAX_PASSES, WARN_PASSES, MAX_STEPS = 10_000, 100, 2**31 - 1
#: Tokens evaluate may generate in all (base and tuned, each prompt its full budget): refused above
#: MAX_GENERATED (a million tokens decode one at a time: hours on a GPU, days on a CPU), warned about
#: above WARN_GENERATED. The defaults generate a few thousand.
MAX_GENERATED, WARN_GENERATED = 1_000_000, 100_000


def check_run_size(cfg: RunConfig, train_rows: int, mean_tokens: float) -> dict[str, float]:
    """How long train and evaluate will run, logged; refused where absurd (the rules above)."""
    train = cfg.train
    per_step = train.rows_per_step()
    steps = train.total_steps(train_rows)
    passes = steps * per_step / max(1, train_rows)
    tokens = steps * per_step * min(mean_tokens, cfg.data.max_length)
    field_name, value = ("train.max_steps", train.max_steps) if train.max_steps is not None else ("train.epochs",
                                                                                                  train.epochs)
    estimate = (f"{steps:,} optimizer steps of {per_step} rows are {passes:,.{0 if passes >= 100 else 1}f} passes "
                f"over the {train_rows:,} training rows, about {tokens:,.0f} tokens")
    log.info("train: %s", estimate)
    if steps > MAX_STEPS or passes > MAX_PASSES:
        fix = (f"set train.max_steps to at most {min(MAX_STEPS, max(1, MAX_PASSES * train_rows // per_step)):,}, e.g. "
               f"{max(1, 3 * train_rows // per_step):,} for 3 passes" if train.max_steps is not None
               else "set train.epochs to a few passes, e.g. 3")
        raise ConfigError(field_name, value, f"{estimate}: more than {MAX_PASSES:,} passes (or {MAX_STEPS:,} steps) "
                          f"is no fine-tuning run; {fix}")
    if passes > WARN_PASSES:
        log.warning("train: %s; more than %d passes over the same rows mostly memorises them: is %s meant?",
                    estimate, WARN_PASSES, field_name)
    generated = generated_tokens(cfg)
    if generated > MAX_GENERATED:
        raise ConfigError("evaluate.max_new_tokens", cfg.evaluate.max_new_tokens, f"evaluate would generate up to "
                          f"{generated:,} tokens ({generation_terms(cfg)}), more than {MAX_GENERATED:,}; lower "
                          "evaluate.max_new_tokens, or evaluate.max_samples / num_generations")
    if generated > WARN_GENERATED:
        log.warning("evaluate: up to %s generated tokens (%s); that takes long", f"{generated:,}", generation_terms(cfg))
    elif generated:
        log.info("evaluate: up to %s generated tokens (%s)", f"{generated:,}", generation_terms(cfg))
    return {"steps": steps, "passes": round(passes, 2), "train_tokens": round(tokens), "generated_tokens": generated}


def _generations(cfg: RunConfig) -> tuple[int, int]:
    """(models, prompts) evaluate generates for: base and tuned (and both again with retrieval); the
    first evaluate.num_generations held-out texts (causal_lm), else every held-out row (an upper bound:
    rows whose answer is scored get a shorter budget), classification none."""
    if cfg.task == "classification":
        return 0, 0
    prompts = (cfg.evaluate.num_generations if cfg.task == "causal_lm"
               else max(cfg.evaluate.max_samples, cfg.evaluate.num_generations))
    return (4 if cfg.evaluate.rag is not None else 2), prompts


def generated_tokens(cfg: RunConfig) -> int:
    models, prompts = _generations(cfg)
    return models * prompts * cfg.evaluate.max_new_tokens


def generation_terms(cfg: RunConfig) -> str:
    models, prompts = _generations(cfg)
    return f"{models} models x {prompts} prompts x {cfg.evaluate.max_new_tokens} evaluate.max_new_tokens"


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


def check_nodes(cfg: RunConfig, train_gpus: Optional[bool]) -> None:
    """train.nodes > 1: storage every node can reach, GPUs for the nodes where the pipeline grants
    none, and a cluster that accepts a TrainJob (kubetune.trainjob.check_available)."""
    nodes = cfg.train.nodes
    if nodes == 1:
        return
    if not (cfg.storage.uri or "").startswith("s3://"):
        raise ConfigError("storage.uri", cfg.storage.uri, f"train.nodes is {nodes}: the nodes exchange the data, the "
                          "checkpoints and the adapter through storage, and no node can read another's disk; give "
                          "s3://bucket/prefix")
    if train_gpus is False:
        raise ConfigError("train.nodes", nodes, "the pipeline grants no GPUs (accelerator_count 0), so every node "
                          "would train on CPUs: set accelerator_count to 1 or more (each node then asks for "
                          "train.processes GPUs of accelerator_type), or train.nodes to 1")
    trainjob.check_available(nodes, cfg.train.processes, CUDA_IMAGE)


def preflight(cfg: RunConfig, train_gpus: Optional[bool] = None, when_data_changes: bool = False) -> PreflightReport:
    """Cheap checks first: config, data, services, then the model's structure. train_gpus: whether
    the train stage gets GPUs (on a cluster, from the accelerator settings); None = this machine's.
    when_data_changes: once the data is read (and hashed), the champion of register.model_name
    trained on the same data means nothing to train; then the model is not checked (nor fetched)
    and the report says why (registry.skip_reason)."""
    checked(cfg.validate())
    check_model_name(cfg.register.model_name)
    check_precision(cfg, train_gpus)
    data_facts, sample = check_data(cfg)
    tracking_uri, storage_uri = check_services(cfg)
    check_nodes(cfg, train_gpus)
    skipped = skip_reason(tracking_uri, cfg.register.model_name, data_facts["sha256"]) if when_data_changes else ""
    if skipped:
        log.info("preflight: %s", skipped)
        return PreflightReport(tracking_uri=tracking_uri, data=data_facts, storage_uri=storage_uri, skipped=skipped)
    check_rag(cfg)
    model_facts = check_model(cfg, data_facts["info"])
    mean_tokens = check_encoding(cfg, model_facts["path"], sample, data_facts["info"])
    data_facts["estimate"] = check_run_size(cfg, data_facts["train_rows"], mean_tokens)
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
