import dataclasses
import json
from pathlib import Path

import pytest

from kubetune import artifacts, data, disk_shuffle, sources
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
    texts = sorted(r["text"] for r in splits.rows("train") + splits.rows("validation"))
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
    assert one.rows("train") == two.rows("train") and one.rows("validation") == two.rows("validation")
    assert not {r["text"] for r in one.rows("train")} & {r["text"] for r in one.rows("validation")}
    other = data.prepare_data(cfg, "causal_lm", seed=4)
    assert other.rows("validation") != one.rows("validation")


def test_max_rows_caps_after_shuffle(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "d.json")), max_rows=20)
    splits = data.prepare_data(cfg, "causal_lm", seed=0)
    assert len(splits.rows("train")) + len(splits.rows("validation")) == 20


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.path = '.*nope.json': no such file"):
        data.prepare_data(DataConfig(path=str(tmp_path / "nope.json")), "causal_lm", seed=0)


def test_missing_text_field_lists_the_fields(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "d.json")), text_field="quote")
    with pytest.raises(DataError, match=r"data.text_field = 'quote': not a field of the data; fields found: author, content"):
        data.prepare_data(cfg, "causal_lm", seed=0)


def test_too_few_rows(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "d.json", ROWS[:9])), validation_fraction=0.25)
    with pytest.raises(DataError, match=r"data.path = .*: 9 usable records, fewer than the 10 a run needs"):
        data.prepare_data(cfg, "causal_lm", seed=0)
    cfg = DataConfig(path=str(write(tmp_path / "d.json", ROWS[:12])), validation_fraction=0.4)
    with pytest.raises(DataError, match=r"data.path = .*: 7 usable training records \(of 12, 5 held out\), fewer "
                                        r"than data.min_train_rows \(8\)"):
        data.prepare_data(cfg, "causal_lm", seed=0)
    with pytest.raises(DataError, match=r"data.validation_fraction = 0.1: holds out 1 of 12 usable records, fewer "
                                        r"than data.min_validation_rows \(2\)"):
        data.prepare_data(dataclasses.replace(cfg, validation_fraction=0.1), "causal_lm", seed=0)
    assert len(data.prepare_data(dataclasses.replace(cfg, min_train_rows=7), "causal_lm", seed=0).rows("train")) == 7


def test_prepared_artifact_round_trip(tmp_path):
    splits = data.prepare_data(DataConfig(path=str(write(tmp_path / "d.json"))), "causal_lm", seed=0,
                               out_dir=tmp_path / "out")
    assert artifacts.read_split(tmp_path / "out", "validation").to_list() == splits.rows("validation")
    assert artifacts.split_names(tmp_path / "out") == ["train", "validation"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_train"] == 18
    artifacts.write_dataset(tmp_path / "small", {name: splits.rows(name) for name in splits.names}, splits.stats)
    assert list(artifacts.split_rows(tmp_path / "small", "train")) == splits.rows("train")


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def physical_lines(path: Path) -> int:
    """Non-blank lines, split on line feeds only (as the reader does)."""
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
@pytest.mark.parametrize("name, header_lines", [
    ("sentiment/binary/amazon_cells_labelled.tsv", 1), ("sentiment/binary/imdb_labelled.tsv", 1),
    ("sentiment/binary/yelp_labelled.tsv", 1), ("sentiment/3class/tweeteval/val_text.txt", 0),
    ("sentiment/3class/tweeteval/test_text.txt", 0), ("instruction/multitask/self_instruct_seed_tasks.jsonl", 0),
    ("instruction/multitask/self_instruct_user_oriented_instructions.jsonl", 0),
    ("retention/wikitext2_test.txt", 0), ("retention/tinyshakespeare_input.txt", 0),
])
def test_every_line_of_the_shared_data_is_one_record(name, header_lines):
    """The UCI IMDb file has sentences that open a quote and never close it; a CSV reader merged
    lines under them and read 748 of its 1,000 rows. Each line must be one record."""
    path = SHARED / name
    assert len(sources.read_records(path)) == physical_lines(path) - header_lines


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_the_uci_files_hold_1000_labelled_sentences_each():
    for name in ("amazon_cells", "imdb", "yelp"):
        records = sources.read_records(SHARED / "sentiment" / "binary" / f"{name}_labelled.tsv")
        assert len(records) == 1000 and {r["sentiment"] for r in records} == {"0", "1"}
        assert max(len(r["reviews"]) for r in records) < 1000  # no merged lines


def test_csv_quoting_spans_lines_only_when_well_formed(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"Hello, world",1\n" opens and never closes,0\nplain,1\n"two\nlines",0\n'
                    '"He said ""hi""",1\n')
    assert sources.read_records(path) == [
        {"text": "Hello, world", "label": "1"}, {"text": '" opens and never closes', "label": "0"},
        {"text": "plain", "label": "1"}, {"text": "two\nlines", "label": "0"}, {"text": 'He said "hi"', "label": "1"}]


def test_gzip_and_byte_order_mark_are_read(tmp_path):
    import gzip

    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"content": "a"}\n{"content": "b"}\n'))
    assert [r["content"] for r in sources.read_records(tmp_path / "d.jsonl.gz")] == ["a", "b"]
    (tmp_path / "bom.tsv").write_bytes("\ufefftext\tlabel\nx\t1\n".encode())
    assert sources.read_records(tmp_path / "bom.tsv") == [{"text": "x", "label": "1"}]


