"""The whole DAG under kfp.local (the same pipeline function that is compiled for Kubeflow), on a
tiny model, against a real MLflow server and a real S3 API (moto) started by fixtures."""

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubetune import tracking
from kubetune.config import RunConfig
from kubetune.launch.local import run_pipeline
from kubetune.artifacts import INITIAL_ADAPTER
from kubetune.paths import state_dir
from tiny import tiny_run_config

STAGES = {"preflight", "prepare_data", "tokenize", "prepare_model", "train", "evaluate", "register"}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, quotes_file, mlflow_server, s3_server, tmp_path_factory):
    bucket = "kubetune-dag"
    s3_server.client().create_bucket(Bucket=bucket)
    weights = tiny_model_dir / "model.safetensors"
    base_before = weights.read_bytes()
    # Data under a path that holds "python3", as a virtualenv's site-packages does: kfp.local would
    # rewrite it to this interpreter's path in every task's command line (kubetune.launch.local).
    data = tmp_path_factory.mktemp("venv") / "lib" / "python3.11" / "site-packages" / "quotes.json"
    data.parent.mkdir(parents=True)
    data.write_bytes(quotes_file.read_bytes())
    config = tiny_run_config(tiny_model_dir, data,
                             tracking={"mlflow_uri": mlflow_server, "experiment": "dag-test"},
                             storage={"uri": f"s3://{bucket}/kubetune", "endpoint_url": s3_server.endpoint_url},
                             register={"model_name": "tiny-dag"})
    result = run_pipeline(RunConfig.from_dict(config), progress=False)
    return {"result": result, "config": config, "bucket": bucket, "base_before": base_before, "weights": weights, "data": data,
            "client": tracking.client(mlflow_server), "s3": s3_server.client()}


def run_config(finished) -> dict:
    """The config as the stages saw it: run_pipeline pins places to absolute paths."""
    run = finished["client"].get_run(finished["result"]["run_id"])
    config = json.loads(json.dumps(finished["config"]))
    config["tracking"]["mlflow_uri"] = run.data.params["tracking.mlflow_uri"]
    return config


