"""prepare_data: the source's records in the task kind's schema, split, with general text replayed in.

Reading is kubetune.sources; what a record means (its schema, which rows are usable) is the task
kind's. Here: shuffle with the run's seed, cap at data.max_rows, hold out the validation share, read
the test file when there is one, mix replayed general text into the training split, and describe
the result (row counts, lengths, the content hash that lineage carries).
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
from kubetune.sources import general_text_lines, load_records
from kubetune.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    stats: dict[str, Any]

    def by_name(self) -> dict[str, list[dict[str, Any]]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


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
    return Splits(train=train, validation=validation, test=test, stats=stats)
