"""One function per pipeline stage, named as its component: what each KFP component calls, over plain paths.

Each stage rebuilds the validated RunConfig from the pipeline's config parameter, does its work
through the library entry point of the same name (preflight.preflight, data.prepare_data,
tokenization.tokenize, modeling.prepare_model, training.train, evaluation.evaluate,
registry.register), reads and writes its artifacts through kubetune.artifacts, and logs into the
pipeline run's MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from kubetune import __version__, artifacts, console, data, distributed, evaluation, faults, modeling, registry, tracking
from kubetune import preflight as checks
from kubetune import headline, nodes, notify, report, run_form, tokenization, training
from kubetune.config import RunConfig
from kubetune.config_outputs import NotifyConfig
from kubetune.errors import ConfigError, DataError
from kubetune.model_source import describe_source, fingerprint, resolve_model
from kubetune.run_config import from_dict as config_from
from kubetune.build_cache import reuse_or_build
from kubetune.storage import open_store
from kubetune.tasks import KINDS, get_task
from kubetune.tracking import lifecycle

log = logging.getLogger(__name__)

Config = str | dict[str, Any]  # the pipeline's config_json, or the same as a dict (tests)


def _start(config: Config) -> RunConfig:
    console.setup_stage()
    return config_from(json.loads(config) if isinstance(config, str) else config)


def _as_json(config: Config) -> str:
    """The config as the pipeline passes it, for what this stage hands on (workers, nodes)."""
    return config if isinstance(config, str) else json.dumps(config)


def _logger(cfg: RunConfig, run_id: str) -> tracking.RunLogger:
    return tracking.RunLogger(tracking.resolve_uri(cfg.tracking.mlflow_uri), run_id)


@contextlib.contextmanager
def _stage(cfg: RunConfig, run_id: str, name: str, work_dir: str) -> Iterator[tracking.RunLogger]:
    """A stage's body: timed and logged into the run (RunLogger.stage), a fault of the machine (a full
    disk, a read-only store) ending it as one line and not retried (kubetune.faults)."""
    logger = _logger(cfg, run_id)
    with logger.stage(name), faults.as_resource_errors(work_dir, logger.uri, run_id):
        yield logger


def _store(cfg: RunConfig):
    return open_store(cfg.storage.uri, cfg.storage.endpoint_url, retry_seconds=cfg.storage.retry_seconds)


def _model_dir(cfg: RunConfig) -> Path:
    return resolve_model(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}"


def run_form_values(parameters: dict[str, Any]) -> dict[str, Any]:
    """The run form's values among the preflight task's parameters (kubetune.run_form.RUN_FORM)."""
    return {name: parameters.get(name) for name in run_form.FORM_PARAMETERS}


def run_config(config: str, form: dict[str, Any]) -> str:
    """The config this pipeline run trains with: config_json with the run form's values on top
    (kubetune.run_form), validated and, in a pod, checked for places a pod cannot reach. Every
    task after preflight takes this JSON."""
    console.setup_stage()
    try:
        data = json.loads(config)
    except json.JSONDecodeError as exc:
        raise ConfigError("config_json", config[:60], f"not JSON ({exc.msg} at character {exc.pos}); give the run "
                          "config as one JSON object, as `kubetune compile` writes it") from None
    cfg = run_form.apply(data, form)
    if run_form.on_cluster():
        run_form.check_for_cluster(cfg)
    return json.dumps(cfg.to_dict())


def preflight(config: Config, lineage_path: str, accelerator_count: Optional[int] = None,
              resume_run_id: str = "", pipeline_run: str = "", accelerator_type: str = "",
              when_data_changes: bool = False) -> tuple[str, str]:
    """Checks everything, then opens the pipeline's MLflow run (or reopens resume_run_id: a run
    with this config that did not finish); returns its id and the verdict (run_form.TRAIN or SKIP),
    and writes the run's lineage (what register tags the model version with). accelerator_count: the
    GPUs the pipeline grants its GPU stages (train gets GPUs when it is above 0); None checks this
    machine. pipeline_run: the KFP run's id, tagged on the MLflow run so the exit handler (finish_run)
    finds it. accelerator_type: the GPU resource the pipeline asks for, tagged with the count (what
    hardware the run was given). when_data_changes: when the champion was trained on this very data,
    the run is recorded as skipped (FINISHED, tag kubetune.skipped) and the verdict is SKIP."""
    started = console.stage_started()
    cfg = _start(config)
    train_gpus = None if accelerator_count is None else accelerator_count > 0
    # `kubetune run` passes its own preflight's report on (passed_earlier); it asked with the same flag.
    ask = when_data_changes and not resume_run_id
    report = checks.passed_earlier(cfg, train_gpus) or checks.preflight(cfg, train_gpus, ask)
    skipped = report.skipped if ask else ""
    lineage = {"kubetune.task": cfg.task, "kubetune.base_model": cfg.model.name_or_path,
               registry.DATA_TAG: report.data["sha256"], "kubetune.version": __version__,
               "kubetune.storage": report.storage_uri, "kubetune.technique": cfg.model.technique()}
    launch = os.environ.get(tracking.LAUNCH_ENV)  # set by `kubetune run`, which finds its run by it
    if resume_run_id:
        run_id = lifecycle.reopen_run(report.tracking_uri, cfg.tracking.experiment, resume_run_id, cfg.to_dict())
    else:
        run_name = cfg.tracking.run_name or f"{cfg.register.model_name} {time.strftime('%m-%d %H:%M:%S')}"
        run_id = tracking.start_run(report.tracking_uri, cfg.tracking.experiment, run_name, cfg.to_dict(),
                                    {**lineage, **({tracking.LAUNCH_TAG: launch} if launch else {})})
    logger = tracking.RunLogger(report.tracking_uri, run_id)
    if launch and resume_run_id:
        logger.tags({tracking.LAUNCH_TAG: launch})
    if pipeline_run:
        logger.tags({tracking.PIPELINE_RUN_TAG: pipeline_run,
                     "kubetune.accelerators": _accelerators(accelerator_count, accelerator_type)})
    logger.json({"data": report.data, "model": report.model, "storage": report.storage_uri}, "preflight.json")
    lineage["kubetune.storage_run_prefix"] = _store(cfg).uri(run_prefix(run_id))
    logger.tags({"kubetune.storage_run_prefix": lineage["kubetune.storage_run_prefix"]})
    artifacts.write_lineage(Path(lineage_path), lineage)
    logger.metrics({"timing/preflight_seconds": round(time.monotonic() - started, 2)})
    log.info("MLflow run %s in experiment %s at %s", run_id, cfg.tracking.experiment, report.tracking_uri)
    if skipped:
        logger.tags({tracking.SKIPPED_TAG: skipped})
        logger.describe(headline.skipped_description(cfg.register.model_name, skipped, report.data))
        logger.finish()
        console.summary(f"MLflow run {run_id}: {skipped}")
        return run_id, run_form.SKIP
    console.summary(f"MLflow run {run_id} (experiment {cfg.tracking.experiment})")
    return run_id, run_form.TRAIN


def _accelerators(count: Optional[int], resource: str) -> str:
    """What the run was given to train on: on a cluster, the GPUs the pipeline asks for; under
    `kubetune run`, this machine's devices (the pipeline's GPU settings do not apply there)."""
    if run_form.on_cluster():
        return f"{count} x {resource}" if count else "none"
    return modeling.device_description()


def finish_run(config: str, pipeline_run: str, state: str, error: str = "") -> str:
    """The pipeline's exit handler: when a pipeline run did not succeed (a task failed, was killed,
    evicted or timed out), its MLflow run is marked FAILED and names the stage it was in; a stage
    that failed on its own has done that already. Then the webhook hears how the run ended
    (kubetune.notify). Returns what it did, for the task's log."""
    console.setup_stage()
    try:  # the exit handler must work even when config_json is what made preflight fail
        data = json.loads(config)
        settings = data if isinstance(data, dict) else {}
    except ValueError:
        settings = {}
    uri = tracking.resolve_uri((settings.get("tracking") or {}).get("mlflow_uri"))
    said = f"pipeline run {state}: no MLflow run to mark"
    if state != "SUCCEEDED" and pipeline_run:
        marked = lifecycle.fail_unfinished(uri, pipeline_run, f"the pipeline run ended {state}"
                                          + (f" ({error})" if error else ""))
        said = f"pipeline run {state}: " + (f"marked MLflow run {', '.join(marked)} FAILED" if marked else
                                            "no unfinished MLflow run of it")
        console.summary(said)
    else:
        log.info("%s", said)
    sent = _notify(settings, uri, pipeline_run, state, error)
    return "; ".join([said, *sent])


