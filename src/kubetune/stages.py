"""One function per pipeline stage: what each KFP component calls, over plain paths.

Each stage rebuilds the validated RunConfig from the pipeline's config parameter, does its work
through the library, and logs into the pipeline run's MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from kubetune import __version__
from kubetune.config import RunConfig

log = logging.getLogger(__name__)

EVAL_FILE = "evaluation.json"


def _start(config: str | dict[str, Any]) -> RunConfig:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    from kubetune.modeling import quiet_bitsandbytes

    quiet_bitsandbytes()
    transformers_logging.disable_progress_bar()  # weight-loading bars; the training bar stays
    return RunConfig.from_dict(json.loads(config) if isinstance(config, str) else config)


def _logger(cfg: RunConfig, run_id: str):
    from kubetune.tracking import RunLogger, resolve_uri

    return RunLogger(resolve_uri(cfg.tracking.mlflow_uri), run_id)


def _store(cfg: RunConfig):
    from kubetune.storage import open_store

    return open_store(cfg.storage.uri, cfg.storage.endpoint_url)


def _model_dir(cfg: RunConfig) -> Path:
    from kubetune.model_source import resolve_model

    return resolve_model(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)


def _progress() -> bool:
    return os.environ.get("KUBETUNE_PROGRESS", "1") == "1"


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}"


def preflight(config: str | dict[str, Any]) -> str:
    """Checks everything, then opens the pipeline's MLflow run; returns its id."""
    from kubetune import tracking
    from kubetune.preflight import check

    started = time.monotonic()
    cfg = _start(config)
    report = check(cfg)
    tags = {"kubetune.task": cfg.task, "kubetune.base_model": cfg.model.name_or_path,
            "kubetune.data_sha256": report.data["sha256"], "kubetune.version": __version__,
            "kubetune.storage": report.storage_uri, "kubetune.technique": technique(cfg)}
    run_name = f"{cfg.register.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracking.start_run(report.tracking_uri, cfg.tracking.experiment, run_name, cfg.to_dict(), tags)
    logger = tracking.RunLogger(report.tracking_uri, run_id)
    logger.json({"data": report.data, "model": report.model, "storage": report.storage_uri}, "preflight.json")
    logger.tags({"kubetune.storage_run_prefix": _store(cfg).uri(run_prefix(run_id))})
    logger.metrics({"stage_seconds.preflight": round(time.monotonic() - started, 2)})
    log.info("MLflow run %s in experiment %s at %s", run_id, cfg.tracking.experiment, report.tracking_uri)
    return run_id


def technique(cfg: RunConfig) -> str:
    parts = [] if cfg.model.quantization == "none" else [cfg.model.quantization]
    if cfg.model.freeze_layers:
        parts.append(f"freeze{cfg.model.freeze_layers}")
    parts.append("lora" if cfg.model.lora is not None else "full")
    return "+".join(parts)


def prepare_data(config: str | dict[str, Any], run_id: str, out_dir: str) -> dict[str, Any]:
    from kubetune import data

    cfg = _start(config)
    with _logger(cfg, run_id).stage("prepare_data") as logger:
        splits = data.prepare(cfg.data, cfg.task, cfg.train.seed, cfg.storage.endpoint_url)
        data.save_splits(splits, Path(out_dir))
        logger.metrics({f"data.{k}": v for k, v in splits.stats.items() if isinstance(v, (int, float))})
        logger.json(splits.stats, "data/stats.json")
    return splits.stats


def tokenize(config: str | dict[str, Any], run_id: str, data_dir: str, out_dir: str) -> dict[str, Any]:
    from kubetune.tokenization import tokenize as encode

    cfg = _start(config)
    with _logger(cfg, run_id).stage("tokenize") as logger:
        stats = encode(Path(data_dir), _model_dir(cfg), cfg.data, Path(out_dir), cfg.task)
        logger.metrics({f"tokens.{k}": v for k, v in stats.items()})
    return stats


def prepare_model(config: str | dict[str, Any], run_id: str, tokenized_dir: str, out_dir: str) -> dict[str, Any]:
    from kubetune.data import load_info
    from kubetune.model_source import describe_source
    from kubetune.modeling import prepare

    cfg = _start(config)
    with _logger(cfg, run_id).stage("prepare_model") as logger:
        source = describe_source(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)
        plan = prepare(_model_dir(cfg), cfg.model, Path(out_dir), cfg.train.seed, source, cfg.task,
                       load_info(Path(tokenized_dir)))
        logger.params({"model.trainable_params": plan["trainable_params"], "model.all_params": plan["all_params"],
                       "model.trainable_percent": plan["trainable_percent"]})
        logger.metrics({"model.trainable_params": plan["trainable_params"], "model.all_params": plan["all_params"],
                        "model.trainable_percent": plan["trainable_percent"],
                        **{f"model.memory.{k}": v for k, v in plan["memory"].items()}})
        logger.text(plan["trainable_line"] + "\n", "model/trainable_parameters.txt")
        logger.tags({"kubetune.trainable_line": plan["trainable_line"]})
        logger.json(plan, "model/plan.json")
    return plan


