"""Reading data sources: files, folders and s3:// URIs (kubetune.shards) as streams of records (dicts),
staged once into an Arrow file on local disk, with their content hash.

Formats: .json (an array of records, or an object holding one), .jsonl, .csv, .tsv, .txt (one record
per non-empty line, field `text`; TweetEval's X_text.txt + X_labels.txt pairs as text + label) and
.parquet, each UTF-8 and optionally gzip-compressed (.jsonl.gz, or any of them whose bytes are gzip),
or a folder or S3 prefix of such files. Every record keeps where it came from (file:line, file
record N, file row N), so that a bad value can be shown where it is. What a record means is the
task kind's business (kubetune.tasks); this module only reads.

Why staging: the data contract reads a source more than once (field checks, then the examples), and a
record may hold anything JSON does (a label 1 in one row and "1" in the next, lists of messages), which
no one Arrow schema types. So each record is staged as its JSON text beside where it came from, in an
Arrow file on local disk that later passes read a batch at a time: memory stays a batch whatever the
row count, and an S3 source is fetched once. Line formats stream; a .json file is parsed
whole (use .jsonl or .parquet shards for data sets that do not fit in memory).

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
import itertools
import json
import math
import random
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional

from kubetune.config import DataConfig
from kubetune.errors import DataError
from kubetune.shards import Shard, ShardChanged, list_shards, sibling

TEXT_FILE_FIELD = "text"
LABEL_FILE_FIELD = "label"
#: Records staged or decoded per batch: large enough to amortise Arrow calls, small enough to be nothing.
BATCH_ROWS = 10_000
#: How many records the field checks look at to learn which fields the data has.
HEAD_ROWS = 100

Located = tuple[dict[str, Any], str]  # a record and where it came from

GZIP_MAGIC = b"\x1f\x8b"
#: A quoted CSV field is looked for over at most this many lines (a stray quote must not make the
#: reader scan the rest of a large file for every line).
MAX_QUOTED_LINES = 1000
#: Values that mean "no value" in a data file: what pandas and spreadsheets write for a missing cell,
#: and JSON's NaN. A record whose required field holds one of them is invalid (kubetune.data).
MISSING_MARKERS = frozenset({"", "nan", "null", "none", "n/a", "#n/a", "<na>"})


def is_missing(value: Any, markers: frozenset[str] = MISSING_MARKERS) -> bool:
    """True for a value that holds no data: absent, null, NaN or infinite, or a missing marker."""
    if value is None:
        return True
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return value.strip().lower() in markers
    return False


def text_of(value: Any, markers: frozenset[str] = MISSING_MARKERS) -> str:
    """A field as stripped text; a missing value (is_missing) is empty, never "nan" or "None". A number
    or boolean is the text JSON writes for it (42, 0.5, true), the text a CSV cell of it holds."""
    if is_missing(value, markers):
        return ""
    if isinstance(value, (bool, float)):
        return json.dumps(value)
    return str(value).strip()



def _damaged(shard: Shard, exc: Exception) -> DataError:
    return DataError("data.path", shard.shown, f"a damaged gzip file ({exc}); recompress it or store it "
                     "uncompressed")


@contextlib.contextmanager
def _decoded(shard: Shard, digest) -> Iterator[BinaryIO]:
    """The shard's bytes, gunzipped when they are gzip whatever the file's name."""
    with shard.open(digest) as raw:  # a damaged gzip stream fails where it is read: _lines, _read_json
        yield gzip.GzipFile(fileobj=raw, mode="rb") if raw.peek(2)[:2] == GZIP_MAGIC else raw


def _not_utf8(shown: str, line: int, offset: int, byte: int) -> DataError:
    return DataError("data.path", f"{shown}:{line}", f"not UTF-8 (byte 0x{byte:02x} at offset {offset}); convert the "
                     "file, e.g. iconv -f latin1 -t utf-8")


def _lines(shard: Shard, stream: BinaryIO) -> Iterator[tuple[int, str]]:
    """(number, text) of every physical line: split on \\n only (\\r\\n too), decoded as UTF-8 (a
    byte-order mark dropped). str.splitlines would also split on U+0085 and U+2028, which occur
    inside sentences (the UCI IMDb file holds U+0085)."""
    offset = 0
    try:
        for number, raw in enumerate(stream, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(shard.shown, number, offset + exc.start, raw[exc.start]) from None
            offset += len(raw)
            yield number, text.removesuffix("\n").removesuffix("\r")
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged(shard, exc) from None


def _read_json(shard: Shard, stream: BinaryIO) -> Iterator[Located]:
    try:
        raw = stream.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged(shard, exc) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(shard.shown, raw[: exc.start].count(b"\n") + 1, exc.start, raw[exc.start]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError("data.path", f"{shard.shown}:{exc.lineno}", f"not valid JSON ({exc.msg}); fix the file or "
                        "use .jsonl") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("data.path", shard.shown, "a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError("data.path", shard.shown, "expected a JSON array of records")
    for i, row in enumerate(data):
        yield row, f"{shard.shown} record {i + 1}"


def _read_jsonl(shard: Shard, stream: BinaryIO) -> Iterator[Located]:
    for number, line in _lines(shard, stream):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError("data.path", f"{shard.shown}:{number}", f"not valid JSON ({exc.msg})") from None
            yield row, f"{shard.shown}:{number}"


def _unquote_tsv(field: str) -> str:
    """A TSV field wholly in double quotes with inner quotes doubled (as pandas and spreadsheets
    write them) loses the quoting; any other quote character is text."""
    inner = field[1:-1]
    if len(field) >= 2 and field[0] == field[-1] == '"' and '"' not in inner.replace('""', ""):
        return inner.replace('""', '"')
    return field


def _record(where: str, header: list[str], fields: list[str], separator: str, fix: str) -> dict[str, str]:
    """One delimited line as a record under the header, or a DataError at where (file:line)."""
    if len(fields) != len(header):
        raise DataError("data.path", where, f"{len(fields)} {separator}-separated fields where the header "
                        f"has {len(header)}; {fix}")
    return dict(zip(header, fields))


def _read_tsv(shard: Shard, stream: BinaryIO) -> Iterator[Located]:
    """Every physical line is one row (text/tab-separated-values has no quoting across lines): a quote
    character that opens a sentence must not swallow the lines after it, as a CSV reader would."""
    lines = _lines(shard, stream)
    first = next(lines, None)
    if first is None:
        return
    header = [_unquote_tsv(name) for name in first[1].split("\t")]
    for number, line in lines:
        if line.strip():
            fields = [_unquote_tsv(value) for value in line.split("\t")]
            where = f"{shard.shown}:{number}"
            yield _record(where, header, fields, "tab", "a text that holds a tab must be cleaned first"), where


def _parse_csv(text: str) -> Optional[list[str]]:
    """The fields of one CSV record, or None where the text is not exactly one well-quoted record."""
    try:
        records = list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error:
        return None
    return records[0] if len(records) == 1 else None


def _read_csv(shard: Shard, stream: BinaryIO) -> Iterator[Located]:
    """RFC 4180: a quoted field may hold commas, doubled quotes and line breaks. A line whose quoting
    is broken (a quote that opens a sentence and never closes before a comma) is read as it stands,
    so it cannot merge the lines after it into one row. The lines a quoted field may span are looked
    ahead at, at most MAX_QUOTED_LINES of them."""
    lines = _lines(shard, stream)
    first = next(lines, None)
    if first is None:
        return
    header = _parse_csv(first[1]) or first[1].split(",")
    ahead: list[tuple[int, str]] = []  # lines read while looking for the end of a quoted field

    def next_line() -> Optional[tuple[int, str]]:
        return ahead.pop(0) if ahead else next(lines, None)

    while (current := next_line()) is not None:
        start, line = current
        if not line.strip():
            continue
        fields = _parse_csv(line)
        if fields is None and line.count('"') % 2 == 1:  # a quoted field may go on over the next lines
            quotes, following = line.count('"'), []
            while len(following) < MAX_QUOTED_LINES - 1:
                more = ahead[len(following)] if len(following) < len(ahead) else next(lines, None)
                if more is None:
                    break
                if len(following) >= len(ahead):
                    ahead.append(more)
                following.append(more)
                quotes += more[1].count('"')
                if quotes % 2 == 0:  # the first place the quoting could close
                    fields = _parse_csv("\n".join([line] + [text for _, text in following]))
                    if fields is not None and len(fields) == len(header):
                        del ahead[: len(following)]
                    break
        if fields is None or len(fields) != len(header):
            fields = line.split(",")  # read as it stands: its quote characters are text
        where = f"{shard.shown}:{start}"
        yield _record(where, header, fields, "comma", "put a text that holds commas in double quotes"), where


def _read_text(shard: Shard, stream: BinaryIO) -> Iterator[Located]:
    for number, line in _lines(shard, stream):
        if line.strip():
            yield {TEXT_FILE_FIELD: line}, f"{shard.shown}:{number}"


def _read_text_with_labels(shard: Shard, stream: BinaryIO, labels: Shard) -> Iterator[Located]:
    """TweetEval's layout: X_text.txt holds one text per line, X_labels.txt the label of each (a last
    empty line, the file's final line feed, is no row)."""
    with _decoded(labels, None) as label_stream:
        pairs = itertools.zip_longest(_lines(shard, stream), _lines(labels, label_stream))
        for text, label in pairs:
            if text is None or label is None:
                rest = sum(1 for _ in pairs)
                texts, label_count = _counted(text, label, rest)
                raise DataError("data.path", shard.shown, f"{texts} texts but {label_count} labels in {labels.name}")
            yield {TEXT_FILE_FIELD: text[1], LABEL_FILE_FIELD: label[1].strip()}, f"{shard.shown}:{text[0]}"


