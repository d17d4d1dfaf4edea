"""Catastrophic forgetting: replay of general text, and the paired text/label files it reads. The
retention perplexity before/after, from the stages in order: tests/integration/test_forgetting_stages.py."""

import json

import pytest

from kubetune import artifacts, data, sources
from kubetune.config import DataConfig
from kubetune.errors import DataError
from tiny import SAMPLE_TEXTS


def test_replay_mixes_the_asked_share_of_general_text(tmp_path, general_file):
    quotes = tmp_path / "q.json"
    quotes.write_text(json.dumps([{"content": t} for t in SAMPLE_TEXTS * 10]))
    cfg = DataConfig(path=str(quotes), text_field="content", validation_fraction=0.2, replay_path=str(general_file),
                     replay_fraction=0.25)
    splits = data.prepare_data(cfg, "causal_lm", seed=0)
    general = {line.strip() for line in general_file.read_text().splitlines()}
    replayed = [row for row in splits.rows("train") if row["text"] in general]
    assert splits.stats["rows_replay"] == len(replayed) == round(64 * 0.25 / 0.75)
    assert not any(row["text"] in general for row in splits.rows("validation")), "validation must stay the task's own"
    assert not any(text.startswith("=") for text in (row["text"] for row in replayed))


def test_paired_text_and_label_files_and_test_split(tmp_path):
    (tmp_path / "val_text.txt").write_text("good day\nbad day\nfine day\nawful day\n")
    (tmp_path / "val_labels.txt").write_text("2\n0\n1\n0\n")
    (tmp_path / "test_text.txt").write_text("great\nterrible\n")
    (tmp_path / "test_labels.txt").write_text("2\n0\n")
    (tmp_path / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    rows = sources.read_records(tmp_path / "val_text.txt")
    assert rows[1] == {"text": "bad day", "label": "0"}
    assert sources.label_names_beside(str(tmp_path / "val_text.txt")) == {"0": "negative", "1": "neutral", "2": "positive"}
    cfg = DataConfig(path=str(tmp_path / "val_text.txt"), text_field="text", test_path=str(tmp_path / "test_text.txt"),
                     validation_fraction=0.25, min_train_rows=1, min_validation_rows=1)
    splits = data.prepare_data(cfg, "causal_lm", seed=0)
    assert [r["text"] for r in splits.rows("test")] == ["great", "terrible"]
    artifacts.write_dataset(tmp_path / "out", {name: splits.rows(name) for name in splits.names}, splits.stats)
    assert artifacts.split_names(tmp_path / "out") == ["train", "validation", "test"]


def test_mismatched_label_file_is_named(tmp_path):
    (tmp_path / "val_text.txt").write_text("a\nb\n")
    (tmp_path / "val_labels.txt").write_text("1\n")
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        sources.read_records(tmp_path / "val_text.txt")
