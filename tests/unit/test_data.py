import dataclasses
import json

import pytest

from kubetune import artifacts, data, sources
from kubetune.config import DataConfig
from kubetune.errors import DataError

ROWS = [{"content": f"quote number {i}", "author": "a"} for i in range(20)]


def write(path, rows=ROWS):
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text("content" + sep + "author\n" + "".join(f"{r['content']}{sep}{r['author']}\n" for r in rows))
    else:
        path.write_text("".join(r["content"] + "\n\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".txt"])
def test_every_format_reads_the_same_texts(tmp_path, suffix):
    path = write(tmp_path / f"d{suffix}")
    field = "text" if suffix == ".txt" else "content"
    splits = data.prepare_data(DataConfig(path=str(path), text_field=field), "causal_lm", seed=1)
    texts = sorted(r["text"] for r in splits.train + splits.validation)
    assert texts == sorted(r["content"] for r in ROWS)
    assert splits.stats["rows_validation"] == 2 and splits.stats["rows_train"] == 18


def test_directory_of_files_and_hash(tmp_path):
    write(tmp_path / "a.json", ROWS[:10])
    write(tmp_path / "b.jsonl", ROWS[10:])
    rows, digest, _ = sources.load_records(DataConfig(path=str(tmp_path)))
    assert len(rows) == 20 and len(digest) == 64
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    assert sources.load_records(DataConfig(path=str(tmp_path)))[1] != digest


def test_split_is_deterministic_and_disjoint(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "d.json")), text_field="content", validation_fraction=0.25)
    one, two = (data.prepare_data(cfg, "causal_lm", seed=3) for _ in range(2))
    assert one.train == two.train and one.validation == two.validation
    assert not {r["text"] for r in one.train} & {r["text"] for r in one.validation}
    other = data.prepare_data(cfg, "causal_lm", seed=4)
    assert other.validation != one.validation


def test_max_rows_caps_after_shuffle(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "d.json")), max_rows=20)
    splits = data.prepare_data(cfg, "causal_lm", seed=0)
    assert len(splits.train) + len(splits.validation) == 20


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.path = '.*nope.json': no such file"):
        data.prepare_data(DataConfig(path=str(tmp_path / "nope.json")), "causal_lm", seed=0)


def test_missing_text_field_lists_the_fields(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "d.json")), text_field="quote")
    with pytest.raises(DataError, match=r"data.text_field = 'quote': not a field of the data; fields found: author, content"):
        data.prepare_data(cfg, "causal_lm", seed=0)


def test_too_few_rows(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "d.json", ROWS[:9])), validation_fraction=0.25)
    with pytest.raises(DataError, match=r"data.path = .*: 7 usable training records \(of 9, 2 held out\), fewer than "
                                        r"data.min_train_rows \(8\)"):
        data.prepare_data(cfg, "causal_lm", seed=0)
    with pytest.raises(DataError, match=r"data.validation_fraction = 0.1: holds out 1 of 9 usable records, fewer "
                                        r"than data.min_validation_rows \(2\)"):
        data.prepare_data(dataclasses.replace(cfg, validation_fraction=0.1), "causal_lm", seed=0)
    assert len(data.prepare_data(dataclasses.replace(cfg, min_train_rows=7), "causal_lm", seed=0).train) == 7


def test_save_and_load_round_trip(tmp_path):
    splits = data.prepare_data(DataConfig(path=str(write(tmp_path / "d.json"))), "causal_lm", seed=0)
    artifacts.write_dataset(tmp_path / "out", splits.by_name(), splits.stats)
    assert artifacts.read_split(tmp_path / "out", "validation") == splits.validation
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_train"] == 18