def train(config: str | dict[str, Any], run_id: str, tokenized_dir: str, prepared_dir: str, out_dir: str) -> dict:
    """Trains in this process, or with train.processes > 1 in that many data-parallel worker
    processes started by torchrun (one per GPU; gloo on the CPU)."""
    cfg = _start(config)
    with _logger(cfg, run_id).stage("train") as logger:
        if cfg.train.processes > 1:
            summary = _train_distributed(config, run_id, tokenized_dir, prepared_dir, out_dir, cfg.train.processes)
        else:
            summary = train_worker(config, run_id, tokenized_dir, prepared_dir, out_dir)
        logger.metrics({f"train.{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary


def train_worker(config: str | dict[str, Any], run_id: str, tokenized_dir: str, prepared_dir: str,
                 out_dir: str) -> dict:
    from kubetune import training
    from kubetune.data import load_info
    from kubetune.modeling import load_for_training
    from kubetune.tasks import get_task
    from kubetune.tokenization import load_tokenized, load_tokenizer

    cfg = _start(config)
    kind = get_task(cfg.task)
    model = load_for_training(_model_dir(cfg), Path(prepared_dir), cfg.model, kind, load_info(Path(tokenized_dir)))
    tokenizer = load_tokenizer(Path(tokenized_dir) / "tokenizer")
    dataset = load_tokenized(Path(tokenized_dir), "train")
    return training.train(model, kind.collator(tokenizer), tokenizer, dataset, cfg.train,
                          work_dir=Path(out_dir).with_name("train-work"), out_dir=Path(out_dir),
                          logger=_logger(cfg, run_id), store=_store(cfg), prefix=run_prefix(run_id),
                          progress=_progress(), order=kind.train_order(dataset, cfg))


def _train_distributed(config, run_id: str, tokenized_dir: str, prepared_dir: str, out_dir: str,
                       processes: int) -> dict:
    import subprocess
    import sys
    import tempfile

    arguments = {"config": config if isinstance(config, str) else json.dumps(config), "run_id": run_id,
                 "tokenized_dir": tokenized_dir, "prepared_dir": prepared_dir, "out_dir": out_dir}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(arguments, handle)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "kubetune.distributed", handle.name]
    log.info("train: %d data-parallel processes: %s", processes, " ".join(command))
    subprocess.run(command, check=True)
    Path(handle.name).unlink(missing_ok=True)
    summary = json.loads((Path(out_dir) / "training_summary.json").read_text())
    summary.pop("history", None)
    return summary


@contextlib.contextmanager
def _adapter_disabled(model) -> Iterator[Any]:
    with model.disable_adapter():
        yield model


@contextlib.contextmanager
def _loaded(load) -> Iterator[Any]:
    model = load()
    try:
        yield model
    finally:
        del model


def evaluate(config: str | dict[str, Any], run_id: str, tokenized_dir: str, tuned_dir: str, out_dir: str) -> dict:
    import matplotlib.pyplot as plt

    from kubetune.data import load_info
    from kubetune.modeling import load_base_model, load_tuned
    from kubetune.tasks import get_task
    from kubetune.tokenization import heldout_split, load_tokenized, load_tokenizer

    cfg = _start(config)
    kind = get_task(cfg.task)
    with _logger(cfg, run_id).stage("evaluate") as logger:
        model_dir = _model_dir(cfg)
        info = load_info(Path(tokenized_dir))
        tokenizer = load_tokenizer(Path(tokenized_dir) / "tokenizer")
        split = heldout_split(Path(tokenized_dir))
        dataset = load_tokenized(Path(tokenized_dir), split)
        if cfg.model.lora is not None:
            model = load_tuned(model_dir, Path(tuned_dir), cfg.model, kind, info)
            variants = {"base": lambda: _adapter_disabled(model), "tuned": lambda: contextlib.nullcontext(model)}
        else:
            variants = {"base": lambda: _loaded(lambda: load_base_model(model_dir, cfg.model.quantization, kind, info)),
                        "tuned": lambda: _loaded(lambda: load_tuned(model_dir, Path(tuned_dir), cfg.model, kind, info))}
        result = kind.evaluate(variants["base"](), variants["tuned"](), tokenizer, dataset, info, cfg)
        result["metrics"]["eval.split_" + split] = 1
        if cfg.evaluate.retention_path:
            figures_or_reason = kind.retention(model_dir, variants["base"](), variants["tuned"](), tokenizer, cfg)
            if isinstance(figures_or_reason, str):
                log.info("retention: not applicable: %s", figures_or_reason)
                logger.tags({"eval.retention": f"not applicable: {figures_or_reason}"})
            else:
                result["metrics"].update(figures_or_reason)
        figures = result.pop("figures", {})
        for artifact_file, figure in figures.items():
            logger.figure(figure, artifact_file)
            plt.close(figure)
        logger.metrics(result["metrics"])
        if result.get("generations"):
            logger.json(result["generations"], "eval/generations.json")
        if result.get("per_task"):
            logger.json(result["per_task"], "eval/per_task.json")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / EVAL_FILE).write_text(json.dumps(result, indent=2))
    return result["metrics"]


def register(config: str | dict[str, Any], run_id: str, tuned_dir: str, prepared_dir: str, eval_dir: str) -> dict:
    from kubetune.modeling import read_plan
    from kubetune.registry import register as register_model

    cfg = _start(config)
    logger = _logger(cfg, run_id)
    with logger.stage("register"):
        metrics = json.loads((Path(eval_dir) / EVAL_FILE).read_text())["metrics"]
        run = logger.client.get_run(run_id)
        lineage = {k: v for k, v in run.data.tags.items() if k.startswith("kubetune.") and "stage" not in k}
        prompt_format = ({"template": cfg.data.template, "instruction": cfg.data.instruction}
                         if cfg.task in ("instruction", "multitask") else None)
        result = register_model(logger.uri, run_id, cfg.register.model_name, Path(tuned_dir),
                                read_plan(Path(prepared_dir)), metrics, lineage, prompt_format)
        logger.tags({"kubetune.registered_model": cfg.register.model_name,
                     "kubetune.registered_version": result["version"]})
    logger.finish("FINISHED")
    return result
