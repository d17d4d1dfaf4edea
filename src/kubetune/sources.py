"""Reading data sources: files, folders and s3:// URIs to lists of records (dicts), and their hash.

Formats: .json (an array of records, or an object holding one), .jsonl, .csv, .tsv, .txt (one record
per non-empty line, field `text`; TweetEval's X_text.txt + X_labels.txt pairs as text + label), each
UTF-8 and optionally gzip-compressed (.jsonl.gz, or any of them whose bytes are gzip), or a directory
of such files. Every record keeps where it came from (file:line), so that a bad value can be shown
where it is. What a record means is the task kind's business (kubetune.tasks); this module only reads.

Lines are split on line feeds only: the UCI sentiment files hold U+0085 inside sentences, and their
IMDb file has sentences that open with a quote character and never close it, which a CSV reader
turns into one "row" of up to 4,778 characters swallowing the lines after it (748 rows read of
1,000). A TSV line is therefore always one row; a CSV record spans lines only when its quoting is
well formed.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional

from kubetune.config import DataConfig
from kubetune.errors import DataError
from kubetune.storage import download_uri

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
TEXT_FILE_FIELD = "text"
LABEL_FILE_FIELD = "label"


@dataclass
class Records:
    """Records read from a source, and where each came from ("file:line" or "file record N")."""

    rows: list[dict[str, Any]]
    where: list[str]


class Loaded(NamedTuple):
    rows: list[dict[str, Any]]
    digest: str
    where: list[str]


def _suffix(path: Path) -> str:
    """The format suffix, ignoring a compression suffix: data.jsonl.gz is .jsonl."""
    return Path(_name(path.name)).suffix.lower()


def source_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in SUFFIXES)
        if not files:
            raise DataError("data.path", str(path), f"the directory holds no {'/'.join(SUFFIXES)} files")
        return files
    if not path.exists():
        raise DataError("data.path", str(path), "no such file or directory; check the path (relative paths "
                        "are read from the directory you run kubetune in)")
    if _suffix(path) not in SUFFIXES:
        raise DataError("data.path", str(path), f"unsupported file type; use one of {', '.join(SUFFIXES)} "
                        "(each may end in .gz)")
    return [path]


GZIP_MAGIC = b"\x1f\x8b"
#: A quoted CSV field is looked for over at most this many lines (a stray quote must not make the
#: reader scan the rest of a large file for every line).
MAX_QUOTED_LINES = 1000
#: Values that mean "no value" in a data file: what pandas and spreadsheets write for a missing cell,
#: and JSON's NaN. A record whose required field holds one of them is invalid (kubetune.data).
MISSING_MARKERS = frozenset({"", "nan", "null", "none", "n/a", "#n/a", "<na>"})


def is_missing(value: Any) -> bool:
    """True for a value that holds no data: absent, null, NaN or infinite, or a missing marker."""
    if value is None:
        return True
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return value.strip().lower() in MISSING_MARKERS
    return False


def text_of(value: Any) -> str:
    """A field as stripped text; a missing value (is_missing) is empty, never "nan" or "None"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 from JSON is the label "1"
    return "" if is_missing(value) else str(value).strip()


def _text(path: Path) -> str:
    """The file's text: UTF-8 (a byte-order mark is dropped), gzip-compressed or not whatever its name."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError("data.path", str(path), f"a damaged gzip file ({exc}); recompress it or store it "
                            "uncompressed") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError("data.path", f"{path}:{line}", f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); convert the file, e.g. iconv -f latin1 -t utf-8") from None


def _lines(path: Path) -> list[str]:
    """Physical lines: split on \\n only (\\r\\n too). str.splitlines would also split on U+0085 and
    U+2028, which occur inside sentences (the UCI IMDb file holds U+0085)."""
    return [line.removesuffix("\r") for line in _text(path).split("\n")]


def _name(file_name: str) -> str:
    return re.sub(r"\.gz$", "", file_name, flags=re.IGNORECASE)


def _read_json(path: Path) -> Records:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise DataError("data.path", f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg}); fix the file or "
                        "use .jsonl") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("data.path", str(path), "a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError("data.path", str(path), "expected a JSON array of records")
    return Records(data, [f"{path} record {i + 1}" for i in range(len(data))])


def _read_jsonl(path: Path) -> Records:
    rows, where = [], []
    for number, line in enumerate(_lines(path), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError("data.path", f"{path}:{number}", f"not valid JSON ({exc.msg})") from None
            where.append(f"{path}:{number}")
    return Records(rows, where)


def _unquote_tsv(field: str) -> str:
    """A TSV field wholly in double quotes with inner quotes doubled (as pandas and spreadsheets
    write them) loses the quoting; any other quote character is text."""
    inner = field[1:-1]
    if len(field) >= 2 and field[0] == field[-1] == '"' and '"' not in inner.replace('""', ""):
        return inner.replace('""', '"')
    return field


def _record(path: Path, number: int, header: list[str], fields: list[str], separator: str, fix: str) -> dict[str, str]:
    """One delimited line as a record under the header, or a DataError at path:number."""
    if len(fields) != len(header):
        raise DataError("data.path", f"{path}:{number}", f"{len(fields)} {separator}-separated fields where the header "
                        f"has {len(header)}; {fix}")
    return dict(zip(header, fields))


def _read_tsv(path: Path) -> Records:
    """Every physical line is one row (text/tab-separated-values has no quoting across lines): a quote
    character that opens a sentence must not swallow the lines after it, as a CSV reader would."""
    lines = _lines(path)
    header = [_unquote_tsv(name) for name in lines[0].split("\t")]
    rows, where = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [_unquote_tsv(value) for value in line.split("\t")]
        rows.append(_record(path, number, header, fields, "tab", "a text that holds a tab must be cleaned first"))
        where.append(f"{path}:{number}")
    return Records(rows, where)


def _parse_csv(text: str) -> Optional[list[str]]:
    """The fields of one CSV record, or None where the text is not exactly one well-quoted record."""
    try:
        records = list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error:
        return None
    return records[0] if len(records) == 1 else None


def _read_csv(path: Path) -> Records:
    """RFC 4180: a quoted field may hold commas, doubled quotes and line breaks. A line whose quoting
    is broken (a quote that opens a sentence and never closes before a comma) is read as it stands,
    so it cannot merge the lines after it into one row."""
    lines = _lines(path)
    header = _parse_csv(lines[0]) or lines[0].split(",")
    rows, where = [], []
    number = 1
    while number < len(lines):
        start, line = number + 1, lines[number]
        number += 1
        if not line.strip():
            continue
        fields = _parse_csv(line)
        if fields is None and line.count('"') % 2 == 1:  # a quoted field may go on over the next lines
            quotes = line.count('"')
            for end in range(number, min(len(lines), number + MAX_QUOTED_LINES)):
                quotes += lines[end].count('"')
                if quotes % 2 == 0:  # the first place the quoting could close
                    fields = _parse_csv("\n".join(lines[start - 1: end + 1]))
                    if fields is not None and len(fields) == len(header):
                        number = end + 1
                    break
        if fields is None or len(fields) != len(header):
            fields = line.split(",")  # read as it stands: its quote characters are text
        rows.append(_record(path, start, header, fields, "comma", "put a text that holds commas in double quotes"))
        where.append(f"{path}:{start}")
    return Records(rows, where)


def _labels_beside(path: Path) -> Optional[Path]:
    """TweetEval's layout: X_text.txt holds one text per line, X_labels.txt the label of each."""
    if path.name.endswith("_text.txt"):
        labels = path.with_name(path.name[: -len("_text.txt")] + "_labels.txt")
        return labels if labels.exists() else None
    return None


