"""The order training reads a multitask (or replayed) split in: task weights and the progressive schedule.

With task weights, each row is repeated in proportion to its task's weight (data.task_weights); the
progressive schedule (train.schedule: progressive, the guide's curriculum) starts from general text
only and ramps the tasks in. The order is computed once, with train.seed, and read sequentially, so
every data-parallel worker takes its share of the same sequence.
"""

from __future__ import annotations

import logging
import random
from typing import Iterator, Optional

from kubetune.config import RunConfig
from kubetune.errors import DataError
from kubetune.tasks.prompts import GENERAL_TASK

log = logging.getLogger(__name__)

#: progressive: the general share falls from 1 to data.replay_fraction over this share of the run.
PROGRESSIVE_RAMP = 0.5


def weighted_pass(indices: list[int], weights: list[float], rng: random.Random, length: int) -> list[int]:
    """About `length` indices, each row repeated in proportion to its weight (stochastic rounding
    of the expected count, so the mixture is close to exact), shuffled."""
    total = sum(weights[i] for i in indices)
    out = []
    for i in indices:
        expected = weights[i] * length / total
        copies = int(expected) + (rng.random() < expected - int(expected))
        out.extend([i] * copies)
    rng.shuffle(out)
    return out


def _cycle(indices: list[int], weights: list[float], rng: random.Random) -> Iterator[int]:
    while True:  # weighted passes of about len(indices) rows each, reshuffled every pass
        yield from weighted_pass(indices, weights, rng, len(indices))


def progressive_order(general: list[int], own: list[int], weights: list[float], rng: random.Random,
                      length: int, final_general_share: float) -> list[int]:
    """The guide's progressive schedule over a run of `length` examples: general text only at
    first; its share falls linearly to final_general_share (data.replay_fraction) by
    PROGRESSIVE_RAMP of the run and stays there."""
    general_rows, own_rows = _cycle(general, weights, rng), _cycle(own, weights, rng)
    order = []
    for position in range(length):
        progress = min(1.0, position / max(1.0, PROGRESSIVE_RAMP * length))
        share = 1.0 - (1.0 - final_general_share) * progress
        order.append(next(general_rows) if rng.random() < share else next(own_rows))
    return order


def _counts(values: list[str], limit: int) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[value or "-"] = counts.get(value or "-", 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k}={v}" for k, v in top[:limit]) + (f", ... ({len(top)} tasks)" if len(top) > limit else "")


def training_order(tasks: list[str], weights: list[float], cfg: RunConfig) -> Optional[list[int]]:
    """Indices of the tokenized train split (one task name and weight per row) in the order training
    reads them, or None when plain shuffling will do (no weights, mixed schedule).

    Enough rows for the whole run: its steps x batch x accumulation x train.processes."""
    progressive = cfg.train.schedule == "progressive"
    if not progressive and len(set(weights)) <= 1:
        return None
    if sum(weights) <= 0:
        raise DataError("data.task_weights", cfg.data.task_weights, "every training task has weight 0; give "
                        "at least one a positive weight")
    length = (cfg.train.total_steps(len(tasks)) * cfg.train.batch_size * cfg.train.gradient_accumulation_steps
              * cfg.train.processes)
    rng = random.Random(cfg.train.seed)
    general = [i for i, task in enumerate(tasks) if task == GENERAL_TASK and weights[i] > 0]
    own = [i for i, task in enumerate(tasks) if task != GENERAL_TASK and weights[i] > 0]
    if not progressive or not general or not own:
        if progressive:
            log.warning("train.schedule progressive: the training split holds no %s rows (set "
                        "data.replay_fraction above 0); training on the tasks as mixed",
                        "general-text" if not general else "task")
        order = weighted_pass([i for i in range(len(tasks)) if weights[i] > 0], weights, rng,
                              max(length, len(tasks)))
    else:
        order = progressive_order(general, own, weights, rng, length, cfg.data.replay_fraction)
    log.info("train order (%s): %d rows, by task %s", cfg.train.schedule, len(order),
             _counts([tasks[i] for i in order], limit=12))
    return order
