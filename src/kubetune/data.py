"""Read a data source, normalise it to one schema per task kind, split it and describe it.

Sources: .json (array of records, or an object holding one), .jsonl, .csv, .tsv, .txt (one record
per non-empty line, field `text`), or a directory of such files; local paths or s3:// URIs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from kubetune.config import DataConfig
from kubetune.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
TEXT_FILE_FIELD = "text"
LABEL_FILE_FIELD = "label"
INFO_FILE = "task_info.json"
SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class Splits:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    stats: dict[str, Any]
    info: dict[str, Any]


def source_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError("data.path", str(path), f"the directory holds no {'/'.join(SUFFIXES)} files")
        return files
    if not path.exists():
        raise DataError("data.path", str(path), "no such file or directory; check the path (relative paths "
                        "are read from the directory you run kubetune in)")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError("data.path", str(path), f"unsupported file type; use one of {', '.join(SUFFIXES)}")
    return [path]


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError("data.path", str(path), f"not valid JSON ({exc}); fix the file or use .jsonl") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("data.path", str(path), "a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError("data.path", str(path), "expected a JSON array of records")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError("data.path", f"{path}:{number}", f"not valid JSON ({exc})") from None
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def _labels_beside(path: Path) -> Optional[Path]:
    """TweetEval's layout: X_text.txt holds one text per line, X_labels.txt the label of each."""
    if path.name.endswith("_text.txt"):
        labels = path.with_name(path.name[: -len("_text.txt")] + "_labels.txt")
        return labels if labels.exists() else None
    return None


def _read_text_with_labels(path: Path, labels_path: Path) -> list[dict[str, Any]]:
    texts = path.read_text(encoding="utf-8").splitlines()
    labels = labels_path.read_text(encoding="utf-8").splitlines()
    if len(texts) != len(labels):
        raise DataError("data.path", str(path), f"{len(texts)} texts but {len(labels)} labels in {labels_path.name}")
    return [{TEXT_FILE_FIELD: text, LABEL_FILE_FIELD: label.strip()} for text, label in zip(texts, labels)]