def _notify(settings: dict[str, Any], uri: str, pipeline_run: str, state: str, error: str) -> list[str]:
    """The events of this run's end, sent as notify says (defaults where config_json did not parse).
    Nothing here may fail the exit handler: what went wrong is a line in its log."""
    try:
        notify_config = NotifyConfig(**{key: value for key, value in (settings.get("notify") or {}).items()
                                        if key in NotifyConfig.__dataclass_fields__})
        notify_config.validate()
        if not notify.webhook(notify_config):
            return []
        facts = lifecycle.run_of_pipeline_run(uri, pipeline_run) if pipeline_run else None
        task = settings.get("task") if isinstance(settings.get("task"), str) else "causal_lm"
        tags = facts.tags if facts else {}
        previous = tags.get("kubetune.previous_champion")
        outcome = notify.Outcome(
            model_name=(settings.get("register") or {}).get("model_name", "kubetune"), state=state, error=error,
            pipeline_run=pipeline_run, tags=tags, metrics=facts.metrics if facts else {},
            headline=headline.headline_keys(get_task(task).headline_metrics) if task in KINDS else (),
            mlflow_page=facts.page if facts else "",
            kfp_page=f"{notify_config.kfp_ui_url.rstrip('/')}/#/runs/details/{pipeline_run}"
            if notify_config.kfp_ui_url and pipeline_run else "",
            previous_figures=registry.version_figures(uri, tags["kubetune.registered_model"], previous)
            if previous else {})
        sent = notify.send(notify_config, notify.events(outcome))
    except Exception as exc:  # a broken store or config: the run's end is still what KFP says
        sent = [f"no notification: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"]
    for line in sent:
        log.info("notify: %s", line)
    return sent