def _without_last_empty(lines: list[str]) -> list[str]:
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_text_with_labels(path: Path, labels_path: Path) -> Records:
    texts = _without_last_empty(_lines(path))
    labels = _without_last_empty(_lines(labels_path))
    if len(texts) != len(labels):
        raise DataError("data.path", str(path), f"{len(texts)} texts but {len(labels)} labels in {labels_path.name}")
    return Records([{TEXT_FILE_FIELD: text, LABEL_FILE_FIELD: label.strip()} for text, label in zip(texts, labels)],
                   [f"{path}:{n}" for n in range(1, len(texts) + 1)])


def _read_text(path: Path) -> Records:
    numbered = [(n, line) for n, line in enumerate(_lines(path), start=1) if line.strip()]
    return Records([{TEXT_FILE_FIELD: line} for _, line in numbered], [f"{path}:{n}" for n, _ in numbered])


def label_names_beside(path_or_uri: str) -> dict[str, str]:
    """Label names from a mapping.txt beside a local data file (TweetEval: `0<TAB>negative`)."""
    path = Path(path_or_uri).expanduser()
    mapping = (path if path.is_dir() else path.parent) / "mapping.txt"
    if path_or_uri.startswith("s3://") or not mapping.exists():
        return {}
    pairs = (line.split("\t", 1) for line in mapping.read_text(encoding="utf-8").splitlines() if "\t" in line)
    return {key.strip(): name.strip() for key, name in pairs}


def read_records(path: Path) -> Records:
    """All records of one local file, as dicts, each with where it came from (file:line)."""
    suffix = _suffix(path)
    if suffix == ".json":
        records = _read_json(path)
    elif suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".tsv":
        records = _read_tsv(path)
    elif _labels_beside(path) is not None:
        records = _read_text_with_labels(path, _labels_beside(path))
    else:
        records = _read_text(path)
    bad = next((i for i, row in enumerate(records.rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError("data.path", records.where[bad], "a record that is not an object with fields")
    return records


@contextlib.contextmanager
def fetched(path_or_uri: str, endpoint_url: Optional[str] = None, field: str = "data.path") -> Iterator[Path]:
    """A local path for the source while the block runs; an s3:// source is downloaded to a
    temporary folder that is removed afterwards."""
    if not path_or_uri.startswith("s3://"):
        yield Path(path_or_uri).expanduser()
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-data-") as dest:
        yield download_uri(path_or_uri, Path(dest) / Path(path_or_uri.rstrip("/")).name, endpoint_url=endpoint_url,
                           field=field)


def content_hash(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_records(cfg: DataConfig, endpoint_url: Optional[str] = None, field: str = "data.path",
                 path: Optional[str] = None) -> Loaded:
    """Every record of the source (data.path, or another path of the data section), its hash and
    where each record came from."""
    source = path or cfg.path
    rows: list[dict[str, Any]] = []
    where: list[str] = []
    try:
        with fetched(source, endpoint_url, field) as local:
            files = source_files(local)
            for file in files:
                records = read_records(file)
                rows.extend(records.rows)
                where.extend(records.where)
            digest = content_hash(files)
    except DataError as exc:
        raise DataError(field, exc.value, exc.fix) from None
    if not rows:
        raise DataError(field, source, "the source holds no records")
    return Loaded(rows, digest, where)


def general_text_lines(cfg: DataConfig, endpoint_url: Optional[str], key: str, path: str) -> list[str]:
    """The lines of a general-text file (replay, retention) long enough to be prose: 8 words or more,
    not a heading."""
    rows = load_records(cfg, endpoint_url, key, path).rows
    lines = [text_of(row.get(TEXT_FILE_FIELD)) for row in rows]
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
    if value is not None and all(not text_of(row.get(value)) for row in rows):
        raise DataError(name, value, "every record has an empty value in this field")