def _counted(text, label, rest: int) -> tuple[int, int]:
    """(texts, labels) when one file ran out: the other's last line number plus what was left."""
    if text is None:
        return label[0] - 1, label[0] + rest
    return text[0] + rest, text[0] - 1


def _read_parquet(shard: Shard, path: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's errors name no common base
        raise DataError("data.path", shard.shown, f"not a readable Parquet file ({exc})") from None
    number = 0
    for batch in reader.iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield row, f"{shard.shown} row {number}"


def read_shard(shard: Shard, shards: list[Shard], digest=None) -> Iterator[Located]:
    """Every record of one file, each with where it came from; DataError for one that is not an object."""
    if shard.suffix == ".parquet":
        with shard.seekable(digest) as path:
            yield from _objects(_read_parquet(shard, path))
        return
    labels = sibling(shards, shard, shard.name[: -len("_text.txt")] + "_labels.txt") \
        if shard.name.endswith("_text.txt") else None
    readers: dict[str, Callable[[Shard, BinaryIO], Iterator[Located]]] = {
        ".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_tsv}
    with _decoded(shard, digest) as stream:
        if shard.suffix in readers:
            yield from _objects(readers[shard.suffix](shard, stream))
        elif labels is not None:
            yield from _read_text_with_labels(shard, stream, labels)
        else:
            yield from _read_text(shard, stream)


def _objects(located: Iterator[Located]) -> Iterator[Located]:
    for row, where in located:
        if not isinstance(row, dict):
            raise DataError("data.path", where, "a record that is not an object with fields")
        yield row, where


def label_names_beside(path_or_uri: str) -> dict[str, str]:
    """Label names from a mapping.txt beside a local data file (TweetEval: `0<TAB>negative`)."""
    path = Path(path_or_uri).expanduser()
    mapping = (path if path.is_dir() else path.parent) / "mapping.txt"
    if path_or_uri.startswith("s3://") or not mapping.is_file():
        return {}
    pairs = (line.split("\t", 1) for line in mapping.read_text(encoding="utf-8").splitlines() if "\t" in line)
    return {key.strip(): name.strip() for key, name in pairs}


class Staged:
    """A source's records, staged as JSON text with where each came from, in an Arrow file that each
    pass reads a batch at a time. Iterating gives the records (re-iterable: every loop is a new
    pass); located() gives (record, where) pairs."""

    def __init__(self, path: Path, count: int, digest: str):
        self.path, self.count, self.digest = path, count, digest

    def __len__(self) -> int:
        return self.count

    def _batches(self) -> Iterator[tuple[list[str], list[str]]]:
        import pyarrow as pa

        # Read, not memory-mapped: a pass reads each page once, and mapped pages would stay in the
        # process's RSS until the pass ends.
        with pa.OSFile(str(self.path)) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.column(0).to_pylist(), batch.column(1).to_pylist()

    def located(self) -> Iterator[Located]:
        for records, where in self._batches():
            yield from zip(map(json.loads, records), where)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for records, _ in self._batches():
            yield from map(json.loads, records)


def _json_text(row: dict[str, Any]) -> str:
    # Parquet may hold dates and decimals, which JSON has no type for: they are read as text.
    return json.dumps(row, ensure_ascii=False, default=str)


@contextlib.contextmanager
def staged(cfg: DataConfig, endpoint_url: Optional[str] = None, field: str = "data.path",
           path: Optional[str] = None) -> Iterator[Staged]:
    """Every record of the source (data.path, or another path of the data section), staged on local
    disk for the block, with the source's content hash. DataError naming `field` when it holds none."""
    import pyarrow as pa

    source = path or cfg.path
    schema = pa.schema([("record", pa.large_string()), ("where", pa.string())])
    with tempfile.TemporaryDirectory(prefix="kubetune-staged-") as folder:
        file = Path(folder) / "records.arrow"
        digest, count = hashlib.sha256(), 0
        try:
            shards = list_shards(source, endpoint_url, field)
            with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for chunk in chunks(itertools.chain.from_iterable(read_shard(s, shards, digest) for s in shards)):
                    writer.write_batch(pa.record_batch([[_json_text(row) for row, _ in chunk],
                                                        [where for _, where in chunk]], schema=schema))
                    count += len(chunk)
        except ShardChanged as exc:
            raise ShardChanged(field, exc.value, exc.fix) from None
        except DataError as exc:
            raise DataError(field, exc.value, exc.fix) from None
        if not count:
            raise DataError(field, source, "the source holds no records")
        yield Staged(file, count, digest.hexdigest())


def chunks(items: Iterator[Any], size: int = BATCH_ROWS) -> Iterator[list[Any]]:
    """Lists of up to `size` consecutive items."""
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def load_records(cfg: DataConfig, endpoint_url: Optional[str] = None, field: str = "data.path",
                 path: Optional[str] = None) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Every record in memory, its hash and where each came from: for small files only (tests,
    corpora that are held whole anyway); the pipeline's data goes through `staged`."""
    with staged(cfg, endpoint_url, field, path) as records:
        pairs = list(records.located())
        return [row for row, _ in pairs], records.digest, [where for _, where in pairs]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one local file, in memory (tests and small files)."""
    shards = list_shards(str(path))
    return [row for row, _ in read_shard(shards[0], shards)]


def _usable_lines(records: Staged) -> Iterator[str]:
    """The lines of a general-text file (replay, retention) long enough to be prose: 8 words or more,
    not a heading."""
    for row in records:
        line = text_of(row.get(TEXT_FILE_FIELD))
        if len(line.split()) >= 8 and not line.startswith("="):
            yield line


def general_text_sample(cfg: DataConfig, endpoint_url: Optional[str], key: str, path: str, count: int,
                        rng: random.Random, repeat: bool = False) -> list[str]:
    """`count` usable lines of general text drawn with rng, as random.sample (or, with repeat and more
    lines wanted than there are, random.choice per line) would draw from the whole list; the staged
    file is read twice instead of held: once to count the lines, once to pick them."""
    with staged(cfg, endpoint_url, key, path) as records:
        usable = sum(1 for _ in _usable_lines(records))
        if not usable:
            raise DataError(key, path, "holds no lines of 8 words or more (general text is read a line at a time)")
        if repeat and count > usable:
            picks = [rng.randrange(usable) for _ in range(count)]  # what rng.choice draws
        else:
            picks = rng.sample(range(usable), min(count, usable))
        wanted = set(picks)
        chosen = {i: line for i, line in enumerate(_usable_lines(records)) if i in wanted}
    return [chosen[i] for i in picks]


def head(rows: Iterable[dict[str, Any]], count: int = HEAD_ROWS) -> list[dict[str, Any]]:
    """The first records of a list or of a re-iterable source."""
    return list(itertools.islice(rows, count))


def field_names(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The fields of the first HEAD_ROWS records, sorted."""
    return sorted({key for row in head(rows) for key in row})


def require_fields(rows: Iterable[dict[str, Any]], cfg: DataConfig, named: list[tuple[str, Optional[str]]]) -> None:
    """Every (config key, field) in named must be a field of the records, and the first must not
    be empty everywhere. rows: a list or a re-iterable source (read once more for the second check)."""
    fields = field_names(rows)
    for name, value in named:
        if value is not None and value not in fields:
            raise DataError(name, value, f"not a field of the data; fields found: {', '.join(fields)}")
    name, value = named[0]
    if value is not None and all(not text_of(row.get(value)) for row in rows):
        raise DataError(name, value, "every record has an empty value in this field")