def test_missing_values_are_recognised():
    for value in (None, float("nan"), float("inf"), "", "  ", "NaN", "nan", "null", "None", "N/A", "#N/A", "<NA>"):
        assert sources.is_missing(value), value
    for value in (0, 0.0, "0", "no", "NA-42", False):
        assert not sources.is_missing(value), value
    assert sources.text_of(1.0) == "1" and sources.text_of(float("nan")) == ""


def test_drop_invalid_drops_and_counts(tmp_path):
    rows = [{"content": f"quote {i}"} for i in range(20)] + [{"content": None}, {"content": "NaN"}, {"author": "x"}]
    cfg = DataConfig(path=str(write(tmp_path / "d.json", rows)), drop_invalid=True)
    splits = data.prepare_data(cfg, "causal_lm", seed=0)
    assert splits.stats["rows_invalid"] == 3 and splits.stats["rows_source"] == 23
    assert len(splits.rows("train")) + len(splits.rows("validation")) == 20
    with pytest.raises(DataError, match=r"data.text_field = 'content': 3 of 23 records"):
        data.prepare_data(dataclasses.replace(cfg, drop_invalid=False), "causal_lm", seed=0)


def test_the_prepared_artifact_is_the_same_bytes_on_every_run(tmp_path):
    """tokenize's cache is keyed by the prepared artifact's bytes: equal inputs must give equal bytes."""
    cfg = DataConfig(path=str(write(tmp_path / "d.jsonl")), text_field="content")
    for name in ("one", "two"):
        data.prepare_data(cfg, "causal_lm", seed=5, out_dir=tmp_path / name)
    assert artifacts.digest(tmp_path / "one") == artifacts.digest(tmp_path / "two")
    data.prepare_data(cfg, "causal_lm", seed=6, out_dir=tmp_path / "two")
    assert artifacts.digest(tmp_path / "one") != artifacts.digest(tmp_path / "two")


def test_splits_written_in_many_buckets_and_shards_hold_the_same_rows(tmp_path, monkeypatch):
    """write_split's on-disk shuffle: small buckets and shards must give the rows one bucket gives."""
    rows = [{"content": f"row {i} " + "x" * (i % 7), "author": "a"} for i in range(500)]
    cfg = DataConfig(path=str(write(tmp_path / "d.jsonl", rows)), text_field="content", validation_fraction=0.3)
    whole = data.prepare_data(cfg, "causal_lm", seed=2, out_dir=tmp_path / "whole")
    monkeypatch.setattr(disk_shuffle, "BUCKET_ROWS", 17)
    monkeypatch.setattr(artifacts, "SHARD_BYTES", 1)  # a shard a bucket
    cut = data.prepare_data(cfg, "causal_lm", seed=2, out_dir=tmp_path / "cut")
    assert len(artifacts.split_shards(tmp_path / "cut", "train")) == 21  # 350 rows, 17 a bucket
    for name in ("train", "validation"):
        assert cut.rows(name) == whole.rows(name)
        assert artifacts.read_split(tmp_path / "cut", name).to_list() == whole.rows(name)
    assert cut.stats == whole.stats
