"""Reading data sources: files, folders and s3:// URIs to lists of records (dicts), and their hash.

Formats: .json (an array of records, or an object holding one), .jsonl, .csv, .tsv, .txt (one record
per non-empty line, field `text`; TweetEval's X_text.txt + X_labels.txt pairs as text + label), or a
directory of such files. What a record means is the task kind's business (kubetune.tasks); this
module only reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from kubetune.config import DataConfig
from kubetune.errors import DataError
from kubetune.storage import download_uri

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
TEXT_FILE_FIELD = "text"
LABEL_FILE_FIELD = "label"


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
