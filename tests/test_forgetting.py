"""Catastrophic forgetting: retention perplexity before/after, and replay of general text."""

import json
from pathlib import Path

import pytest

from kubetune import data
from kubetune.config import DataConfig
from tiny import SAMPLE_TEXTS, general_texts, run_stages, tiny_run_config


@pytest.fixture(scope="module")
def general_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("general") / "general.txt"
    lines = [line for line in general_texts() if len(line.split()) >= 8][:300]
    path.write_text("= A heading that is skipped =\n\n" + "\n".join(lines) + "\n")
    return path


def test_replay_mixes_the_asked_share_of_general_text(tmp_path, general_file):
    quotes = tmp_path / "q.json"
    quotes.write_text(json.dumps([{"content": t} for t in SAMPLE_TEXTS * 10]))
    cfg = DataConfig(path=str(quotes), text_field="content", validation_fraction=0.2, replay_path=str(general_file),
                     replay_fraction=0.25)
    splits = data.prepare(cfg, "causal_lm", seed=0)
    general = {line.strip() for line in general_file.read_text().splitlines()}
    replayed = [row for row in splits.train if row["text"] in general]
    assert splits.stats["rows_replay"] == len(replayed) == round(64 * 0.25 / 0.75)
    assert not any(row["text"] in general for row in splits.validation), "validation must stay the task's own"
    assert not any(text.startswith("=") for text in (row["text"] for row in replayed))


def test_paired_text_and_label_files_and_test_split(tmp_path):
    (tmp_path / "val_text.txt").write_text("good day\nbad day\nfine day\nawful day\n")
    (tmp_path / "val_labels.txt").write_text("2\n0\n1\n0\n")
    (tmp_path / "test_text.txt").write_text("great\nterrible\n")
    (tmp_path / "test_labels.txt").write_text("2\n0\n")
    (tmp_path / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    rows = data.read_records(tmp_path / "val_text.txt")
    assert rows[1] == {"text": "bad day", "label": "0"}
    assert data.label_names_beside(str(tmp_path / "val_text.txt")) == {"0": "negative", "1": "neutral", "2": "positive"}
    cfg = DataConfig(path=str(tmp_path / "val_text.txt"), text_field="text", test_path=str(tmp_path / "test_text.txt"),
                     validation_fraction=0.25)
    splits = data.prepare(cfg, "causal_lm", seed=0)
    assert [r["text"] for r in splits.test] == ["great", "terrible"]
    data.save_splits(splits, tmp_path / "out")
    assert data.split_names(tmp_path / "out") == ["train", "validation", "test"]


def test_mismatched_label_file_is_named(tmp_path):
    (tmp_path / "val_text.txt").write_text("a\nb\n")
    (tmp_path / "val_labels.txt").write_text("1\n")
    with pytest.raises(data.DataError, match="2 texts but 1 labels"):
        data.read_records(tmp_path / "val_text.txt")


def test_evaluate_reports_retention_and_forgetting(tiny_model_dir, quotes_file, general_file, tmp_path):
    config = tiny_run_config(tiny_model_dir, quotes_file,
                             data={"replay_path": str(general_file), "replay_fraction": 0.2},
                             evaluate={"retention_path": str(general_file), "retention_samples": 24},
                             tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                             storage={"uri": str(tmp_path / "storage")})
    out = run_stages(config, tmp_path)
    metrics = json.loads((Path(out["evaluation"].path) / "evaluation.json").read_text())["metrics"]
    base, tuned = metrics["eval.retention.base_perplexity"], metrics["eval.retention.tuned_perplexity"]
    assert metrics["eval.retention.samples"] == 24 and base > 1 and tuned > 1
    assert metrics["eval.forgetting_pct"] == pytest.approx(100 * (tuned / base - 1), abs=0.01)
    stats = json.loads((Path(out["dataset"].path) / "stats.json").read_text())
    assert stats["rows_replay"] == round(stats["rows_usable"] * 0.8 * 0.2 / 0.8)