def label_names_beside(path_or_uri: str) -> dict[str, str]:
    """Label names from a mapping.txt beside a local data file (TweetEval: `0<TAB>negative`)."""
    path = Path(path_or_uri).expanduser()
    mapping = (path if path.is_dir() else path.parent) / "mapping.txt"
    if path_or_uri.startswith("s3://") or not mapping.exists():
        return {}
    pairs = (line.split("\t", 1) for line in mapping.read_text(encoding="utf-8").splitlines() if "\t" in line)
    return {key.strip(): name.strip() for key, name in pairs}


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of one local file, as dicts."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_delimited(path, "," if suffix == ".csv" else "\t")
    elif _labels_beside(path) is not None:
        rows = _read_text_with_labels(path, _labels_beside(path))
    else:
        rows = [{TEXT_FILE_FIELD: line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError("data.path", str(path), f"record {bad} is not an object with fields")
    return rows


def fetch(path_or_uri: str, endpoint_url: Optional[str] = None) -> Path:
    """A local path for the source; s3:// sources are downloaded to a temporary folder first."""
    if path_or_uri.startswith("s3://"):
        from kubetune.storage import download_uri

        dest = Path(tempfile.mkdtemp(prefix="kubetune-data-"))
        return download_uri(path_or_uri, dest / Path(path_or_uri.rstrip("/")).name, endpoint_url=endpoint_url)
    return Path(path_or_uri).expanduser()


def content_hash(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_records(cfg: DataConfig, endpoint_url: Optional[str] = None, field: str = "data.path",
                 path: Optional[str] = None) -> tuple[list[dict[str, Any]], str]:
    """Every record of the source (data.path, or another path of the data section) and its hash."""
    source = path or cfg.path
    try:
        files = source_files(fetch(source, endpoint_url))
    except DataError as exc:
        raise DataError(field, exc.value, exc.fix) from None
    rows: list[dict[str, Any]] = []
    for file in files:
        rows.extend(read_records(file))
    if not rows:
        raise DataError(field, source, "the source holds no records")
    return rows, content_hash(files)


def general_text_lines(cfg: DataConfig, endpoint_url: Optional[str], key: str, path: str) -> list[str]:
    """The lines of a general-text file (replay, retention) long enough to be prose: 8 words or more,
    not a heading."""
    rows, _ = load_records(cfg, endpoint_url, key, path)
    lines = [str(row.get(TEXT_FILE_FIELD) or "").strip() for row in rows]
    usable = [line for line in lines if len(line.split()) >= 8 and not line.startswith("=")]
    if not usable:
        raise DataError(key, path, "holds no lines of 8 words or more (general text is read a line at a time)")
    return usable


def replay_texts(cfg: DataConfig, count: int, seed: int, endpoint_url: Optional[str] = None) -> list[str]:
    """`count` lines of general text for replay, drawn with the seed."""
    usable = general_text_lines(cfg, endpoint_url, "data.replay_path", cfg.replay_path)
    rng = random.Random(seed)
    return [rng.choice(usable) for _ in range(count)] if count > len(usable) else rng.sample(usable, count)


def require_fields(rows: list[dict[str, Any]], cfg: DataConfig, named: list[tuple[str, Optional[str]]]) -> None:
    """Every (config key, field) in named must be a field of the records, and the first must not
    be empty everywhere."""
    fields = sorted({key for row in rows[:100] for key in row})
    for name, value in named:
        if value is not None and value not in fields:
            raise DataError(name, value, f"not a field of the data; fields found: {', '.join(fields)}")
    name, value = named[0]
    if value is not None and all(not str(row.get(value) or "").strip() for row in rows):
        raise DataError(name, value, "every record has an empty value in this field")


def split(rows: list[dict[str, Any]], cfg: DataConfig, seed: int) -> tuple[list, list]:
    """Shuffle with the run's seed, cap at max_rows, hold out validation_fraction (at least one row)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    n_val = max(1, round(len(rows) * cfg.validation_fraction))
    if len(rows) - n_val < 1:
        raise DataError("data.path", cfg.path, f"only {len(rows)} usable records; need at least 2 (more for "
                        "a useful fine-tune)")
    return rows[n_val:], rows[:n_val]


def length_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    lengths = [len(" ".join(str(v) for v in row.values())) for row in rows]
    return {"chars_mean": round(statistics.fmean(lengths), 1), "chars_min": min(lengths),
            "chars_max": max(lengths)}


def prepare(cfg: DataConfig, task: str, seed: int, endpoint_url: Optional[str] = None) -> Splits:
    from kubetune.tasks import get_task

    kind = get_task(task)
    rows, digest = load_records(cfg, endpoint_url)
    kind.check_fields(rows, cfg)
    normalised = kind.normalise(rows, cfg)
    train, validation = split(normalised, cfg, seed)
    test: list[dict[str, Any]] = []
    if cfg.test_path:
        test_rows, test_digest = load_records(cfg, endpoint_url, "data.test_path", cfg.test_path)
        kind.check_fields(test_rows, cfg)
        test = kind.normalise(test_rows, cfg)
        digest = hashlib.sha256((digest + test_digest).encode()).hexdigest()
    info = kind.info(train, cfg)  # from the task's own data, before any general text is mixed in
    replayed = 0
    if cfg.replay_fraction > 0:
        replayed = round(len(train) * cfg.replay_fraction / (1 - cfg.replay_fraction))
        train = train + [kind.replay_record(text) for text in replay_texts(cfg, replayed, seed, endpoint_url)]
        random.Random(seed + 1).shuffle(train)
    stats = {"rows_source": len(rows), "rows_usable": len(normalised), "rows_train": len(train),
             "rows_validation": len(validation), "rows_test": len(test), "rows_replay": replayed,
             "content_sha256": digest, **{f"train_{k}": v for k, v in length_stats(train).items()}}
    log.info("data: %d train (%d replayed) / %d validation / %d test rows (sha256 %s)", len(train), replayed,
             len(validation), len(test), digest[:12])
    return Splits(train=train, validation=validation, test=test, stats=stats, info=info)


def save_splits(splits: Splits, out_dir: Path) -> None:
    """JSONL per split plus stats.json: readable, diffable and small for CPU-sized data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES:
        if name == "test" and not splits.test:
            continue
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in getattr(splits, name):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "stats.json").write_text(json.dumps(splits.stats, indent=2))
    (out_dir / INFO_FILE).write_text(json.dumps(splits.info, indent=2))


def load_info(artifact_dir: Path) -> dict[str, Any]:
    """The task info (e.g. the label set) that prepare_data learned from the training split."""
    return json.loads((Path(artifact_dir) / INFO_FILE).read_text())


def load_split(data_dir: Path, name: str) -> list[dict[str, Any]]:
    return _read_jsonl(Path(data_dir) / f"{name}.jsonl")


def split_names(data_dir: Path) -> list[str]:
    """The splits a prepared dataset holds (test only when data.test_path was given)."""
    return [name for name in SPLIT_NAMES if (Path(data_dir) / f"{name}.jsonl").exists()]