def train_accelerators(config: Config, accelerator_count: int) -> int:
    """The GPUs the train task asks for: one per training process (train.processes, the only place
    that number is set), none where the GPU stages get none (accelerator_count 0) or where the
    training runs on the nodes of a TrainJob (train.nodes > 1: each node asks for its own)."""
    if accelerator_count < 0:
        raise ConfigError("accelerator_count", accelerator_count, "give the GPUs per GPU stage: 0 or more")
    train = config_from(json.loads(config) if isinstance(config, str) else config).train
    return train.processes if accelerator_count > 0 and train.nodes == 1 else 0


def prepare_data(config: Config, run_id: str, out_dir: str) -> dict[str, Any]:
    cfg = _start(config)
    with _stage(cfg, run_id, "prepare_data", out_dir) as logger:
        splits = data.prepare_data(cfg.data, cfg.task, cfg.train.seed, cfg.storage.endpoint_url, out_dir=Path(out_dir))
        checked = logger.run_tags().get("kubetune.data_sha256")
        if checked and checked != splits.stats["content_sha256"]:
            # The run and the model version it registers name the data preflight checked (its hash);
            # training on other rows would make that record false.
            raise DataError("data.path", cfg.data.path, f"the data changed since preflight checked it (sha256 "
                            f"{checked[:12]}... then, {splits.stats['content_sha256'][:12]}... now); nothing was trained "
                            "on it. Start a new run to check and train on the data as it is now (or keep the data "
                            "still while a run reads it)")
        logger.metrics({f"inputs/{k}": v for k, v in splits.stats.items() if isinstance(v, (int, float))})
        logger.json(splits.stats, "data/stats.json")
        for context in splits.names:
            logger.dataset(cfg.data.test_path if context == "test" else cfg.data.path, context,
                           artifacts.split_rows(splits.folder, context))
        console.summary(", ".join(f"{splits.count(name)} {name}" for name in splits.names) + " rows"
                        + (f" ({splits.stats['rows_invalid']} invalid dropped)" if splits.stats.get("rows_invalid") else ""))
    return splits.stats


