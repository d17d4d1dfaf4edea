"""Catastrophic forgetting through the pipeline's stages in order, in this process: retention
perplexity before/after on general text, and replay mixed into the training data."""

import json
from pathlib import Path

import pytest

from tiny import run_stages, tiny_run_config


def test_evaluate_reports_retention_and_forgetting(tiny_model_dir, quotes_file, general_file, tmp_path):
    config = tiny_run_config(tiny_model_dir, quotes_file,
                             data={"replay_path": str(general_file), "replay_fraction": 0.2},
                             evaluate={"retention_path": str(general_file), "retention_samples": 24},
                             tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                             storage={"uri": str(tmp_path / "storage")})
    out = run_stages(config, tmp_path)
    metrics = json.loads((Path(out["evaluation"].path) / "evaluation.json").read_text())["metrics"]
    base, tuned = metrics["eval/retention.base_perplexity"], metrics["eval/retention.tuned_perplexity"]
    assert metrics["eval/retention.samples"] == 24 and base > 1 and tuned > 1
    assert metrics["eval/forgetting_pct"] == pytest.approx(100 * (tuned / base - 1), abs=0.01)
    stats = json.loads((Path(out["dataset"].path) / "stats.json").read_text())
    assert stats["rows_replay"] == round(stats["rows_usable"] * 0.8 * 0.2 / 0.8)