def test_every_task_succeeded_and_timed(finished):
    result = finished["result"]
    assert result["registered"] == "tiny-dag/1"
    assert set(result["stage_seconds"]) == STAGES
    assert finished["client"].get_run(result["run_id"]).info.status == "FINISHED"
    # every task forked from the warm starter (kubetune.launch.warm), none fell back to a fresh process,
    # and the exit handler ran after them and found nothing to mark
    assert set(result["started_warm"]) == STAGES | {"finish_run"}
    exit_log = max((state_dir() / "logs").glob("*-finish_run.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "pipeline run SUCCEEDED: no MLflow run to mark" in exit_log
    # the run's whole log: every stage's lines and kfp.local's, on disk and in the MLflow run
    whole = Path(result["log"]).read_text()
    assert all(f"\n{stage}| " in whole for stage in STAGES) and "Got executor_input" in whole
    assert [a.path for a in finished["client"].list_artifacts(result["run_id"], "logs")] == ["logs/run.log"]


def test_config_strings_reach_the_stages_unaltered_and_nothing_is_left_in_tmp(finished):
    run = finished["client"].get_run(finished["result"]["run_id"])
    assert run.data.params["data.path"] == str(finished["data"])
    assert not list(state_dir().glob("run-*")), "the run's temporary folder was not removed"
    launch = Path(finished["result"]["log"]).name[:-len("-run.log")]  # every log file of a run is named after it
    logs = {p.name[len(launch) + 1:] for p in (state_dir() / "logs").glob(f"{launch}-*.log")}
    assert {f"{stage}.log" for stage in STAGES} <= logs


def test_lora_trained_and_base_untouched(finished):
    run_dir = max((state_dir() / "kfp").glob("kubetune-*"), key=lambda p: p.stat().st_mtime)
    initial = load_file(run_dir / "prepare-model" / "prepared_model" / INITIAL_ADAPTER / "adapter_model.safetensors")
    trained = load_file(run_dir / "train" / "tuned_model" / "adapter_model.safetensors")
    assert initial.keys() == trained.keys() and all("lora_" in key for key in trained)
    assert all(not torch.equal(initial[k], trained[k]) for k in trained)
    assert finished["weights"].read_bytes() == finished["base_before"]


def test_mlflow_run_holds_params_metrics_and_model(finished):
    client, run_id = finished["client"], finished["result"]["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["model.quantization"] == "8bit" and run.data.params["model.lora.alpha"] == "16"
    assert run.data.tags["kubetune.base_model"].endswith("model")
    assert run.data.tags["kubetune.version"]
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert len(client.get_metric_history(run_id, "train/learning_rate")) == 12
    assert len(client.get_metric_history(run_id, "train/tokens_per_s_step")) == 12  # telemetry per step ...
    assert run.data.metrics["train/tokens_per_s"] > 0 and 0 <= run.data.metrics["train/padding_share"] < 0.5
    assert run.data.metrics["train/peak_rss_mb"] > 100  # ... and for the run
    metrics = run.data.metrics
    assert {"eval/base_perplexity", "eval/tuned_perplexity", "eval/base_loss", "eval/tuned_loss"} <= set(metrics)
    assert metrics["model/trainable_params"] > 0
    artifacts = {a.path for folder in ("", "plots", "train", "eval") for a in client.list_artifacts(run_id, folder or None)}
    assert {"preflight.json", "plots/train_loss.png", "train/training_arguments.json", "eval/report.html"} <= artifacts
    # metrics come in sections (the part before the first /), system metrics among them
    assert {key.split("/", 1)[0] for key in metrics} == {"inputs", "model", "train", "eval", "timing", "system"}
    assert any(key.startswith("system/cpu_utilization") for key in metrics)
    # the params are the run config's values and nothing else: what was set, no nulls
    assert set(run.data.params) == set(tracking.flatten(RunConfig.from_dict(run_config(finished)).to_dict()))
    assert not {"None", "null"} & set(run.data.params.values()) and "data.label_field" not in run.data.params
    # what the run was given, as it was (this machine's CPU, not the pipeline's GPU setting)
    assert run.data.tags["kubetune.accelerators"] == "cpu"
    assert run.data.tags[tracking.DESCRIPTION_TAG].startswith("**tiny-dag**: causal_lm on ")
    # the data as used, as the run's dataset inputs
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "retention"}
    assert inputs["train"].name == "quotes-train" and json.loads(inputs["train"].profile)["num_rows"] == 64
    assert json.loads(inputs["train"].source)["uri"] == str(finished["data"])

    version = client.get_model_version("tiny-dag", "1")
    assert version.run_id == run_id
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-dag/1"))
    assert len(list(local.glob("artifacts/*/adapter_model.safetensors"))) == 1
    assert float(version.tags["eval/tuned_perplexity"]) == metrics["eval/tuned_perplexity"]


def test_registered_champion_loads_and_generates(finished):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(finished["client"].tracking_uri)
    mlflow.set_registry_uri(finished["client"].tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny-dag@champion")
    completions = model.predict(pd.DataFrame({"prompt": ["The only way", "Life is"]}), params={"max_new_tokens": 4})
    assert len(completions) == 2 and all(isinstance(text, str) for text in completions)


def test_s3_holds_checkpoints_and_adapter(finished):
    run_id = finished["result"]["run_id"]
    listing = finished["s3"].list_objects_v2(Bucket=finished["bucket"], Prefix=f"kubetune/runs/{run_id}/")
    keys = {obj["Key"].split(f"{run_id}/", 1)[1] for obj in listing.get("Contents", [])}
    assert "adapter/adapter_model.safetensors" in keys
    assert {"checkpoints/checkpoint-6/trainer_state.json", "checkpoints/checkpoint-12/trainer_state.json"} <= keys
    body = finished["s3"].get_object(Bucket=finished["bucket"], Key=f"kubetune/runs/{run_id}/adapter/adapter_config.json")
    assert json.load(io.BytesIO(body["Body"].read()))["r"] == 8


def test_when_data_changes_skips_data_the_champion_has_seen_and_trains_on_new_data(finished, webhook, monkeypatch):
    """The same pipeline's dsl.If: on the champion's data only preflight runs (no model is loaded),
    the MLflow run says why; one changed record makes it train and register again. The exit handler
    tells a webhook each time."""
    monkeypatch.setenv("KUBETUNE_WEBHOOK_URL", webhook.url)
    config, client = finished["config"], finished["client"]
    logs = state_dir() / "logs"
    before = {path.name for path in logs.glob("*.log")}
    skipped = run_pipeline(RunConfig.from_dict(config), progress=False, when_data_changes=True)
    assert skipped["skipped"].startswith("skipped: data unchanged since version 1 (tiny-dag/1, the champion")
    run = client.get_run(skipped["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kubetune.skipped"] == skipped["skipped"]
    assert skipped["skipped"] in run.data.tags["mlflow.note.content"]
    assert [v.version for v in client.search_model_versions("name='tiny-dag'")] == ["1"]
    started = sorted(name.split("-")[-1] for name in {path.name for path in logs.glob("*.log")} - before
                     if name.endswith(("-preflight.log", "-finish_run.log", "-train.log", "-prepare_model.log")))
    assert started == ["finish_run.log", "preflight.log"]
    assert webhook.events() == ["skipped"]
    assert webhook.received[0]["text"] == (f"kubetune: tiny-dag {skipped['skipped']} — MLflow: "
                                           f"{config['tracking']['mlflow_uri']}/#/experiments/{skipped['experiment_id']}"
                                           f"/runs/{skipped['run_id']}")

    changed = finished["data"].with_name("quotes-changed.json")
    records = json.loads(finished["data"].read_text())
    changed.write_text(json.dumps(records + [{**records[0], "content": "A record the champion never saw."}]))
    trained = run_pipeline(RunConfig.from_dict({**config, "data": {**config["data"], "path": str(changed)}}),
                           progress=False, when_data_changes=True)
    assert "skipped" not in trained and trained["registered"] == "tiny-dag/2"
    assert webhook.events()[1] == "succeeded" and "registered tiny-dag/2" in webhook.received[1]["text"]
