"""prepare_data: the source's records in the task kind's schema, split, with general text replayed in.

Reading is kubetune.sources; what a record means (its schema, which rows are usable) is the task
kind's. Here: the data contract (every example holds a value in each field its kind requires, else
the run stops naming the first bad line, or drops such examples under data.drop_invalid), shuffle
with the run's seed, cap at data.max_rows, hold out the validation share, enforce the minimum split
sizes, read the test file when there is one, mix replayed general text into the training split, and
describe the result (row counts, lengths, the content hash that lineage carries).

Why a contract: without it a NaN label became a class of its own ("nan" from JSON, "NaN" from CSV)
and a three-class model was registered as champion; a NaN text was learned as the word "nan".
"""

from __future__ import annotations

import hashlib
import logging
import random
import statistics
from dataclasses import dataclass
from typing import Any, Optional

from kubetune.config import DataConfig
from kubetune.errors import DataError
from kubetune.sources import Loaded, general_text_lines, load_records
from kubetune.tasks import get_task
from kubetune.tasks.base import TaskKind

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    stats: dict[str, Any]

    def by_name(self) -> dict[str, list[dict[str, Any]]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def valid_examples(kind: TaskKind, loaded: Loaded, cfg: DataConfig, source_key: str
                   ) -> tuple[list[dict[str, Any]], int]:
    """The source's examples that hold a value in every field the kind requires, and how many were
    dropped. Without data.drop_invalid, the first invalid example stops the run: one message with
    the field, the counts and where the first one is."""
    rows, where = kind.expand(loaded.rows, loaded.where)
    required = kind.required_fields(cfg)
    keep: list[dict[str, Any]] = []
    invalid: dict[str, list[tuple[str, Any]]] = {}  # config key -> (where, value) of each bad example
    for row, at in zip(rows, where):
        bad = [(key, name) for key, name in required if kind.unusable(key, row.get(name))]
        for key, name in bad:
            invalid.setdefault(key, []).append((at, row.get(name, "<missing>")))
        if not bad:
            keep.append(row)
    if not invalid:
        return keep, 0
    described = "; ".join(f"{key} ({dict(required)[key]}): {len(found)}" for key, found in invalid.items())
    dropped = len(rows) - len(keep)
    if not cfg.drop_invalid:
        key, found = next(iter(invalid.items()))
        first_at, first_value = found[0]
        raise DataError(key, dict(required)[key], f"{dropped} of {len(rows)} records in {source_key} have no usable "
                        f"value (missing, null, NaN, empty or not text) by field: {described}; the first is "
                        f"{first_at} ({first_value!r}). Fix the data, or set data.drop_invalid: true to drop them")
    log.warning("data: dropped %d of %d records of %s with no usable value (%s)", dropped, len(rows), source_key,
                described)
    return keep, dropped


def split(rows: list[dict[str, Any]], cfg: DataConfig, seed: int) -> tuple[list, list]:
    """Shuffle with the run's seed, cap at max_rows, hold out validation_fraction; each split at least
    its data.min_*_rows."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    needed = cfg.min_train_rows + cfg.min_validation_rows
    if len(rows) < needed:
        raise DataError("data.path", cfg.path, f"{len(rows)} usable records, fewer than the {needed} a run needs "
                        f"(data.min_train_rows {cfg.min_train_rows} + data.min_validation_rows "
                        f"{cfg.min_validation_rows}); add data, or lower the minimums for a smoke test")
    n_val = max(1, round(len(rows) * cfg.validation_fraction))
    if n_val < cfg.min_validation_rows:
        raise DataError("data.validation_fraction", cfg.validation_fraction,
                        f"holds out {n_val} of {len(rows)} usable records, fewer than data.min_validation_rows "
                        f"({cfg.min_validation_rows}); raise the fraction, add data, or lower the minimum")
    if len(rows) - n_val < cfg.min_train_rows:
        raise DataError("data.path", cfg.path, f"{len(rows) - n_val} usable training records (of {len(rows)}, "
                        f"{n_val} held out), fewer than data.min_train_rows ({cfg.min_train_rows}); add data, "
                        "or lower data.min_train_rows for a smoke test")
    return rows[n_val:], rows[:n_val]


def replay_texts(cfg: DataConfig, count: int, seed: int, endpoint_url: Optional[str] = None) -> list[str]:
    """`count` lines of general text for replay, drawn with the seed."""
    usable = general_text_lines(cfg, endpoint_url, "data.replay_path", cfg.replay_path)
    rng = random.Random(seed)
    return [rng.choice(usable) for _ in range(count)] if count > len(usable) else rng.sample(usable, count)


def length_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    lengths = [len(" ".join(str(v) for v in row.values())) for row in rows]
    return {"chars_mean": round(statistics.fmean(lengths), 1), "chars_min": min(lengths),
            "chars_max": max(lengths)}


def prepare_data(cfg: DataConfig, task: str, seed: int, endpoint_url: Optional[str] = None) -> Splits:
    kind = get_task(task)
    loaded = load_records(cfg, endpoint_url)
    kind.check_fields(loaded.rows, cfg)
    rows, invalid = valid_examples(kind, loaded, cfg, "data.path")
    normalised = kind.normalise(rows, cfg)
    train, validation = split(normalised, cfg, seed)
    digest = loaded.digest
    test: list[dict[str, Any]] = []
    if cfg.test_path:
        test_loaded = load_records(cfg, endpoint_url, "data.test_path", cfg.test_path)
        kind.check_fields(test_loaded.rows, cfg)
        test_rows, test_invalid = valid_examples(kind, test_loaded, cfg, "data.test_path")
        invalid += test_invalid
        test = kind.normalise(test_rows, cfg)
        digest = hashlib.sha256((digest + test_loaded.digest).encode()).hexdigest()
    replayed = 0
    if cfg.replay_fraction > 0:
        replayed = round(len(train) * cfg.replay_fraction / (1 - cfg.replay_fraction))
        train = train + [kind.replay_record(text) for text in replay_texts(cfg, replayed, seed, endpoint_url)]
        random.Random(seed + 1).shuffle(train)
    stats = {"rows_source": len(loaded.rows), "rows_invalid": invalid, "rows_usable": len(normalised), "rows_train": len(train),
             "rows_validation": len(validation), "rows_test": len(test), "rows_replay": replayed,
             "content_sha256": digest, **{f"train_{k}": v for k, v in length_stats(train).items()}}
    log.info("data: %d train (%d replayed) / %d validation / %d test rows (sha256 %s)", len(train), replayed,
             len(validation), len(test), digest[:12])
    return Splits(train=train, validation=validation, test=test, stats=stats)
