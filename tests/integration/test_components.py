"""Each KFP component's python_func, called in this process with artifacts in a temp folder, in
pipeline order, against the embedded MLflow store and local storage. The stages pass real files
to each other, as they do in a pipeline run."""

import json
from pathlib import Path

import pytest
import torch
from kfp import dsl
from safetensors.torch import load_file

from kubetune import components, tracking
from kubetune.artifacts import INITIAL_ADAPTER, read_tokenized
from tiny import preflight, tiny_run_config


def artifact(kind, root: Path, name: str):
    return kind(name=name, uri=str(root / name), metadata={})


@pytest.fixture(scope="module")
def run(tiny_model_dir, quotes_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    config = tiny_run_config(tiny_model_dir, quotes_file,
                             tracking={"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "components"},
                             storage={"uri": str(root / "storage")})
    state = {"root": root, "config_json": json.dumps(config), "uri": config["tracking"]["mlflow_uri"]}
    state["lineage"] = dsl.Artifact(name="lineage", uri=str(root / "lineage"), metadata={})
    state["run_id"] = preflight(state["config_json"], state["lineage"])
    return state


def test_preflight_opens_one_run_with_every_config_value(run):
    mlflow_run = tracking.client(run["uri"]).get_run(run["run_id"])
    params = mlflow_run.data.params
    assert params["model.lora.r"] == "8" and params["train.max_steps"] == "12"
    assert json.loads(params["model.lora.target_modules"]) == ["q_proj", "v_proj"]
    assert mlflow_run.data.tags["kubetune.task"] == "causal_lm"
    assert len(mlflow_run.data.tags["kubetune.data_sha256"]) == 64


def test_prepare_data(run):
    dataset = artifact(dsl.Dataset, run["root"], "dataset")
    components.prepare_data.python_func(config_json=run["config_json"], run_id=run["run_id"], dataset=dataset)
    stats = json.loads((Path(dataset.path) / "stats.json").read_text())
    assert stats["rows_train"] == 64 and stats["rows_validation"] == 16
    assert dataset.metadata["rows_train"] == 64
    run["dataset"] = dataset


def test_tokenize(run):
    tokenized = artifact(dsl.Dataset, run["root"], "tokenized")
    components.tokenize.python_func(config_json=run["config_json"], run_id=run["run_id"], dataset=run["dataset"],
                                    tokenized=tokenized)
    from kubetune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(Path(tokenized.path) / "tokenizer")
    train = read_tokenized(Path(tokenized.path), "train")
    assert len(train) == 64
    assert all(len(row) <= 48 and row[-1] == tokenizer.eos_token_id for row in train["input_ids"])
    run["tokenized"] = tokenized


def test_prepare_model(run):
    prepared = artifact(dsl.Model, run["root"], "prepared_model")
    components.prepare_model.python_func(config_json=run["config_json"], run_id=run["run_id"],
                                         tokenized=run["tokenized"], prepared_model=prepared)
    plan = json.loads((Path(prepared.path) / "plan.json").read_text())
    assert plan["trainable_line"].startswith("trainable params: ")
    assert 0 < plan["trainable_params"] < plan["all_params"]
    assert (Path(prepared.path) / INITIAL_ADAPTER / "adapter_model.safetensors").exists()
    assert prepared.metadata["trainable_params"] == plan["trainable_params"]
    run["prepared"] = prepared


def test_train_changes_only_the_adapter(run):
    tuned = artifact(dsl.Model, run["root"], "tuned_model")
    components.train.python_func(config_json=run["config_json"], run_id=run["run_id"], tokenized=run["tokenized"],
                                 prepared_model=run["prepared"], tuned_model=tuned)
    before = load_file(Path(run["prepared"].path) / INITIAL_ADAPTER / "adapter_model.safetensors")
    after = load_file(Path(tuned.path) / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all("lora_" in key for key in after)
    assert all(not torch.equal(before[key], after[key]) for key in after), "some LoRA weight did not train"
    summary = json.loads((Path(tuned.path) / "training_summary.json").read_text())
    losses = [row["loss"] for row in summary["history"] if "loss" in row]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    # the validation split scored every train.eval_steps and at the last step, beside the loss
    evaluated = [row["step"] for row in summary["history"] if "eval_loss" in row]
    assert evaluated == [10, 12] and summary["best_step"] in evaluated
    logged = tracking.client(run["uri"]).get_metric_history(run["run_id"], "train/eval_loss")
    assert sorted(m.step for m in logged) == [10, 12]
    # checkpoints and the adapter were copied to storage under the run's prefix
    storage = Path(json.loads(run["config_json"])["storage"]["uri"]) / "runs" / run["run_id"]
    assert (storage / "adapter" / "adapter_model.safetensors").exists()
    assert (storage / "checkpoints" / "checkpoint-12" / "trainer_state.json").exists()
    run["tuned"] = tuned


def test_evaluate_scores_base_and_tuned(run):
    evaluation = artifact(dsl.Artifact, run["root"], "evaluation")
    metrics = artifact(dsl.Metrics, run["root"], "metrics")
    confusion = artifact(dsl.ClassificationMetrics, run["root"], "confusion")
    report = artifact(dsl.HTML, run["root"], "report")
    components.evaluate.python_func(config_json=run["config_json"], run_id=run["run_id"], tokenized=run["tokenized"],
                                    tuned_model=run["tuned"], evaluation=evaluation, metrics=metrics,
                                    confusion_matrix=confusion, report=report)
    assert not confusion.metadata, "a language model has no confusion matrix"
    page = Path(report.path).read_text()
    assert "<td>perplexity</td>" in page and "Loss per step" in page and "Held-out examples" in page
    result = json.loads((Path(evaluation.path) / "evaluation.json").read_text())
    scores = result["metrics"]
    assert scores["eval/tuned_perplexity"] < scores["eval/base_perplexity"]
    assert len(result["generations"]) == 2 and {"prompt", "base", "tuned"} <= set(result["generations"][0])
    assert metrics.metadata["eval/tuned_perplexity"] == scores["eval/tuned_perplexity"]
    run["evaluation"] = evaluation


def test_a_second_evaluate_reuses_the_base_figures(run):
    """The base model's scores are kept by content (storage cache/base-scores/) and reused: the
    figures are the same, and the run says which were reused."""
    again = artifact(dsl.Artifact, run["root"], "evaluation_again")
    metrics = artifact(dsl.Metrics, run["root"], "metrics_again")
    components.evaluate.python_func(config_json=run["config_json"], run_id=run["run_id"], tokenized=run["tokenized"],
                                    tuned_model=run["tuned"], evaluation=again, metrics=metrics,
                                    confusion_matrix=artifact(dsl.ClassificationMetrics, run["root"], "confusion_again"),
                                    report=artifact(dsl.HTML, run["root"], "report_again"))
    first = json.loads((Path(run["evaluation"].path) / "evaluation.json").read_text())
    second = json.loads((Path(again.path) / "evaluation.json").read_text())
    assert second["metrics"] == first["metrics"]
    tags = tracking.client(json.loads(run["config_json"])["tracking"]["mlflow_uri"]).get_run(run["run_id"]).data.tags
    assert tags["kubetune.base_figures_reused"]  # the second evaluate names the figures it reused
    assert second["generations"] == first["generations"]


def test_register_adds_a_version_and_finishes_the_run(run):
    registered = artifact(dsl.Model, run["root"], "registered")
    components.register.python_func(config_json=run["config_json"], run_id=run["run_id"], lineage=run["lineage"],
                                    tokenized=run["tokenized"], prepared_model=run["prepared"], tuned_model=run["tuned"],
                                    evaluation=run["evaluation"], registered_model=registered)
    assert registered.metadata["registered_model_uri"] == "models:/tiny-lora/1"
    assert json.loads(Path(registered.path).read_text())["version"] == "1"
    mlflow_client = tracking.client(run["uri"])
    model_version = mlflow_client.get_model_version("tiny-lora", "1")
    assert model_version.run_id == run["run_id"]
    assert model_version.tags["base_model"] == json.loads(run["config_json"])["model"]["name_or_path"]
    assert "champion" in model_version.aliases
    assert mlflow_client.get_run(run["run_id"]).info.status == "FINISHED"


def retry_train(run, name):
    retried = artifact(dsl.Model, run["root"], name)
    components.train.python_func(config_json=run["config_json"], run_id=run["run_id"], tokenized=run["tokenized"],
                                 prepared_model=run["prepared"], tuned_model=retried)
    return retried, json.loads((Path(retried.path) / "training_summary.json").read_text())


def test_retry_after_training_finished_reuses_the_final_checkpoint(run):
    """A pod that failed after training (say, in the upload) is retried on a fresh disk."""
    retried, summary = retry_train(run, "tuned_retry_done")
    assert summary["resumed_from"].endswith("checkpoint-12") and summary["steps"] == 12
    first = load_file(Path(run["tuned"].path) / "adapter_model.safetensors")
    again = load_file(Path(retried.path) / "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_retry_mid_training_resumes_from_the_last_stored_checkpoint(run):
    import shutil

    storage = Path(json.loads(run["config_json"])["storage"]["uri"]) / "runs" / run["run_id"] / "checkpoints"
    shutil.rmtree(storage / "checkpoint-12")  # as if the pod died between step 6 and step 12
    _, summary = retry_train(run, "tuned_retry_mid")
    assert summary["resumed_from"].endswith("checkpoint-6") and summary["steps"] == 12
    assert [row["step"] for row in summary["history"] if "loss" in row] == list(range(1, 13))
    # The summary covers both attempts; MLflow holds each step's loss once, the redone steps 7-12 included.
    losses = [row["loss"] for row in summary["history"] if "loss" in row]
    assert summary["train_loss_mean"] == round(sum(losses) / 12, 4)
    logged = tracking.client(run["uri"]).get_metric_history(run["run_id"], "train/loss")
    assert sorted(m.step for m in logged) == list(range(1, 13))
    # Storage keeps the newest train.keep_checkpoints (2) complete checkpoints.
    assert sorted(p.name for p in storage.iterdir()) == ["checkpoint-12", "checkpoint-6"]


def test_train_with_two_data_parallel_processes(run):
    """train.processes=2: two torchrun workers in one DDP group (gloo on the CPU), one adapter."""
    config = json.loads(run["config_json"])
    config["model"]["quantization"] = "none"  # bitsandbytes' CPU kernels are not needed to test DDP
    config["train"].update(processes=2, max_steps=4, save_steps=0, batch_size=4)
    config["storage"]["uri"] = str(run["root"] / "storage-ddp")
    prepared = artifact(dsl.Model, run["root"], "prepared_ddp")
    config_json = json.dumps(config)
    components.prepare_model.python_func(config_json=config_json, run_id=run["run_id"], tokenized=run["tokenized"],
                                         prepared_model=prepared)
    tuned = artifact(dsl.Model, run["root"], "tuned_ddp")
    components.train.python_func(config_json=config_json, run_id=run["run_id"], tokenized=run["tokenized"],
                                 prepared_model=prepared, tuned_model=tuned)
    summary = json.loads((Path(tuned.path) / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    before = load_file(Path(prepared.path) / INITIAL_ADAPTER / "adapter_model.safetensors")
    after = load_file(Path(tuned.path) / "adapter_model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in after)
