"""The pipeline's components in order, in this process, on a tiny three-class sentiment set and the
tiny BERT of tests/tiny.py: the tuned head beats the untrained one, and full fine-tuning of an encoder
with its pretraining head reports masked-LM forgetting. (The task kind itself:
tests/unit/test_classification.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.artifacts import read_task_info, read_tokenized
from tiny import NAMES, sentiment_rows, write_tsv


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory) -> Path:
    """240 three-class reviews as TSV, with a TweetEval-style mapping.txt beside it."""
    folder = tmp_path_factory.mktemp("sentiment")
    (folder / "mapping.txt").write_text("".join(f"{k}\t{v}\n" for k, v in NAMES.items()))
    return write_tsv(folder / "reviews.tsv", sentiment_rows(240))



# ---- the pipeline's components in order ------------------------------------------------------------
def test_components_in_order_tune_a_head_that_beats_the_untrained_one(bert_dir, sentiment_file, general_reviews,
                                                                     tmp_path):
    from kfp import dsl
    from safetensors.torch import load_file

    from kubetune import components, tracking
    from kubetune.artifacts import INITIAL_ADAPTER
    from tiny import preflight, tiny_run_config

    def artifact(kind_, name):
        return kind_(name=name, uri=str(tmp_path / name), metadata={})

    config = tiny_run_config(
        bert_dir, sentiment_file, task="classification",
        model={"quantization": "none", "gradient_checkpointing": False,
               "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]}},
        data={"text_field": "review", "label_field": "score", "max_length": 32},
        train={"batch_size": 16, "max_steps": 30, "warmup_steps": 3, "learning_rate": 3e-2, "save_steps": 0},
        evaluate={"max_samples": 48, "batch_size": 16, "num_generations": 3, "retention_path": str(general_reviews)},
        register={"model_name": "tiny-sentiment"},
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "classification"},
        storage={"uri": str(tmp_path / "storage")})
    config_json = json.dumps(config)
    lineage = artifact(dsl.Artifact, "lineage")
    run_id = preflight(config_json, lineage)
    dataset, tokenized = artifact(dsl.Dataset, "dataset"), artifact(dsl.Dataset, "tokenized")
    prepared, tuned = artifact(dsl.Model, "prepared"), artifact(dsl.Model, "tuned")
    evaluation, metrics = artifact(dsl.Artifact, "evaluation"), artifact(dsl.Metrics, "metrics")
    components.prepare_data.python_func(config_json=config_json, run_id=run_id, dataset=dataset)
    components.tokenize.python_func(config_json=config_json, run_id=run_id, dataset=dataset, tokenized=tokenized)
    info = read_task_info(Path(tokenized.path))
    assert info["labels"] == ["0", "1", "2"] and info["id2label"] == NAMES  # names from mapping.txt
    labels = read_tokenized(Path(tokenized.path), "train")["labels"]
    assert set(labels) == {0, 1, 2} and all(type(label) is int for label in labels)
    components.prepare_model.python_func(config_json=config_json, run_id=run_id, tokenized=tokenized,
                                         prepared_model=prepared)
    components.train.python_func(config_json=config_json, run_id=run_id, tokenized=tokenized,
                                 prepared_model=prepared, tuned_model=tuned)
    before = load_file(Path(prepared.path) / INITIAL_ADAPTER / "adapter_model.safetensors")
    after = load_file(Path(tuned.path) / "adapter_model.safetensors")
    head_keys = [key for key in after if "classifier" in key]
    assert head_keys and all(not torch.equal(before[key], after[key]) for key in after)
    assert after[next(k for k in head_keys if k.endswith("weight"))].shape == (3, 32)

    confusion = dsl.ClassificationMetrics(name="confusion", uri=str(tmp_path / "confusion"), metadata={})
    report = dsl.HTML(name="report", uri=str(tmp_path / "report.html"), metadata={})
    components.evaluate.python_func(config_json=config_json, run_id=run_id, tokenized=tokenized, tuned_model=tuned,
                                    evaluation=evaluation, metrics=metrics, confusion_matrix=confusion, report=report)
    scores = json.loads((Path(evaluation.path) / "evaluation.json").read_text())["metrics"]
    assert scores["eval/samples"] == 48
    assert scores["eval/tuned_accuracy"] > scores["eval/base_accuracy"] + 0.2
    assert scores["eval/tuned_accuracy"] > scores["eval/majority_accuracy"] + 0.2
    assert scores["eval/tuned_macro_f1"] > scores["eval/base_macro_f1"]
    assert metrics.metadata["eval/tuned_accuracy"] == scores["eval/tuned_accuracy"]
    # the KFP UI's views: the tuned model's confusion matrix and the report page
    matrix = confusion.metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == ["negative", "neutral", "positive"]
    assert sum(sum(row["row"]) for row in matrix["rows"]) == 48
    page = Path(report.path).read_text()
    assert "<td>accuracy</td>" in page and "data:image/png;base64," in page
    client = tracking.client(config["tracking"]["mlflow_uri"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/confusion_matrix_base.png", "plots/confusion_matrix_tuned.png"} <= artifacts
    assert client.get_run(run_id).data.metrics["eval/tuned_recall.positive"] == scores["eval/tuned_recall.positive"]
    assert "eval/forgetting_pct" not in scores
    assert client.get_run(run_id).data.tags["eval/retention"].startswith(
        "not applicable: the checkpoint ships no masked-LM head")

    registered = dsl.Model(name="registered", uri=str(tmp_path / "registered"), metadata={})
    components.register.python_func(config_json=config_json, run_id=run_id, lineage=lineage, tokenized=tokenized,
                                    prepared_model=prepared, tuned_model=tuned, evaluation=evaluation,
                                    registered_model=registered)
    assert (registered.metadata["model_name"], registered.metadata["version"]) == ("tiny-sentiment", "1")
    assert registered.metadata["registered_model_uri"] == "models:/tiny-sentiment/1"
    assert registered.metadata["run_id"] == run_id and registered.metadata["champion"] is True


def test_full_fine_tuning_reports_masked_lm_forgetting(bert_mlm_dir, sentiment_file, general_reviews, tmp_path):
    """An encoder checkpoint with its pretraining head: the evaluate stage scores the base and the
    fully fine-tuned encoder through it and logs the forgetting figure."""
    from tiny import run_stages, tiny_run_config

    config = tiny_run_config(
        bert_mlm_dir, sentiment_file, task="classification",
        model={"quantization": "none", "gradient_checkpointing": False, "lora": None},
        data={"text_field": "review", "label_field": "score", "max_length": 32},
        train={"batch_size": 16, "max_steps": 8, "warmup_steps": 0, "learning_rate": 5e-3, "save_steps": 0},
        evaluate={"max_samples": 24, "batch_size": 16, "num_generations": 0, "retention_path": str(general_reviews),
                  "retention_samples": 30},
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "classification"},
        storage={"uri": str(tmp_path / "storage")})
    out = run_stages(config, tmp_path)
    scores = json.loads((Path(out["evaluation"].path) / "evaluation.json").read_text())["metrics"]
    assert scores["eval/retention.samples"] == 30
    base, tuned = scores["eval/retention.base_perplexity"], scores["eval/retention.tuned_perplexity"]
    assert base > 1 and tuned > 1 and base != tuned, "full fine-tuning moved the encoder"
    assert scores["eval/forgetting_pct"] == pytest.approx(100 * (tuned / base - 1), abs=0.01)
    assert out["metrics"].metadata["eval/forgetting_pct"] == scores["eval/forgetting_pct"]
