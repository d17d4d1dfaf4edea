"""The artifacts the stages hand each other: the files in each one, with its only writer and readers.

A stage never names a file of another stage's artifact itself; it calls the functions here, so a
reader can see in one page what flows along each edge of the DAG:

    preflight      -> lineage         lineage.json: what the run is made of (data hash, base model
                                      fingerprint, version, technique), handed to register
    prepare_data   -> dataset         train/validation[/test].jsonl, stats.json
    tokenize       -> tokenized       <split>/ (datasets folders), tokenizer/, task_info.json, stats.json
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
from pathlib import Path
from typing import Any, Iterable, Optional

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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- dataset (prepare_data) ----------------------------------------------------------------------


def write_dataset(out_dir: Path, splits: dict[str, list[dict[str, Any]]], stats: dict[str, Any]) -> None:
    """JSONL per split (an empty split is left out) plus stats.json: readable, diffable and small."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES:
        rows = splits.get(name) or []
        if not rows and name == "test":
            continue
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    _write_json(out_dir / DATA_STATS, stats)


def read_split(dataset_dir: Path, name: str) -> list[dict[str, Any]]:
    return read_jsonl(Path(dataset_dir) / f"{name}.jsonl")


def split_names(dataset_dir: Path) -> list[str]:
    """The splits a prepared dataset holds (test only when data.test_path was given)."""
    return [name for name in SPLIT_NAMES if (Path(dataset_dir) / f"{name}.jsonl").exists()]


# ---- tokenized (tokenize) ------------------------------------------------------------------------


def write_tokenized(out_dir: Path, columns_by_split: dict[str, dict[str, list]], tokenizer,
                    info: dict[str, Any], stats: dict[str, Any]) -> None:
    from datasets import Dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, columns in columns_by_split.items():
        Dataset.from_dict(columns).save_to_disk(str(out_dir / split))
    tokenizer.save_pretrained(out_dir / TOKENIZER)
    _write_json(out_dir / TASK_INFO, info)
    _write_json(out_dir / DATA_STATS, stats)


def read_token_stats(tokenized_dir: Path) -> dict[str, Any]:
    return _read_json(Path(tokenized_dir) / DATA_STATS)


def read_tokenized(tokenized_dir: Path, split: str):
    from datasets import load_from_disk

    return load_from_disk(str(Path(tokenized_dir) / split))


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
