"""prepare_data: the source's records in the task kind's schema, split, with general text replayed in.

Reading is kubetune.sources; what a record means (its schema, which rows are usable) is the task
kind's. Here: the data contract (every example holds a value in each field its kind requires, else
the run stops naming the first bad line, or drops such examples under data.drop_invalid), shuffle
with the run's seed, cap at data.max_rows, hold out the validation share, enforce the minimum split
sizes, read the test file when there is one, mix replayed general text into the training split, and
describe the result (row counts, lengths, the content hash that lineage carries).

Why a contract: without it a NaN label became a class of its own ("nan" from JSON, "NaN" from CSV)
and a three-class model was registered as champion; a NaN text was learned as the word "nan".

Why Arrow: rows are never held in Python. The usable examples stream, a batch at a time, into one
Arrow file in the kind's schema; the split is a permutation of row numbers (8 bytes a row, the same
permutation random.shuffle gives a list, so the rows and the split are those of the list-based
version); the splits are gathered from the memory-mapped file into Arrow shards, the artifact
tokenize reads (kubetune.artifacts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from kubetune import artifacts
from kubetune.config import DataConfig
from kubetune.errors import DataError
from kubetune.sources import MISSING_MARKERS, Staged, chunks, general_text_sample, staged
from kubetune.tasks import get_task
from kubetune.tasks.base import TaskKind
from kubetune.tasks.schedule import shuffled_positions

if TYPE_CHECKING:  # numpy is imported where it is used: importing kubetune stays fast
    import numpy as np

log = logging.getLogger(__name__)

#: A missing marker (kubetune.sources.MISSING_MARKERS) written as the label of this many records or
#: more looks like a class ("none" of 3 intents), not like a few empty cells: the run asks which it is.
MARKER_CLASS_ROWS = 2


@dataclass
class Splits:
    """The prepared splits, as written to `folder` (kubetune.artifacts), and their statistics."""

    folder: Path
    stats: dict[str, Any]
    names: list[str] = field(default_factory=list)

    def rows(self, name: str) -> list[dict[str, Any]]:
        """A split's records in memory: for small data (tests, samples)."""
        return list(artifacts.split_rows(self.folder, name)) if name in self.names else []

    def count(self, name: str) -> int:
        return self.stats[f"rows_{name}"]


class Contract:
    """The data contract over a stream of examples: keep() passes on those that hold a value in every
    field the kind requires and counts the others; finish() then stops the run naming the first
    invalid one (or, under data.drop_invalid, logs how many were dropped) and returns that count."""

    def __init__(self, kind: TaskKind, cfg: DataConfig, source_key: str):
        self.kind, self.cfg, self.source_key = kind, cfg, source_key
        self.required = kind.required_fields(cfg)
        self.invalid: dict[str, tuple[int, str, Any]] = {}  # config key -> (count, where and value of the first)
        self.seen = self.kept = 0
        # Under the default missing markers, how often each (a few strings) is a label or answer as written.
        self.label_field = dict(self.required).get("data.label_field") if cfg.missing_labels is None else None
        self.markers: dict[str, tuple[int, str]] = {}

    def count_marker(self, value: Any) -> None:
        """Counts a label written as a missing marker (none, null, n/a ...; not an empty cell)."""
        if isinstance(value, str) and (folded := value.strip().lower()) and folded in MISSING_MARKERS:
            count, written = self.markers.get(folded, (0, value.strip()))
            self.markers[folded] = (count + 1, written)

    def keep(self, located: Iterable[tuple[dict[str, Any], str]]) -> Iterator[dict[str, Any]]:
        for row, at in located:
            self.seen += 1
            if self.label_field is not None:
                self.count_marker(row.get(self.label_field))
            bad = [(key, name) for key, name in self.required if self.kind.unusable(key, row.get(name), self.cfg)]
            for key, name in bad:
                count, first_at, first_value = self.invalid.get(key, (0, at, row.get(name, "<missing>")))
                self.invalid[key] = (count + 1, first_at, first_value)
            if not bad:
                self.kept += 1
                yield row

    def finish(self) -> int:
        self.refuse_marker_class()
        if not self.invalid:
            return 0
        names = dict(self.required)
        described = "; ".join(f"{key} ({names[key]}): {count}" for key, (count, _, _) in self.invalid.items())
        dropped = self.seen - self.kept
        if not self.cfg.drop_invalid:
            key, (_, first_at, first_value) = next(iter(self.invalid.items()))
            raise DataError(key, names[key], f"{dropped} of {self.seen} records in {self.source_key} have no usable "
                            f"value (missing, null, NaN, empty or not text) by field: {described}; the first is "
                            f"{first_at} ({first_value!r}). Fix the data, or set data.drop_invalid: true to drop them")
        log.warning("data: dropped %d of %d records of %s with no usable value (%s)", dropped, self.seen,
                    self.source_key, described)
        return dropped

    def refuse_marker_class(self) -> None:
        """DataError when a missing marker written as text (none, null, n/a, ...) labels MARKER_CLASS_ROWS
        records or more: it may be a class, which must never be dropped, or refused as missing, unasked."""
        count, written = max(((count, written) for count, written in self.markers.values()
                              if count >= MARKER_CLASS_ROWS), default=(0, ""))
        if count:
            raise DataError("data.label_field", self.label_field,
                            f"{count} of {self.seen} records in {self.source_key} have the value {written!r}, "
                            f"which is read as missing by default, so a class {written!r} would be lost. If it is "
                            f"a class, set data.missing_labels: [] (no string means missing; or list those that "
                            f"do); if those records have no label, set data.missing_labels: "
                            f"[{json.dumps(written.lower())}]")


