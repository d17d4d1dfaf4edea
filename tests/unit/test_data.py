import dataclasses
import json
from pathlib import Path

import pytest

from kubetune import artifacts, data, disk_shuffle, sources
from kubetune.config import DataConfig
from kubetune.errors import DataError
from kubetune.tasks.base import label_text

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
    assert sources.text_of(1.0) == "1.0" and sources.text_of(float("nan")) == ""
    assert label_text(1.0, DataConfig()) == "1" and label_text(True, DataConfig()) == "true"  # 1.0 is the label 1


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


# ---- data that looked fine (issue 23) -----------------------------------------------------------
def jsonl_file(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def labelled(path: Path, rows: list, **values) -> DataConfig:
    return DataConfig(path=jsonl_file(path, rows), text_field="text", label_field="label", **values)


def pairs(splits: data.Splits, name: str) -> list[tuple]:
    return [tuple(sorted(r.items())) for r in splits.rows(name)]


def test_records_in_both_splits_are_counted_and_warned_of(tmp_path, caplog):
    rows = [{"text": f"row {i % 10}" + (" " * (i % 3)), "label": i % 2} for i in range(40)]  # whitespace differs
    cfg = labelled(tmp_path / "d.jsonl", rows, validation_fraction=0.25)
    splits = data.prepare_data(cfg, "classification", seed=1)
    trained = set(pairs(splits, "train"))
    shared = sum(row in trained for row in pairs(splits, "validation"))
    assert shared == splits.stats["rows_duplicated_across_splits"] == 10
    assert splits.stats["rows_duplicates_dropped"] == 0 and splits.stats["rows_usable"] == 40
    assert f"data: {shared} of 10 validation rows are identical to a training row" in caplog.text
    assert "data.drop_duplicates: true" in caplog.text


def test_drop_duplicates_keeps_each_record_once_before_the_split(tmp_path, caplog):
    rows = [{"text": f"row {i % 30}", "label": (i % 30) % 2} for i in range(60)]
    test_rows = [{"text": "row 3", "label": "1"}, {"text": "row 4", "label": "1"}]  # row 3 is a training record too
    cfg = labelled(tmp_path / "d.jsonl", rows, validation_fraction=0.25, drop_duplicates=True,
                   test_path=jsonl_file(tmp_path / "t.jsonl", test_rows))
    splits = data.prepare_data(cfg, "classification", seed=1)
    kept = pairs(splits, "train") + pairs(splits, "validation")
    assert len(kept) == len(set(kept)) == 29 and (("label", "1"), ("text", "row 3")) not in kept
    assert splits.stats["rows_duplicates_dropped"] == 31 and splits.stats["rows_usable"] == 60
    assert splits.stats["rows_duplicated_across_splits"] == 0 and splits.stats["rows_test_in_train"] == 0
    assert splits.rows("test") == test_rows  # the test set is kept as given
    assert "identical to a training row" not in caplog.text
    kept_again = data.prepare_data(cfg, "classification", seed=1)
    assert kept_again.rows("train") == splits.rows("train")
    splits = data.prepare_data(dataclasses.replace(cfg, drop_duplicates=False), "classification", seed=1)
    assert splits.stats["rows_test_in_train"] == sum(r == test_rows[0] for r in splits.rows("train")) > 0
    assert "of 2 test rows are identical to a training row" in caplog.text


def test_preflight_shows_the_duplicates_warning(tmp_path, caplog):
    from kubetune.config import RunConfig
    from kubetune.preflight import check_data

    rows = [{"content": f"quote {i % 5}"} for i in range(40)]
    check_data(RunConfig(data=DataConfig(path=jsonl_file(tmp_path / "q.jsonl", rows))))
    assert "validation rows are identical to a training row" in caplog.text


def class_rows(seed: int, count: int, single: str, single_in: str) -> list[dict]:
    """`count` rows of classes a and b with one row of class `single` where the split with `seed`
    puts it (train or validation, at validation_fraction 0.25)."""
    order = data.shuffled(count, seed)
    position = int(order[-1] if single_in == "train" else order[0])
    return [{"text": f"row {i}", "label": single if i == position else "ab"[i % 2]} for i in range(count)]


def test_a_class_too_small_for_validation_is_named(tmp_path, caplog):
    cfg = labelled(tmp_path / "d.jsonl", class_rows(3, 40, "c", "train"), validation_fraction=0.25)
    data.prepare_data(cfg, "classification", seed=3)
    assert "1 class(es) have no row in the validation split" in caplog.text
    assert "'c' (1 example) (a class with a single example cannot be both trained on and validated)" in caplog.text
    cfg = labelled(tmp_path / "d.jsonl", class_rows(3, 40, "c", "validation"), validation_fraction=0.25)
    with pytest.raises(DataError, match=r"^data.label_field = 'label': label\(s\) 'c' \(1 example\) have all their "
                       "examples in the validation split and none in training"):
        data.prepare_data(cfg, "classification", seed=3)


def test_the_rare_classes_named_are_bounded(tmp_path, caplog):
    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(200)]
    order = data.shuffled(200 + 9, 0)
    for n, position in enumerate(sorted(int(p) for p in order[-9:])):  # nine classes of one, all in training
        rows.insert(position, {"text": f"rare {n}", "label": f"r{n}"})
    data.prepare_data(labelled(tmp_path / "d.jsonl", rows, validation_fraction=0.25), "classification", seed=0)
    assert "9 class(es) have no row in the validation split" in caplog.text
    assert "'r4' (1 example) and 4 more" in caplog.text and "'r5'" not in caplog.text


