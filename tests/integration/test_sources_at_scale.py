"""Sources at production shape: a folder or an S3 prefix of many shards (.jsonl.gz, .parquet, .csv) read as
one data set, streamed from a real S3 API (moto on loopback), with file:line provenance in every message;
shards that change or disappear while a run reads them stop it; the seeded permutation equals
random.shuffle; tokenize gives the same artifact with one worker or two."""

from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune import artifacts, data, disk_shuffle, sources, tokenization
from kubetune.config import DataConfig
from kubetune.errors import DataError
from kubetune.shards import ShardChanged, list_shards
from tiny import build_tokenizer, training_texts


def shard_rows(shard: int, count: int = 5) -> list[dict]:
    return [{"content": f"shard {shard} row {i} says something", "n": i} for i in range(count)]


def write_mixed_folder(folder, shards: int = 12) -> list[dict]:
    """Shards in three formats; returns every row in listing order."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in range(shards):
        part = shard_rows(shard)
        rows.extend(part)
        stem = folder / f"part-{shard:05d}"
        if shard % 3 == 0:
            stem.with_suffix(".jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in part).encode()))
        elif shard % 3 == 1:
            pq.write_table(pa.Table.from_pylist(part), stem.with_suffix(".parquet"))
        else:
            stem.with_suffix(".csv").write_text("content,n\n" + "".join(f"{r['content']},{r['n']}\n" for r in part))
    return rows


def test_a_folder_of_mixed_shards_reads_as_one_data_set(tmp_path):
    expected = write_mixed_folder(tmp_path / "shards")
    rows, digest, where = sources.load_records(DataConfig(path=str(tmp_path / "shards")))
    assert [r["content"] for r in rows] == [r["content"] for r in expected]
    assert where[0].endswith("part-00000.jsonl.gz:1") and where[5].endswith("part-00001.parquet row 1")
    assert where[10].endswith("part-00002.csv:2")
    splits = data.prepare_data(DataConfig(path=str(tmp_path / "shards")), "causal_lm", seed=0, out_dir=tmp_path / "out")
    assert splits.stats["rows_source"] == 60 and splits.stats["content_sha256"] == digest
    assert sorted(r["text"] for name in splits.names for r in splits.rows(name)) == sorted(r["content"] for r in expected)


def test_a_bad_row_deep_in_many_shards_is_named_by_file_and_line(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for shard in range(300):
        lines = [json.dumps(r) for r in shard_rows(shard)]
        if shard == 270:
            lines[3] = '{"content": "cut off'
        (folder / f"part-{shard:05d}.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        data.prepare_data(DataConfig(path=str(folder)), "causal_lm", seed=0, out_dir=tmp_path / "out")
    assert str(info.value).startswith(f"data.path = '{folder / 'part-00270.jsonl'}:4': not valid JSON")
    (folder / "part-00270.jsonl").write_text("\n".join(json.dumps(r) for r in shard_rows(270)) + "\n"
                                              + json.dumps({"content": None}) + "\n")
    with pytest.raises(DataError, match=r"1 of 1501 records in data.path have no usable value .*the first is "
                                        rf"{folder / 'part-00270.jsonl'}:6 \(None\)"):
        data.prepare_data(DataConfig(path=str(folder)), "causal_lm", seed=0, out_dir=tmp_path / "out")


def test_a_local_shard_that_changes_or_disappears_while_read_stops_the_run(tmp_path):
    write_mixed_folder(tmp_path / "shards", shards=3)
    listed = list_shards(str(tmp_path / "shards"))
    (tmp_path / "shards" / "part-00002.csv").write_text("content,n\nonly one row,0\n")
    with pytest.raises(ShardChanged, match=r"part-00002.csv': this file changed while the run read it"):
        list(sources.read_shard(listed[2], listed))
    (tmp_path / "shards" / "part-00000.jsonl.gz").unlink()
    with pytest.raises(ShardChanged, match="disappeared while the run read it"):
        list(sources.read_shard(listed[0], listed))


def upload_folder(client, bucket: str, folder, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


def test_an_s3_prefix_streams_the_same_rows_and_hash_as_the_local_folder(s3_server, s3_bucket, tmp_path):
    write_mixed_folder(tmp_path / "shards")
    client = s3_server.client()
    upload_folder(client, s3_bucket, tmp_path / "shards", "corpus/v1")
    client.put_object(Bucket=s3_bucket, Key="corpus/v1/README.md", Body=b"not data")
    local = sources.load_records(DataConfig(path=str(tmp_path / "shards")))
    remote = sources.load_records(DataConfig(path=f"s3://{s3_bucket}/corpus/v1"), s3_server.endpoint_url)
    assert remote[0] == local[0] and remote[1] == local[1]
    assert remote[2][0] == f"s3://{s3_bucket}/corpus/v1/part-00000.jsonl.gz:1"
    one = sources.load_records(DataConfig(path=f"s3://{s3_bucket}/corpus/v1/part-00002.csv"), s3_server.endpoint_url)
    assert [r["content"] for r in one[0]] == [r["content"] for r in shard_rows(2)]


def test_an_s3_shard_that_changes_or_disappears_while_read_stops_the_run(s3_server, s3_bucket, tmp_path):
    write_mixed_folder(tmp_path / "shards", shards=3)
    client = s3_server.client()
    upload_folder(client, s3_bucket, tmp_path / "shards", "moving")
    listed = list_shards(f"s3://{s3_bucket}/moving", s3_server.endpoint_url)
    client.put_object(Bucket=s3_bucket, Key="moving/part-00002.csv", Body=b"content,n\nrewritten,0\n")
    with pytest.raises(ShardChanged, match=rf"s3://{s3_bucket}/moving/part-00002.csv': this file changed"):
        list(sources.read_shard(listed[2], listed))
    client.delete_object(Bucket=s3_bucket, Key="moving/part-00000.jsonl.gz")
    with pytest.raises(ShardChanged, match="disappeared while the run read it"):
        list(sources.read_shard(listed[0], listed))


def test_an_empty_s3_prefix_says_so(s3_server, s3_bucket):
    with pytest.raises(DataError, match=r"data.path = 's3://.*/nothing-here': no .* file or folder"):
        sources.load_records(DataConfig(path=f"s3://{s3_bucket}/nothing-here"), s3_server.endpoint_url)


@pytest.mark.parametrize("count", [0, 1, 2, 17, 1000])
def test_the_permutation_is_the_one_random_shuffle_gives(count):
    items = list(range(count))
    random.Random(11).shuffle(items)
    assert list(data.shuffled(count, 11)) == items


def test_tokenize_in_two_workers_over_shards_writes_what_one_process_writes(tmp_path, monkeypatch):
    texts = training_texts()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"content": f"{t} ({i})"}) + "\n"
                                              for i, t in enumerate(texts * 4)))
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), max_length=16)
    data.prepare_data(cfg, "causal_lm", seed=0, out_dir=tmp_path / "prepared")
    monkeypatch.setattr(disk_shuffle, "BUCKET_ROWS", 700)  # the same rows, in shards of 700
    monkeypatch.setattr(artifacts, "SHARD_BYTES", 1)
    data.prepare_data(cfg, "causal_lm", seed=0, out_dir=tmp_path / "sharded")
    assert len(artifacts.split_shards(tmp_path / "sharded", "train")) == 3
    build_tokenizer(texts).save_pretrained(tmp_path / "tok")
    monkeypatch.setattr(tokenization, "MIN_ROWS_PER_PROCESS", 100)
    one = tokenization.tokenize(tmp_path / "prepared", tmp_path / "tok", cfg, tmp_path / "one", processes=1)
    two = tokenization.tokenize(tmp_path / "sharded", tmp_path / "tok", cfg, tmp_path / "two", processes=2)
    assert one == two and one["train_tokens_total"] > 0
    for split in ("train", "validation"):
        assert artifacts.read_tokenized(tmp_path / "one", split)[:] == artifacts.read_tokenized(tmp_path / "two", split)[:]


def test_tokenize_workers_follow_the_containers_cpu_limit_not_the_nodes_cores(tmp_path):
    """A pod's CPU limit is a cgroup quota; os.cpu_count() would be the node's cores."""
    here = tokenization.cpu_limit(tmp_path / "no-cgroup")
    assert here >= 1
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")  # limits.cpu: 1500m
    assert tokenization.cpu_limit(tmp_path / "v2") == min(2, here)
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert tokenization.cpu_limit(tmp_path / "v2") == here
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert tokenization.cpu_limit(tmp_path / "v1") == 1