def normalised_examples(kind: TaskKind, records: Staged, cfg: DataConfig, source_key: str,
                        writer: artifacts.RecordWriter) -> tuple[int, int, np.ndarray]:
    """The staged source's usable examples, in the kind's schema, appended to writer; returns
    (examples written, examples invalid, the digest of each example written: record_digests). The
    field checks and the contract run first."""
    import numpy as np

    kind.check_fields(records, cfg)
    contract = Contract(kind, cfg, source_key)
    written, digests = 0, [np.zeros(0, dtype=np.uint64)]
    for batch in chunks(contract.keep(kind.expand(records.located()))):
        rows = kind.normalise(batch, cfg, whole=False)
        writer.write(rows)
        digests.append(record_digests(rows))
        written += len(rows)
    invalid = contract.finish()
    if not written:
        kind.normalise([], cfg)  # a kind that refuses a source without one usable record says why
    return written, invalid, np.concatenate(digests)


def record_digests(rows: list[dict[str, Any]]) -> np.ndarray:
    """An 8-byte blake2b digest of each prepared record (its JSON, keys sorted), as uint64: equal
    records have equal digests; two of n different records share one with odds of about n²/2⁶⁵
    (3 in a million at 10 million records), 8 bytes a record where the records would be gigabytes."""
    import numpy as np

    return np.frombuffer(b"".join(hashlib.blake2b(json.dumps(row, sort_keys=True, ensure_ascii=False).encode(),
                                                  digest_size=8).digest() for row in rows), dtype=np.uint64)


def first_copies(digests: np.ndarray, leave_out: np.ndarray) -> np.ndarray:
    """data.drop_duplicates: the positions of the first copy of each distinct record, in order,
    without the records whose digest is in leave_out (the test set's)."""
    import numpy as np

    _, first = np.unique(digests, return_index=True)  # a stable sort: the first copy's position
    first.sort()
    return first[~np.isin(digests[first], leave_out)] if len(leave_out) else first


def count_shared(held_out: np.ndarray, trained: np.ndarray, name: str) -> int:
    """How many records of a held-out split (their digests) are identical to a training record (the
    training records' digests), with a warning when any is."""
    import numpy as np

    shared = int(np.isin(held_out, trained).sum()) if len(held_out) else 0
    if shared:
        log.warning("data: %d of %d %s rows are identical to a training row (the same prepared record), so the "
                    "%s scores overstate what the model learned; set data.drop_duplicates: true to keep each "
                    "record once", shared, len(held_out), name, name)
    return shared


def shuffled(count: int, seed: int) -> np.ndarray:
    """range(count) in the order random.Random(seed).shuffle leaves a list of `count` items, as
    8-byte ints (kubetune.tasks.schedule.shuffled_positions)."""
    return shuffled_positions(count, random.Random(seed))


def split_sizes(rows: int, cfg: DataConfig) -> tuple[int, int]:
    """(rows used after data.max_rows, rows held out for validation); each split at least its
    data.min_*_rows, else DataError."""
    if cfg.max_rows is not None:
        rows = min(rows, cfg.max_rows)
    needed = cfg.min_train_rows + cfg.min_validation_rows
    if rows < needed:
        raise DataError("data.path", cfg.path, f"{rows} usable records, fewer than the {needed} a run needs "
                        f"(data.min_train_rows {cfg.min_train_rows} + data.min_validation_rows "
                        f"{cfg.min_validation_rows}); add data, or lower the minimums for a smoke test")
    n_val = max(1, round(rows * cfg.validation_fraction))
    if n_val < cfg.min_validation_rows:
        raise DataError("data.validation_fraction", cfg.validation_fraction,
                        f"holds out {n_val} of {rows} usable records, fewer than data.min_validation_rows "
                        f"({cfg.min_validation_rows}); raise the fraction, add data, or lower the minimum")
    if rows - n_val < cfg.min_train_rows:
        raise DataError("data.path", cfg.path, f"{rows - n_val} usable training records (of {rows}, "
                        f"{n_val} held out), fewer than data.min_train_rows ({cfg.min_train_rows}); add data, "
                        "or lower data.min_train_rows for a smoke test")
    return rows, n_val