def test_a_missing_marker_that_is_a_class_stops_the_run(tmp_path):
    rows = [{"text": f"row {i}", "label": ["pos", "neg", "none"][i % 3]} for i in range(45)]
    cfg = labelled(tmp_path / "d.jsonl", rows, drop_invalid=True)
    with pytest.raises(DataError, match=r"^data.label_field = 'label': 15 of 45 records in data.path have the value "
                       r"'none', which is read as missing .*data.missing_labels: \[\]"):
        data.prepare_data(cfg, "classification", seed=0)
    splits = data.prepare_data(dataclasses.replace(cfg, missing_labels=[]), "classification", seed=0)
    assert {r["label"] for r in splits.rows("train")} == {"pos", "neg", "none"}
    splits = data.prepare_data(dataclasses.replace(cfg, missing_labels=["none"]), "classification", seed=0)
    assert splits.stats["rows_invalid"] == 15  # said to be missing: dropped under drop_invalid
    answers = [{"instruction": f"Which {i}?", "input": "", "output": "None" if i % 2 else f"n{i}"} for i in range(20)]
    instruction = DataConfig(path=jsonl_file(tmp_path / "i.jsonl", answers), label_field="output", input_field="input")
    with pytest.raises(DataError, match="^data.label_field = 'output': 10 of 20 records .* value 'None'"):
        data.prepare_data(instruction, "instruction", seed=0)


def test_a_few_empty_or_null_labels_are_still_missing(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(30)] + [
        {"text": "a", "label": None}, {"text": "b", "label": ""}, {"text": "c", "label": float("nan")},
        {"text": "d", "label": "N/A"}]
    splits = data.prepare_data(labelled(tmp_path / "d.jsonl", rows, drop_invalid=True), "classification", seed=0)
    assert splits.stats["rows_invalid"] == 4


SCALARS = [42, 0.5, True, 1.0, -3, 1e20]
SCALAR_TEXTS = ["42", "0.5", "true", "1.0", "-3", "1e+20"]


