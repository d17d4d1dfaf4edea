"""The artifacts the stages hand each other: the files in each one, with its only writer and readers.

A stage never names a file of another stage's artifact itself; it calls the functions here, so a
reader can see in one page what flows along each edge of the DAG:

    preflight      -> lineage         lineage.json: what the run is made of (data hash, base model
                                      fingerprint, version, technique), handed to register
    prepare_data   -> dataset         train/ validation/ [test/] (Arrow shards), stats.json
    tokenize       -> tokenized       <split>/ (Arrow files of token columns), tokenizer/, task_info.json, stats.json
    prepare_model  -> prepared_model  plan.json, adapter_init/ (LoRA: the adapter training starts from)
    train          -> tuned_model     the adapter (or the full weights), the tokenizer, training_summary.json
    evaluate       -> evaluation      evaluation.json
    register       <- lineage, tokenized (task info), prepared_model (plan), tuned_model, evaluation

The task info (what the task learned from the training split, e.g. the label set) is written once,
into the tokenized artifact, and read from there by every later stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

SPLIT_NAMES = ("train", "validation", "test")
DATA_STATS = "stats.json"
TASK_INFO = "task_info.json"
TOKENIZER = "tokenizer"
PLAN = "plan.json"
INITIAL_ADAPTER = "adapter_init"
TRAINING_SUMMARY = "training_summary.json"
EVALUATION = "evaluation.json"
REPORT = "report.html"
RETRIEVAL = "retrieval"  # evaluate.rag's index: passages.json, vectors.npy, settings.json
LINEAGE = "lineage.json"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: what an artifact holds, wherever it lies."""
    sha = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        sha.update(path.relative_to(folder).as_posix().encode() + b"\0")
        sha.update(path.read_bytes())
    return sha.hexdigest()


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# ---- dataset (prepare_data) ----------------------------------------------------------------------
# Each split is a folder of Arrow IPC stream shards (<split>/data-00000.arrow, ...) that any reader
# memory-maps: datasets.Dataset.from_file, pyarrow.ipc.open_stream. Rows are in the kind's record
# schema (Task.record_schema); a column a record lacks is null and is left out when a row is read.

#: A prepared split's shards hold about this many bytes each (tokenize maps one shard at a time);
#: rows are measured this many at a time.
SHARD_BYTES = 256 * 2**20
GATHER_ROWS = 50_000


class RecordWriter:
    """Appends records (dicts) to one Arrow stream file in a fixed schema, a batch per write()."""

    def __init__(self, path: Path, schema):
        self.path, self.schema = Path(path), schema

    def __enter__(self) -> "RecordWriter":
        import pyarrow as pa

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        return self

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        if rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=self.schema))

    def __exit__(self, *exc) -> None:
        self._writer.close()
        self._sink.close()


def _shards(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("data-*.arrow"))


def _present(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if value is not None}


def _row_chars(row: dict[str, Any]) -> int:
    return len(" ".join(str(v) for v in row.values()))