def replay_texts(cfg: DataConfig, count: int, seed: int, endpoint_url: Optional[str] = None) -> list[str]:
    """`count` lines of general text for replay, drawn with the seed (with repeats when the file has
    fewer usable lines)."""
    return general_text_sample(cfg, endpoint_url, "data.replay_path", cfg.replay_path, count, random.Random(seed),
                               repeat=True)


def prepare_data(cfg: DataConfig, task: str, seed: int, endpoint_url: Optional[str] = None,
                 out_dir: Optional[Path] = None) -> Splits:
    """Writes the prepared dataset artifact to out_dir (a new temporary folder when None) and
    returns its splits and statistics."""
    import numpy as np

    kind = get_task(task)
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="kubetune-prepared-"))
    with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as work:
        examples, test_file = Path(work) / "examples.arrow", Path(work) / "test.arrow"
        with staged(cfg, endpoint_url) as records, artifacts.RecordWriter(examples, kind.record_schema()) as writer:
            source_rows, digest = len(records), records.digest
            usable, invalid, digests = normalised_examples(kind, records, cfg, "data.path", writer)
            test_rows, test_digests = 0, digests[:0]
            if cfg.test_path:  # read before the split: data.drop_duplicates keeps the test records out of it
                with staged(cfg, endpoint_url, "data.test_path", cfg.test_path) as test, \
                        artifacts.RecordWriter(test_file, kind.record_schema()) as test_writer:
                    test_rows, test_invalid, test_digests = normalised_examples(kind, test, cfg, "data.test_path",
                                                                                test_writer)
                    digest = hashlib.sha256((digest + test.digest).encode()).hexdigest()
                invalid += test_invalid
            kept = first_copies(digests, test_digests) if cfg.drop_duplicates else None
            dropped = usable - len(kept) if kept is not None else 0
            if dropped:
                log.info("data: dropped %d of %d examples identical to an earlier one or to a test record "
                         "(data.drop_duplicates)", dropped, usable)
            used, n_val = split_sizes(usable - dropped, cfg)
            order = shuffled(usable - dropped, seed)  # numpy: the slices below are views, not copies
            if kept is not None:
                order = kept[order]
            validation, train = order[:n_val], order[n_val:used]
            examples_trained = train  # without the replayed text
            trained = digests[train]
            in_validation = count_shared(digests[validation], trained, "validation")
            in_test = count_shared(test_digests, trained, "test")
            del digests, trained, test_digests
            replayed = 0
            if cfg.replay_fraction > 0:  # appended after the examples; the train split is shuffled again with them
                replayed = round(len(train) * cfg.replay_fraction / (1 - cfg.replay_fraction))
                writer.write([kind.replay_record(text) for text in replay_texts(cfg, replayed, seed, endpoint_url)])
                train = np.concatenate([train, np.arange(usable, usable + replayed)])
                train = train[shuffled(len(train), seed + 1)]
        kind.check_splits(examples, examples_trained, validation, cfg)
        names = ["train", "validation"]
        lengths = artifacts.write_split(out_dir, "train", examples, train, measure=True)
        artifacts.write_split(out_dir, "validation", examples, validation)
        if test_rows:
            artifacts.write_split(out_dir, "test", test_file, np.arange(test_rows))
            names.append("test")
    stats = {"rows_source": source_rows, "rows_invalid": invalid, "rows_usable": usable, "rows_train": len(train),
             "rows_validation": len(validation), "rows_test": test_rows, "rows_replay": replayed,
             "rows_duplicates_dropped": dropped, "rows_duplicated_across_splits": in_validation,
             "rows_test_in_train": in_test, "content_sha256": digest, **{f"train_{k}": v for k, v in lengths.items()}}
    artifacts.write_data_stats(out_dir, stats)
    log.info("data: %d train (%d replayed) / %d validation / %d test rows (sha256 %s)", len(train), replayed,
             len(validation), test_rows, digest[:12])
    return Splits(folder=out_dir, stats=stats, names=names)