def tokenize(config: Config, run_id: str, data_dir: str, out_dir: str) -> dict[str, Any]:
    cfg = _start(config)
    with _stage(cfg, run_id, "tokenize", out_dir) as logger:
        model_dir = _model_dir(cfg)
        key = tokenization.cache_key(Path(data_dir), fingerprint(model_dir), cfg.data, cfg.task)
        reused = reuse_or_build(_store(cfg), "tokenized", key, Path(out_dir), lambda folder: tokenization.tokenize(
            Path(data_dir), model_dir, cfg.data, folder, cfg.task))
        stats = artifacts.read_token_stats(Path(out_dir))
        logger.metrics({f"inputs/tokens_{k}": v for k, v in stats.items()})
        if reused:  # a flag tags the run only where it says something
            logger.tags({"kubetune.tokens_reused": "yes"})
        console.summary(f"{stats.get('train_tokens_total', 0):,} train tokens, "
                        f"{100 * stats.get('train_truncated_share', 0):.0f}% of rows truncated"
                        + (" (reused from an earlier run)" if reused else ""))
    return stats


def _check_granted(accelerators: int, accelerator_type: str) -> None:
    """A GPU stage on a cluster first checks that its pod sees the GPUs the pipeline granted it
    (kfp.local ignores GPU settings: not under `kubetune run`); inside the stage, so a refusal is
    recorded on the MLflow run as the stage's error."""
    if accelerators and run_form.on_cluster():
        modeling.check_granted_gpus(accelerators, accelerator_type)


def prepare_model(config: Config, run_id: str, tokenized_dir: str, out_dir: str, accelerators: int = 0,
                  accelerator_type: str = "") -> dict[str, Any]:
    cfg = _start(config)
    with _stage(cfg, run_id, "prepare_model", out_dir) as logger:
        _check_granted(accelerators, accelerator_type)
        source = describe_source(cfg.model.name_or_path, endpoint_url=cfg.storage.endpoint_url)
        plan = modeling.prepare_model(_model_dir(cfg), cfg.model, Path(out_dir), cfg.train.seed, source, cfg.task,
                                      artifacts.read_task_info(Path(tokenized_dir)))
        counts = {key: plan[key] for key in ("trainable_params", "all_params", "trainable_percent")}
        logger.metrics({**{f"model/{k}": v for k, v in counts.items()},
                        **{f"model/memory.{k}": v for k, v in plan["memory"].items()}})
        logger.text(plan["trainable_line"] + "\n", "model/trainable_parameters.txt")
        logger.tags({"kubetune.trainable_line": plan["trainable_line"]})
        logger.json(plan, "model/plan.json")
        console.summary(f"{plan['trainable_params']:,} of {plan['all_params']:,} parameters train "
                        f"({plan['trainable_percent']}%), {cfg.model.technique()}")
    return plan


