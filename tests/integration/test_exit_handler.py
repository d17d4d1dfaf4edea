"""The pipeline's exit handler (stages.finish_run) against a real MLflow store: a pipeline run that
ended badly leaves no MLflow run RUNNING. How KFP calls it (PipelineTaskFinalStatus after every task
inside the handler has ended) is KFP's; here the handler is called as the finish_run component does."""

from __future__ import annotations

import json

from kubetune import stages, tracking
from kubetune.config import default_config


def _open_run(uri: str, pipeline_run: str, stage: str) -> str:
    run_id = tracking.start_run(uri, "exit-test", "r", default_config(), {tracking.PIPELINE_RUN_TAG: pipeline_run})
    tracking.RunLogger(uri, run_id).tags({"kubetune.stage": stage})
    return run_id


def test_a_killed_task_leaves_the_run_failed_naming_its_stage(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)
    config = json.dumps({"tracking": {"mlflow_uri": uri}})
    killed, other = _open_run(uri, "pr-1", "train"), _open_run(uri, "pr-2", "evaluate")

    said = stages.finish_run(config, "pr-1", "FAILED", "Task exit-handler-1 failed.")
    assert said == f"pipeline run FAILED: marked MLflow run {killed} FAILED"
    run = tracking.client(uri).get_run(killed)
    assert run.info.status == "FAILED" and run.data.tags["kubetune.failed_stage"] == "train"
    assert run.data.tags["kubetune.error"].startswith("the pipeline run ended FAILED (Task exit-handler-1 failed.); "
                                                      "the train task ended without reporting an error")
    assert tracking.client(uri).get_run(other).info.status == "RUNNING", "another pipeline run's MLflow run"


def test_a_stage_that_failed_itself_and_a_success_are_left_as_they_are(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)
    config = json.dumps({"tracking": {"mlflow_uri": uri}})
    run_id = _open_run(uri, "pr-3", "tokenize")
    logger = tracking.RunLogger(uri, run_id)
    logger.tags({"kubetune.failed_stage": "tokenize", "kubetune.error": "its own error"})
    logger.finish("FAILED")
    assert stages.finish_run(config, "pr-3", "FAILED") == "pipeline run FAILED: no unfinished MLflow run of it"
    assert tracking.client(uri).get_run(run_id).data.tags["kubetune.error"] == "its own error"
    assert stages.finish_run(config, "pr-3", "SUCCEEDED") == "pipeline run SUCCEEDED: no MLflow run to mark"


def test_config_that_is_not_json_does_not_stop_the_exit_handler(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id = _open_run(uri, "pr-4", "preflight")
    assert stages.finish_run("{not json", "pr-4", "FAILED").endswith(f"marked MLflow run {run_id} FAILED")
