"""A run's life beyond one process: found by the launch that started it, continued with --resume,
failed by the pipeline's exit handler, marked KILLED when interrupted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kubetune.errors import ConfigError, ServiceError
from kubetune.tracking import (INTERRUPTED, LAUNCH_TAG, PIPELINE_RUN_TAG, SKIPPED_TAG, RunLogger, check_reachable,
                               client, flatten, local_path)

def check_resumable(uri: str, experiment: str, run_id: str, config: dict[str, Any]):
    """The run `kubetune run --resume` continues: it must exist in this experiment, not have
    finished, and have been started with this config. Refusals name --resume."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        raise ConfigError("--resume", run_id, f"no such run in {uri}; give the id of the run to continue "
                           "(the interrupted `kubetune run` logged it, as does the MLflow UI)") from None
    found = mlflow_client.get_experiment(run.info.experiment_id).name
    if found != experiment:
        raise ConfigError("--resume", run_id, f"the run belongs to experiment {found!r}, this config names "
                           f"{experiment!r}; resume with the run's own config")
    if run.info.status == "FINISHED":
        raise ConfigError("--resume", run_id, "the run finished; start a new run instead")
    now, then = flatten(config), run.data.params
    # a key absent from either side is null there (older runs logged nulls); the run's name is no setting
    differing = sorted(key for key in set(now) | set(then) if key not in RESUME_IGNORES
                       and then.get(key, "null") != now.get(key, "null"))
    if differing:
        key = differing[0]
        raise ConfigError("--resume", run_id, f"the run was started with another config: {key} was "
                           f"{then.get(key, 'null')}, now {now.get(key, 'null')} ({len(differing)} keys differ); "
                           "resume with the run's own config")
    return run


#: Params that may differ when a run is continued: they name the run, they do not change what it trains.
RESUME_IGNORES = {"tracking.run_name"}


def reopen_run(uri: str, experiment: str, run_id: str, config: dict[str, Any]) -> str:
    """Make an unfinished run of this config RUNNING again, for a pipeline run that continues it."""
    run = check_resumable(uri, experiment, run_id, config)
    mlflow_client = client(uri)
    for key in ("kubetune.failed_stage", "kubetune.error", "kubetune.user_error"):
        if key in run.data.tags:
            mlflow_client.delete_tag(run_id, key)
    mlflow_client.set_tag(run_id, "kubetune.resumed", str(int(run.data.tags.get("kubetune.resumed", "0")) + 1))
    mlflow_client.update_run(run_id, status="RUNNING")
    return run_id


def run_of_launch(uri: str, experiment: str, launch: str, resumed_run: str = ""):
    """The MLflow run a `kubetune run` made (tagged with its launch id by preflight), or resumed_run;
    None when there is none (preflight stopped before opening it). KFP gives a pipeline no outputs
    from inside its exit handler, so the launcher asks MLflow."""
    mlflow_client = client(uri)
    if resumed_run:
        return mlflow_client.get_run(resumed_run)
    found = mlflow_client.get_experiment_by_name(experiment)
    runs = mlflow_client.search_runs([found.experiment_id], f"tags.`{LAUNCH_TAG}` = '{launch}'") if found else []
    return runs[0] if runs else None


def registered_by(uri: str, run) -> str:
    """"name/version" the run registered."""
    tags = run.data.tags if run is not None else {}
    if "kubetune.registered_version" not in tags:
        raise ServiceError("tracking.mlflow_uri", uri, "this run registered no model; the run's log says why")
    return f"{tags['kubetune.registered_model']}/{tags['kubetune.registered_version']}"