def train(config: Config, run_id: str, tokenized_dir: str, prepared_dir: str, out_dir: str,
          accelerators: int = 0, accelerator_type: str = "", node_settings: Optional[dict[str, Any]] = None,
          node_selector: Optional[dict[str, str]] = None) -> dict:
    """Trains in this process; with train.processes > 1 in that many worker processes
    (kubetune.distributed, each running train_worker); with train.nodes > 1 as a Kubeflow Trainer
    TrainJob (kubetune.nodes) whose nodes' pods look as node_settings says, each with
    train.processes GPUs of accelerator_type ("": none) on the nodes node_selector picks."""
    cfg = _start(config)
    with _stage(cfg, run_id, "train", out_dir) as logger, logger.system_metrics():
        _check_granted(accelerators, accelerator_type)
        if cfg.train.nodes > 1:
            summary = nodes.train_on_nodes(cfg, _as_json(config), run_id, run_prefix(run_id), _store(cfg),
                                           Path(tokenized_dir), Path(prepared_dir), Path(out_dir),
                                           {**(node_settings or {}), "accelerator_type": accelerator_type,
                                            "node_selector": node_selector or {}})
        elif cfg.train.processes > 1:
            arguments = {"config": _as_json(config), "run_id": run_id, "tokenized_dir": tokenized_dir,
                         "prepared_dir": prepared_dir, "out_dir": out_dir}
            distributed.launch(cfg.train.processes, "kubetune.train_worker", arguments)
            summary = artifacts.read_training_summary(Path(out_dir))
        else:
            summary = train_worker(config, run_id, tokenized_dir, prepared_dir, out_dir)
        logger.metrics({f"train/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "processes"})
        if cfg.train.world_size() > 1:
            logger.tags({"kubetune.train_processes": cfg.train.world_size(), "kubetune.train_nodes": cfg.train.nodes,
                         "kubetune.train_sharding": cfg.train.sharding})
        if "best_step" in summary:
            stopped = summary.get("stopped_early_at")
            logger.tags({"kubetune.best_step": summary["best_step"],
                         **({"kubetune.stopped_early_at": stopped} if stopped is not None else {})})
        console.summary(training.describe(summary, artifacts.read_training_history(Path(out_dir))))
    return summary


def train_worker(config: Config, run_id: str, tokenized_dir: str, prepared_dir: str, out_dir: str) -> dict:
    """The training itself, in this process: one worker of train (kubetune.train_worker runs it
    under torchrun)."""
    cfg = _start(config)
    kind = get_task(cfg.task)
    model = modeling.load_for_training(_model_dir(cfg), Path(prepared_dir), cfg.model, kind,
                                       artifacts.read_task_info(Path(tokenized_dir)), sharded=cfg.train.sharding == "fsdp")
    tokenizer = tokenization.load_tokenizer(artifacts.tokenizer_dir(Path(tokenized_dir)))
    dataset = artifacts.read_tokenized(Path(tokenized_dir), "train")
    validation = None
    if cfg.train.eval_steps:  # scored during training: the validation split, as evaluate caps it
        validation = artifacts.read_tokenized(Path(tokenized_dir), "validation")
        validation = validation.select(range(min(len(validation), cfg.evaluate.max_samples)))
    return training.train(model, kind.collator(tokenizer), tokenizer, dataset, cfg.train,
                          work_dir=Path(out_dir).with_name("train-work"), out_dir=Path(out_dir),
                          logger=_logger(cfg, run_id), store=_store(cfg), prefix=run_prefix(run_id),
                          progress=console.progress(), order=kind.train_order(dataset, cfg),
                          eval_dataset=validation, compute_metrics=kind.training_metrics())


def train_node(config: Config, run_id: str, attempt: str) -> None:
    """One node of a TrainJob (kubetune.train_node runs it in each node's pod)."""
    cfg = _start(config)
    nodes.run_node(cfg, _as_json(config), run_id, attempt, run_prefix(run_id), _store(cfg))


def evaluate(config: Config, run_id: str, tokenized_dir: str, tuned_dir: str, out_dir: str, accelerators: int = 0,
             accelerator_type: str = "") -> dict:
    import matplotlib.pyplot as plt

    cfg = _start(config)
    kind = get_task(cfg.task)
    with _stage(cfg, run_id, "evaluate", out_dir) as logger, logger.system_metrics():
        _check_granted(accelerators, accelerator_type)
        model_dir = _model_dir(cfg)
        info = artifacts.read_task_info(Path(tokenized_dir))
        tokenizer = tokenization.load_tokenizer(artifacts.tokenizer_dir(Path(tokenized_dir)))
        split = artifacts.heldout_split(Path(tokenized_dir))
        dataset = artifacts.read_tokenized(Path(tokenized_dir), split)
        variants = modeling.variants(model_dir, Path(tuned_dir), cfg.model, kind, info, seed=cfg.train.seed)
        cache = evaluation.BaseCache(_store(cfg), {
            "model": fingerprint(model_dir), "quantization": cfg.model.quantization, "task": cfg.task,
            "seed": cfg.train.seed, "batch_size": cfg.evaluate.batch_size, "kubetune": __version__,
            "batches": "by length"})  # how rows are batched moves 8-bit scores in their last digits
        result = evaluation.evaluate(kind, variants, tokenizer, dataset, info, cfg, cache)
        logger.tags({"kubetune.heldout_split": split})
        if cfg.evaluate.rag is not None:
            retrieved = evaluation.rag_evaluate(kind, variants, tokenizer, dataset, info, cfg, _store(cfg))
            result.metrics.update(retrieved.evaluation.metrics)
            result.tables.update(retrieved.evaluation.tables)
            logger.json(retrieved.evaluation.generations, "eval/rag_generations.json")
            artifacts.write_retrieval(Path(out_dir), retrieved.index.passages, retrieved.index.vectors,
                                      retrieved.settings)
        if cfg.evaluate.retention_path:
            retained = evaluation.retention(kind, model_dir, variants, tokenizer, cfg, cache)
            logger.dataset(cfg.evaluate.retention_path, "retention", retained.texts)
            if retained.not_applicable:
                log.info("retention: not applicable: %s", retained.not_applicable)
                logger.tags({"eval/retention": f"not applicable: {retained.not_applicable}"})
            result.metrics.update(retained.metrics)
        if cache.reused:  # base figures taken from an earlier run of the same base, data and settings
            logger.tags({"kubetune.base_figures_reused": ", ".join(cache.reused)})
        for artifact_file, figure in result.figures.items():
            logger.figure(figure, artifact_file)
            plt.close(figure)
        logger.metrics(result.metrics)
        if result.generations:
            logger.json(result.generations, "eval/generations.json")
        for name, table in result.tables.items():
            logger.json(table, f"eval/{name}.json")
        artifacts.write_evaluation(Path(out_dir), {"metrics": result.metrics, "generations": result.generations,
                                                   **result.tables})
        page = report.html_report(f"{cfg.register.model_name}: {cfg.task} on {cfg.model.name_or_path}", result.metrics,
                                  kind.headline_metrics, artifacts.read_training_history(Path(tuned_dir)),
                                  result.generations[:cfg.evaluate.num_generations])
        artifacts.write_report(Path(out_dir), page)
        logger.text(page, "eval/report.html")
        logger.describe(headline.run_description(_headline(cfg, kind, result.metrics, Path(tuned_dir),
                                                           logger.run_tags()), links=[REPORT_WHERE]))
        console.summary(headline.one_line(result.metrics, kind.headline_metrics) or kind.summary(result.metrics))
    return result.metrics


#: Where the run page's description says the report is (MLflow's UI has no stable link to one artifact).
REPORT_WHERE = "report: `eval/report.html` under Artifacts"


def _headline(cfg: RunConfig, kind, metrics: dict[str, float], tuned_dir: Path,
              lineage: Optional[dict[str, str]] = None) -> headline.Headline:
    """The run's headline from its artifacts: what was trained, base vs tuned, the loss line."""
    lineage = lineage or {}
    facts = headline.Facts(cfg.register.model_name, cfg.task, cfg.model.name_or_path, cfg.model.technique(),
                           lineage.get("kubetune.trainable_line", ""), cfg.data.path or "",
                           lineage.get("kubetune.data_sha256", ""))
    return headline.Headline(facts, headline.table(metrics, kind.headline_metrics),
                             headline.loss_line(artifacts.read_training_history(tuned_dir)))


def evaluation_views(eval_dir: str) -> tuple[Optional[dict[str, Any]], Path]:
    """What the KFP UI shows of evaluate besides its metrics: the confusion matrix ({labels, base,
    tuned}, classification only) and the report page."""
    return artifacts.read_confusion_matrix(Path(eval_dir)), artifacts.report_path(Path(eval_dir))


def register(config: Config, run_id: str, lineage_path: str, tokenized_dir: str, prepared_dir: str,
             tuned_dir: str, eval_dir: str) -> dict:
    cfg = _start(config)
    kind = get_task(cfg.task)
    with _stage(cfg, run_id, "register", tuned_dir) as logger:
        plan = artifacts.read_plan(Path(prepared_dir))
        lineage = {**artifacts.read_lineage(Path(lineage_path)), "kubetune.trainable_line": plan["trainable_line"]}
        settings = registry.model_config(plan, kind, artifacts.read_task_info(Path(tokenized_dir)),
                                         kind.prompt_format(cfg.data))
        metrics = artifacts.read_evaluation_metrics(Path(eval_dir))
        summary = _headline(cfg, kind, metrics, Path(tuned_dir), lineage)
        result = registry.register(logger.uri, run_id, cfg.register.model_name, Path(tuned_dir), settings, metrics,
                                   lineage, kind.registry_score, summary, headline.headline_keys(kind.headline_metrics),
                                   artifacts.read_retrieval(Path(eval_dir)), logger.run_link())
        logger.tags({"kubetune.registered_model": cfg.register.model_name,
                     "kubetune.registered_version": result["version"],
                     "kubetune.champion": "yes" if result["champion"] else "no",
                     "kubetune.champion_decision": result["decision"],
                     **({"kubetune.previous_champion": result["previous_champion"]}
                        if result["champion"] and result["previous_champion"] else {})})
        version_link = logger.version_link(cfg.register.model_name, result["version"])
        logger.describe(headline.run_description(summary, result["decision"], [REPORT_WHERE, version_link]))
        console.summary(result["decision"])
    logger.finish("FINISHED")
    return {**result, "registered_model_uri": f"models:/{result['model_name']}/{result['version']}", "run_id": run_id}