def write_split(out_dir: Path, name: str, examples: Path, order, measure: bool = False) -> dict[str, float]:
    """The split `name`: the rows of the Arrow file `examples` at the positions in `order` (a
    sequence of ints: output row k is examples row order[k]). measure: returns the length statistics
    of the rows in characters (chars_mean, chars_min, chars_max).

    A shuffle on disk in two sequential passes, so that memory holds a bucket of rows, never the
    file: the first reads `examples` a batch at a time and routes each wanted row, tagged with its
    output position, to the bucket of BUCKET_ROWS output rows it falls in; the second sorts each
    bucket by position and appends it to the split's shards. (Gathering rows at random from the
    memory-mapped file instead made every page of it resident, and Arrow's take over a many-chunk
    table copies the whole column first: 0.44 GB at 3M rows, twice that of 1M.)"""
    import numpy as np
    import pyarrow as pa

    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in _shards(folder):  # an earlier attempt's, which may have had more shards
        stale.unlink()
    positions = np.frombuffer(order, dtype=np.int64) if isinstance(order, memoryview) or hasattr(order, "typecode") \
        else np.asarray(order, dtype=np.int64)
    wanted = len(positions)
    bucket_rows = max(BUCKET_ROWS, -(-wanted // MAX_BUCKETS))
    output_of = np.full(int(positions.max()) + 1 if wanted else 0, -1, dtype=np.int64)  # source row -> output row
    output_of[positions] = np.arange(wanted, dtype=np.int64)
    lengths = _Lengths()
    with tempfile.TemporaryDirectory(prefix="kubetune-split-", dir=folder) as scratch:
        schema = _route(Path(examples), output_of, bucket_rows, Path(scratch))
        writer = _ShardWriter(folder, schema)
        for bucket in range(-(-wanted // bucket_rows)):
            with pa.OSFile(str(Path(scratch) / f"{bucket}.arrow")) as source:
                table = pa.ipc.open_stream(source).read_all()
            table = table.take(np.argsort(table.column(POSITION).to_numpy(), kind="stable")).drop_columns([POSITION])
            writer.write(table)
            if measure:
                lengths.add(table)
        writer.close()
    return lengths.stats() if measure else {}


#: Output rows per bucket of write_split's shuffle, and at most this many buckets open at once.
BUCKET_ROWS = 100_000
MAX_BUCKETS = 512
POSITION = "__position"


def _route(examples: Path, output_of, bucket_rows: int, scratch: Path):
    """write_split's first pass: each wanted row of examples, with its output position, appended to
    scratch/<bucket>.arrow; returns the examples' schema."""
    import numpy as np
    import pyarrow as pa

    sinks: dict[int, Any] = {}
    try:
        with pa.OSFile(str(examples)) as source:
            reader = pa.ipc.open_stream(source)
            first = 0
            for batch in reader:
                out = output_of[first: first + batch.num_rows]
                first += batch.num_rows
                rows = np.flatnonzero(out >= 0)
                if not len(rows):
                    continue
                buckets = out[rows] // bucket_rows
                grouped = np.argsort(buckets, kind="stable")
                rows, buckets = rows[grouped], buckets[grouped]
                starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
                for begin, end in zip(starts, np.r_[starts[1:], len(rows)]):
                    part = batch.take(pa.array(rows[begin:end]))
                    part = part.append_column(POSITION, pa.array(out[rows[begin:end]]))
                    bucket = int(buckets[begin])
                    if bucket not in sinks:
                        sink = pa.OSFile(str(scratch / f"{bucket}.arrow"), "wb")
                        sinks[bucket] = (sink, pa.ipc.new_stream(sink, part.schema))
                    sinks[bucket][1].write_batch(part)
            schema = reader.schema
    finally:
        for sink, writer in sinks.values():
            writer.close()
            sink.close()
    return schema


class _ShardWriter:
    """Tables appended to <folder>/data-00000.arrow, a new shard once one holds SHARD_BYTES."""

    def __init__(self, folder: Path, schema):
        self.folder, self.schema, self.shard = folder, schema, -1
        self._open()

    def _open(self) -> None:
        import pyarrow as pa

        self.shard += 1
        self.sink = pa.OSFile(str(self.folder / f"data-{self.shard:05d}.arrow"), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.written = 0

    def write(self, table) -> None:
        if self.written >= SHARD_BYTES:
            self.close()
            self._open()
        self.writer.write_table(table)
        self.written += table.nbytes

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


class _Lengths:
    """Length statistics of rows in characters, a table at a time."""

    def __init__(self):
        self.total, self.count, self.low, self.high = 0, 0, None, None

    def add(self, table) -> None:
        for batch in table.to_batches(max_chunksize=GATHER_ROWS):
            lengths = [_row_chars(_present(row)) for row in batch.to_pylist()]
            if lengths:
                self.total, self.count = self.total + sum(lengths), self.count + len(lengths)
                self.low = min(lengths) if self.low is None else min(self.low, min(lengths))
                self.high = max(lengths) if self.high is None else max(self.high, max(lengths))

    def stats(self) -> dict[str, float]:
        if not self.count:
            return {}
        return {"chars_mean": round(self.total / self.count, 1), "chars_min": self.low, "chars_max": self.high}


def write_data_stats(out_dir: Path, stats: dict[str, Any]) -> None:
    _write_json(Path(out_dir) / DATA_STATS, stats)


def write_dataset(out_dir: Path, splits: dict[str, list[dict[str, Any]]], stats: dict[str, Any]) -> None:
    """Small splits held as lists (tests, benchmarks) in the same layout prepare_data writes; an
    empty test split is left out."""
    import pyarrow as pa

    out_dir = Path(out_dir)
    for name in SPLIT_NAMES:
        rows = splits.get(name) or []
        if not rows and name == "test":
            continue
        table = pa.Table.from_pylist(rows)
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(folder / "data-00000.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    write_data_stats(out_dir, stats)


def read_split(dataset_dir: Path, name: str):
    """A prepared split as a datasets.Dataset, memory-mapped from its shards."""
    from datasets import concatenate_datasets

    parts = [read_shard(path) for path in split_shards(dataset_dir, name)]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def split_shards(dataset_dir: Path, name: str) -> list[Path]:
    """The shard files of a prepared split, in row order."""
    return _shards(Path(dataset_dir) / name)


def read_shard(path: Path):
    """One shard of a prepared split as a datasets.Dataset, memory-mapped."""
    from datasets import Dataset

    return Dataset.from_file(str(path))


def split_rows(dataset_dir: Path, name: str, columns: Optional[list[str]] = None) -> Iterator[dict[str, Any]]:
    """The records of a prepared split, a batch at a time from the memory-mapped shards (only the
    named columns, when given)."""
    import pyarrow as pa

    for path in _shards(Path(dataset_dir) / name):
        with pa.OSFile(str(path)) as source:  # one sequential pass: read, not mapped
            for batch in pa.ipc.open_stream(source):
                if columns is not None:
                    batch = batch.select([c for c in columns if c in batch.schema.names])
                yield from (_present(row) for row in batch.to_pylist())


def split_names(dataset_dir: Path) -> list[str]:
    """The splits a prepared dataset holds (test only when data.test_path was given)."""
    return [name for name in SPLIT_NAMES if _shards(Path(dataset_dir) / name)]


# ---- tokenized (tokenize) ------------------------------------------------------------------------


def new_tokenized_split(out_dir: Path, split: str) -> Path:
    """The empty folder a split's token columns are written into (an earlier attempt's files removed)."""
    folder = Path(out_dir) / split
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def tokenized_shard_name(folder: Path, number: int) -> Path:
    """The Arrow file datasets' map writes the tokens of prepared shard `number` to (with N workers
    it writes data-0000s_0000k_of_0000N.arrow): in name order, the split's rows in order."""
    return Path(folder) / f"data-{number:05d}.arrow"


def _tokenized_shards(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("data-*.arrow"))


def tokenized_batches(tokenized_dir: Path, split: str, column: str) -> Iterator[Any]:
    """One column of a tokenized split, a pyarrow array per record batch, read (not mapped) from its files."""
    import pyarrow as pa

    for path in _tokenized_shards(Path(tokenized_dir) / split):
        with pa.OSFile(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.column(column)


def write_tokenized(out_dir: Path, tokenizer, info: dict[str, Any], stats: dict[str, Any]) -> None:
    """The tokenizer, the task info and the token statistics (the splits: write_tokenized_split)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir / TOKENIZER)
    _write_json(out_dir / TASK_INFO, info)
    _write_json(out_dir / DATA_STATS, stats)


def read_token_stats(tokenized_dir: Path) -> dict[str, Any]:
    return _read_json(Path(tokenized_dir) / DATA_STATS)


def read_tokenized(tokenized_dir: Path, split: str):
    """A tokenized split as a datasets.Dataset, memory-mapped from its files (a folder written by
    save_to_disk, as small tests write one, loads as such)."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    folder = Path(tokenized_dir) / split
    if (folder / "state.json").exists():
        return load_from_disk(str(folder))
    parts = [Dataset.from_file(str(path)) for path in _tokenized_shards(folder)]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def heldout_split(tokenized_dir: Path) -> str:
    """What evaluation scores: the test split when data.test_path was given, else validation."""
    return "test" if (Path(tokenized_dir) / "test").exists() else "validation"


def tokenizer_dir(tokenized_dir: Path) -> Path:
    return Path(tokenized_dir) / TOKENIZER


def read_task_info(tokenized_dir: Path) -> dict[str, Any]:
    """What the task learned from the training split (classification: the label set)."""
    return _read_json(Path(tokenized_dir) / TASK_INFO)


# ---- prepared_model (prepare_model) ------------------------------------------------------------


def write_plan(prepared_dir: Path, plan: dict[str, Any]) -> None:
    _write_json(Path(prepared_dir) / PLAN, plan)


def read_plan(prepared_dir: Path) -> dict[str, Any]:
    return _read_json(Path(prepared_dir) / PLAN)


def initial_adapter_dir(prepared_dir: Path) -> Path:
    return Path(prepared_dir) / INITIAL_ADAPTER


# ---- tuned_model (train) -------------------------------------------------------------------------


def write_training_summary(tuned_dir: Path, summary: dict[str, Any], history: Iterable[dict[str, Any]]) -> None:
    _write_json(Path(tuned_dir) / TRAINING_SUMMARY, {**summary, "history": list(history)})


def read_training_history(tuned_dir: Path) -> list[dict[str, Any]]:
    """The Trainer's per-step log (loss, learning rate, ...), every attempt."""
    return _read_json(Path(tuned_dir) / TRAINING_SUMMARY).get("history", [])


def read_training_summary(tuned_dir: Path) -> dict[str, Any]:
    """The summary without the per-step history."""
    summary = _read_json(Path(tuned_dir) / TRAINING_SUMMARY)
    summary.pop("history", None)
    return summary


# ---- evaluation (evaluate) -----------------------------------------------------------------------


def write_evaluation(out_dir: Path, result: dict[str, Any]) -> None:
    _write_json(Path(out_dir) / EVALUATION, result)


def read_evaluation_metrics(eval_dir: Path) -> dict[str, float]:
    return _read_json(Path(eval_dir) / EVALUATION)["metrics"]


def read_confusion_matrix(eval_dir: Path) -> Optional[dict[str, Any]]:
    """{labels, base, tuned} (rows true, columns predicted) for a classification run, else None."""
    return _read_json(Path(eval_dir) / EVALUATION).get("confusion_matrix")


def write_report(eval_dir: Path, page: str) -> None:
    (Path(eval_dir) / REPORT).write_text(page, encoding="utf-8")


def report_path(eval_dir: Path) -> Path:
    return Path(eval_dir) / REPORT


def write_retrieval(eval_dir: Path, passages: list[str], vectors, settings: dict[str, Any]) -> None:
    """The index evaluate.rag scored with, for register to give the served model."""
    import numpy as np

    folder = Path(eval_dir) / RETRIEVAL
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "passages.json", passages)
    np.save(folder / "vectors.npy", vectors)
    _write_json(folder / "settings.json", settings)


def read_retrieval(eval_dir: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """(the index folder, its settings) when the run evaluated with retrieval, else None."""
    folder = Path(eval_dir) / RETRIEVAL
    return (folder, _read_json(folder / "settings.json")) if (folder / "settings.json").is_file() else None


# ---- lineage (preflight) -------------------------------------------------------------------------


def write_lineage(path: Path, lineage: dict[str, str]) -> None:
    """preflight's output artifact is a file path (KFP Artifact.path), not a folder."""
    _write_json(Path(path), lineage)


def read_lineage(path: Path) -> dict[str, str]:
    return _read_json(Path(path))
