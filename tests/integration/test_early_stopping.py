"""Evaluation during training on a tiny Llama that over-fits (60 rows, a high constant learning
rate): the validation loss is logged beside the training loss, training stops when it has not
improved for `patience` evaluations, the stage outputs the weights of the best evaluation, and a
second attempt (a retried pod, nothing on local disk) resumes with the best-so-far record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kfp import dsl
from safetensors.torch import load_file

from kubetune import components, tracking
from tiny import run_stages, tiny_run_config

STEPS, EVERY, PATIENCE = 80, 4, 2


@pytest.fixture(scope="module")
def stopped(tiny_model_dir, quotes_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}"},
                             storage={"uri": str(root / "storage")}, data={"max_rows": 60},
                             train={"max_steps": STEPS, "eval_steps": EVERY, "learning_rate": 3e-2, "warmup_steps": 0,
                                    "lr_scheduler": "constant_with_warmup", "save_steps": 8,
                                    "early_stopping": {"patience": PATIENCE}})
    out = run_stages(config, root / "artifacts", through="train")
    summary = json.loads((Path(out["tuned"].path) / "training_summary.json").read_text())
    return {**out, "config": config, "root": root, "summary": summary}


def test_training_stops_when_the_validation_loss_stops_improving(stopped):
    summary = stopped["summary"]
    evaluations = {row["step"]: row["eval_loss"] for row in summary["history"] if "eval_loss" in row}
    best = summary["best_step"]
    assert summary["stopped_early_at"] == summary["steps"] < STEPS
    assert summary["steps"] - best == PATIENCE * EVERY, "stopped exactly when patience ran out"
    assert list(evaluations) == list(range(EVERY, summary["steps"] + 1, EVERY))
    assert evaluations[best] == min(evaluations.values())
    assert summary["best_eval_loss"] == pytest.approx(evaluations[best], abs=1e-5)
    assert all(loss >= evaluations[best] for step, loss in evaluations.items() if step > best)


def test_the_curves_overlay_in_mlflow_and_the_run_names_the_best_step(stopped):
    client = tracking.client(stopped["config"]["tracking"]["mlflow_uri"])
    run = client.get_run(stopped["run_id"])
    eval_steps = sorted(m.step for m in client.get_metric_history(stopped["run_id"], "train/eval_loss"))
    train_steps = sorted(m.step for m in client.get_metric_history(stopped["run_id"], "train/loss"))
    assert eval_steps == list(range(EVERY, stopped["summary"]["steps"] + 1, EVERY))
    assert train_steps == list(range(1, stopped["summary"]["steps"] + 1))
    assert run.data.tags["kubetune.best_step"] == str(stopped["summary"]["best_step"])
    assert run.data.tags["kubetune.stopped_early_at"] == str(stopped["summary"]["steps"])
    assert run.data.metrics["train/best_step"] == stopped["summary"]["best_step"]


def test_the_stage_outputs_the_best_weights_and_a_retry_keeps_them(stopped):
    output = load_file(Path(stopped["tuned"].path) / "adapter_model.safetensors")
    kept = load_file(stopped["root"] / "storage" / "runs" / stopped["run_id"] / "best" / "adapter_model.safetensors")
    assert output.keys() == kept.keys() and all(torch.equal(output[k], kept[k]) for k in output)
    # A second attempt in a fresh folder: it resumes from the last stored checkpoint and takes the
    # best-so-far record from storage, so it stops at the same step with the same weights.
    config_json = json.dumps(stopped["config"])
    retry = dsl.Model(name="retry", uri=str(stopped["root"] / "retry" / "tuned"), metadata={})
    components.train.python_func(config_json=config_json, run_id=stopped["run_id"], tokenized=stopped["tokenized"],
                                 prepared_model=stopped["prepared"], tuned_model=retry)
    again = json.loads((Path(retry.path) / "training_summary.json").read_text())
    assert again["resumed_from"] is not None
    assert (again["best_step"], again["stopped_early_at"]) == (stopped["summary"]["best_step"], stopped["summary"]["steps"])
    retried = load_file(Path(retry.path) / "adapter_model.safetensors")
    assert all(torch.equal(retried[k], kept[k]) for k in kept)
