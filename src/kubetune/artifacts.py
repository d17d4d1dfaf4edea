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
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from kubetune import disk_shuffle

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
# Each split is a folder of Arrow IPC stream shards (<split>/data-00000.arrow, ...) that
# datasets.Dataset.from_file memory-maps and pyarrow.ipc.open_stream reads. Rows are in the kind's record
# schema (Task.record_schema); a column a record lacks is null and is left out when a row is read.

#: A prepared split's shards hold about this many bytes each (tokenize maps one shard at a time).
SHARD_BYTES = 256 * 2**20


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


def present(row: dict[str, Any]) -> dict[str, Any]:
    """A row read from Arrow as the record it was written from: the null columns it did not have left out."""
    return {key: value for key, value in row.items() if value is not None}


def _batches(folder: Path) -> Iterator[Any]:
    """The record batches of a folder's shards in order, read (not memory-mapped: one sequential
    pass, whose pages must not stay in the process's RSS)."""
    import pyarrow as pa

    for path in _shards(folder):
        with pa.OSFile(str(path)) as source:
            yield from pa.ipc.open_stream(source)


def _row_chars(row: dict[str, Any]) -> int:
    return len(" ".join(str(v) for v in row.values()))


def write_split(out_dir: Path, name: str, examples: Path, order, measure: bool = False) -> dict[str, float]:
    """The split `name`: the rows of the Arrow file `examples` at the positions in `order` (a
    sequence of ints: output row k is examples row order[k]), in shards data-00000.arrow, ... of
    about SHARD_BYTES (kubetune.disk_shuffle). measure: returns the length statistics of the rows in
    characters (chars_mean, chars_min, chars_max)."""
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in _shards(folder):  # an earlier attempt's, which may have had more shards
        stale.unlink()
    lengths = disk_shuffle.Lengths(lambda row: _row_chars(present(row))) if measure else None
    disk_shuffle.gather(Path(examples), order, folder, SHARD_BYTES, lengths)
    return lengths.stats() if lengths is not None else {}


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


def split_rows(dataset_dir: Path, name: str) -> Iterator[dict[str, Any]]:
    """The records of a prepared split, read a batch at a time from its shards."""
    for batch in _batches(Path(dataset_dir) / name):
        yield from map(present, batch.to_pylist())


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


def tokenized_batches(tokenized_dir: Path, split: str, column: str) -> Iterator[Any]:
    """One column of a tokenized split, a pyarrow array per record batch."""
    for batch in _batches(Path(tokenized_dir) / split):
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
    parts = [Dataset.from_file(str(path)) for path in _shards(folder)]
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