def test_scalars_in_text_fields_are_the_text_json_writes(tmp_path):
    assert [sources.text_of(v) for v in SCALARS] == SCALAR_TEXTS
    rows = [{"text": value, "label": i % 2} for i, value in enumerate(SCALARS * 4)]
    splits = data.prepare_data(labelled(tmp_path / "d.jsonl", rows, min_train_rows=1), "classification", seed=0)
    assert {r["text"] for r in splits.rows("train") + splits.rows("validation")} == set(SCALAR_TEXTS)
    csv = tmp_path / "d.csv"  # the same values as a CSV file holds them
    csv.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(SCALAR_TEXTS * 4)))
    from_csv = data.prepare_data(DataConfig(path=str(csv), text_field="text", label_field="label", min_train_rows=1),
                                 "classification", seed=0)
    assert from_csv.rows("train") == splits.rows("train")
    bad = rows + [{"text": ["a list"], "label": 0}, {"text": {"a": 1}, "label": 1}, {"text": None, "label": 1}]
    with pytest.raises(DataError, match=r"^data.text_field = 'text': 3 of 27 records"):
        data.prepare_data(labelled(tmp_path / "d.jsonl", bad), "classification", seed=0)


def test_scalars_read_alike_in_instruction_and_chat_fields(tmp_path):
    rows = [{"instruction": True, "input": 0.5, "output": 7} for _ in range(12)]
    cfg = DataConfig(path=jsonl_file(tmp_path / "i.jsonl", rows), label_field="output", input_field="input",
                     template="{instruction}|{input}", validation_fraction=0.2)
    record = data.prepare_data(cfg, "instruction", seed=0).rows("train")[0]
    assert (record["prompt"], record["answer"]) == ("true|0.5", "7")
    talk = [{"messages": [{"role": "user", "content": True}, {"role": "assistant", "content": 0.5}]}] * 12
    chat = DataConfig(path=jsonl_file(tmp_path / "c.jsonl", talk), validation_fraction=0.2)
    record = data.prepare_data(chat, "chat", seed=0).rows("train")[0]
    assert [m["content"] for m in record["messages"]] == ["true", "0.5"]
    mapping = talk + [{"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(DataError, match=r"^data.messages_field = 'messages': 1 of 13 records"):
        data.prepare_data(dataclasses.replace(chat, path=jsonl_file(tmp_path / "c.jsonl", mapping)), "chat", seed=0)


def refused_quickly(cfg: DataConfig, task: str = "causal_lm") -> DataError:
    """The DataError prepare_data raises, within seconds (opening a named pipe would block forever)."""
    import threading

    raised = []

    def prepare():
        try:
            data.prepare_data(cfg, task, seed=0)
        except DataError as exc:
            raised.append(exc)

    thread = threading.Thread(target=prepare, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "prepare_data hangs"
    assert raised
    return raised[0]


def test_special_files_are_refused_before_they_are_opened(tmp_path):
    import os
    import socket

    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    error = refused_quickly(DataConfig(path=str(pipe)))
    assert str(error).startswith(f"data.path = {str(pipe)!r}: this is a named pipe (FIFO), not a file or folder")
    folder = tmp_path / "shards"
    folder.mkdir()
    write(folder / "a.jsonl")
    os.mkfifo(folder / "b.jsonl")
    assert "named pipe (FIFO)" in str(refused_quickly(DataConfig(path=str(folder))))
    quotes = str(write(tmp_path / "q.jsonl"))
    error = refused_quickly(DataConfig(path=quotes, test_path=str(pipe)))
    assert str(error).startswith("data.test_path = ") and "named pipe" in str(error)
    error = refused_quickly(DataConfig(path=quotes, replay_path=str(pipe), replay_fraction=0.1))
    assert str(error).startswith("data.replay_path = ")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.jsonl"))
        assert "this is a socket" in str(refused_quickly(DataConfig(path=str(tmp_path / "s.jsonl"))))
    (folder / "b.jsonl").unlink()
    os.mkfifo(folder / "notes")  # not a data file's name: not read, as any other such file
    assert data.prepare_data(DataConfig(path=str(folder)), "causal_lm", seed=0).stats["rows_source"] == 20