def fail_unfinished(uri: str, pipeline_run: str, why: str) -> list[str]:
    """Marks every still-RUNNING MLflow run of this pipeline run FAILED, with the stage it was in
    (the one that failed, else the last one started: a killed task records nothing itself)."""
    mlflow_client = client(uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments(max_results=1000)]
    runs = mlflow_client.search_runs(experiments, f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run}'") if experiments else []
    marked = []
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        tags = run.data.tags
        stage = tags.get("kubetune.failed_stage") or tags.get("kubetune.stage", "preflight")
        logger = RunLogger(uri, run.info.run_id)
        logger.tags({"kubetune.failed_stage": stage, "kubetune.error": tags.get("kubetune.error") or
                     f"{why}; the {stage} task ended without reporting an error (killed, evicted or timed out)"})
        logger.finish("FAILED")
        marked.append(run.info.run_id)
    return marked


def mark_interrupted(uri: str, run_id: str) -> str:
    """Marks an interrupted `kubetune run`'s MLflow run KILLED (unless it already ended), with the
    stage it was in; returns that stage."""
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    stage = run.data.tags.get("kubetune.failed_stage") or run.data.tags.get("kubetune.stage", "preflight")
    if run.info.status in ("RUNNING", "SCHEDULED"):  # a stage that saw the signal has marked it itself
        RunLogger(uri, run_id).tags({"kubetune.failed_stage": stage, "kubetune.error": INTERRUPTED})
        mlflow_client.set_terminated(run_id, status="KILLED")
    return stage


def pipeline_run_facts(uri: str, pipeline_runs: list[str]) -> dict[str, dict[str, str]]:
    """What MLflow holds on these KFP runs, for `kubetune runs` and `--wait`: {KFP run id:
    {run_id, registered (name/version), champion (yes/no at registration), skipped (why nothing
    was trained), failed_stage, error}} from the MLflow run tagged with it (run_of_pipeline_run); a
    KFP run without one is left out. ServiceError when the store does not answer: a server is asked
    /health first (a few seconds, not the client's minutes of retries), a local store must exist
    (never created by a listing)."""
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    elif local_path(uri) is not None and not local_path(uri).exists():
        raise ServiceError("tracking.mlflow_uri", uri, "no MLflow store there; give the one the pipeline logs to")
    mlflow_client = client(uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments(max_results=1000)]
    facts = {}
    for pipeline_run in pipeline_runs:  # one search each: MLflow's filter has no IN for tags
        found = _run_of_pipeline_run(mlflow_client, experiments, pipeline_run)
        if found is not None:
            tags = found.data.tags
            registered = (f"{tags['kubetune.registered_model']}/{tags['kubetune.registered_version']}"
                          if "kubetune.registered_version" in tags else "")
            facts[pipeline_run] = {"run_id": found.info.run_id, "registered": registered,
                                   "champion": tags.get("kubetune.champion", ""),
                                   "skipped": tags.get(SKIPPED_TAG, ""),
                                   "failed_stage": tags.get("kubetune.failed_stage", ""),
                                   "error": tags.get("kubetune.error", "")}
    return facts


def _run_of_pipeline_run(mlflow_client, experiments: list[str], pipeline_run: str):
    """The newest MLflow run tagged with this KFP run id (a retried run may have opened two), or None."""
    if not experiments or "'" in pipeline_run:  # an id with a quote would break the filter; KFP ids are UUIDs
        return None
    found = mlflow_client.search_runs(experiments, f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


@dataclass(frozen=True)
class RunFacts:
    """What the exit handler reads of a pipeline run's MLflow run (kubetune.notify)."""

    run_id: str
    experiment_id: str
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]
    page: str  # the run's page where the store is a server a person can open, else ""


def run_of_pipeline_run(uri: str, pipeline_run: str) -> Optional[RunFacts]:
    """The MLflow run tagged with this KFP pipeline run, or None when preflight never opened one."""
    mlflow_client = client(uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments(max_results=1000)]
    run = _run_of_pipeline_run(mlflow_client, experiments, pipeline_run)
    if run is None:
        return None
    page = (f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            if uri.startswith(("http://", "https://")) else "")
    return RunFacts(run.info.run_id, run.info.experiment_id, run.info.status, dict(run.data.tags),
                    dict(run.data.metrics), page)
