"""The instruction and multitask pipelines' stages in order, in this process, on the tiny model:
the tuned model learns the guide's answers and serves raw reviews, and the progressive multitask
schedule reaches the Trainer. (The task kinds themselves: tests/unit/test_instruction.py.)"""

import json
from pathlib import Path

import pytest

from kubetune import artifacts
from kubetune.tasks.prompts import GENERAL_TASK, build_prompt
from tiny import GUIDE, SHARED, SHORT_TEMPLATE, YELP, multitask_rows, needs_shared, run_stages, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@needs_shared
def test_instruction_stages_learn_the_answers(tiny_model_dir, tmp_path):
    """prepare_data -> ... -> register on the guide's form: the tuned model's answer-token loss falls
    below the base's, the Trainer never sees the string columns, and the registered model serves
    raw reviews by wrapping them in the training prompt."""
    config = tiny_run_config(
        tiny_model_dir, YELP, task="instruction",
        data={**GUIDE, "max_rows": 160, "validation_fraction": 0.2, "max_length": 64},
        # full-precision base (8-bit on the CPU is several times slower; test_components covers it);
        # attention-only LoRA moves a 2-block model's answers too slowly for a fast test
        model={"quantization": "none", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}},
        train={"max_steps": 24, "save_steps": 12},
        evaluate={"max_samples": 24, "batch_size": 8, "num_generations": 2, "max_new_tokens": 8,
                  "retention_path": None},
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "instruction"},
        storage={"uri": str(tmp_path / "storage")})
    out = run_stages(config, tmp_path, through="register")
    result = json.loads((Path(out["evaluation"].path) / "evaluation.json").read_text())
    metrics = result["metrics"]
    assert metrics["eval/tuned_loss"] < 0.5 * metrics["eval/base_loss"]
    assert metrics["eval/tuned_answer_accuracy"] >= metrics["eval/base_answer_accuracy"]
    assert metrics["eval/answer_accuracy_samples"] == metrics["eval/samples"] == 24
    assert result["generations"][0]["expected"] in ("negative", "positive")
    assert out["metrics"].metadata["eval/tuned_loss"] == metrics["eval/tuned_loss"]

    # the registered model builds the prompt it was trained on from an `input` column
    import mlflow
    import pandas as pd

    assert out["version"] == "tiny-lora/1"
    mlflow.set_tracking_uri(config["tracking"]["mlflow_uri"])
    mlflow.set_registry_uri(config["tracking"]["mlflow_uri"])
    served = mlflow.pyfunc.load_model("models:/tiny-lora/1")
    reviews = pd.DataFrame({"input": ["The food was cold and the staff rude.", "Lovely place, great pizza."]})
    assert served.unwrap_python_model().prompts(reviews) == [
        build_prompt(SHORT_TEMPLATE, "Positive or negative?", text) for text in reviews["input"]]
    answers = served.predict(reviews, params={"max_new_tokens": 4})
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    assert served.unwrap_python_model().prompts(pd.DataFrame({"prompt": ["as is"]})) == ["as is"]


@needs_shared
def test_multitask_progressive_schedule_reaches_the_trainer(tiny_model_dir, tmp_path, caplog):
    """Replay rows mixed in by prepare_data, ordered general-first with task weights by the train
    stage, read in that order by the Trainer (sequential sampler)."""
    import logging

    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in multitask_rows()))
    config = tiny_run_config(
        tiny_model_dir, path, task="multitask",
        model={"quantization": "none"},
        data={"text_field": "input", "label_field": "output", "task_field": "name", "template": SHORT_TEMPLATE,
              "task_weights": {"echo": 2}, "replay_path": str(SHARED / "retention" / "tinyshakespeare_input.txt"),
              "replay_fraction": 0.2, "validation_fraction": 0.2, "max_length": 48},
        train={"max_steps": 6, "save_steps": 0, "schedule": "progressive"},
        evaluate={"retention_path": None},
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "multitask"},
        storage={"uri": str(tmp_path / "storage")})
    caplog.set_level(logging.INFO, logger="kubetune.tasks.schedule")
    out = run_stages(config, tmp_path, through="evaluate")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train order (progressive)")]
    assert "48 rows" in line and f"{GENERAL_TASK}=" in line  # 6 steps x 8 examples
    rows = artifacts.read_split(Path(out["dataset"].path), "train")
    assert sum(row.get("task") == GENERAL_TASK for row in rows) > 0, "prepare_data mixed replay rows in"
    summary = json.loads((Path(out["tuned"].path) / "training_summary.json").read_text())
    assert summary["steps"] == 6 and all(row["loss"] > 0 for row in summary["history"] if "loss" in row)
    result = json.loads((Path(out["evaluation"].path) / "evaluation.json").read_text())
    assert GENERAL_TASK not in result["per_task"], "held-out rows are the tasks' own"
    assert sum(row["samples"] for row in result["per_task"].values()) == result["metrics"]["eval/samples"]
