"""The order training reads a multitask (or replayed) split in: task weights and the progressive schedule.

With task weights, each row is repeated in proportion to its task's weight (data.task_weights); the
progressive schedule (train.schedule: progressive, the guide's curriculum) starts from general text
only and ramps the tasks in. The order is computed once, with train.seed, and read sequentially, so
every data-parallel worker takes its share of the same sequence.
"""

from __future__ import annotations

import array
import logging
import random
from typing import TYPE_CHECKING, Iterator, Optional

from kubetune.config import RunConfig
from kubetune.errors import DataError
from kubetune.tasks.prompts import GENERAL_TASK

if TYPE_CHECKING:  # numpy is imported where it is used: importing kubetune stays fast
    import numpy as np

log = logging.getLogger(__name__)

#: progressive: the general share falls from 1 to data.replay_fraction over this share of the run.
PROGRESSIVE_RAMP = 0.5


def shuffled_positions(count: int, rng: random.Random) -> np.ndarray:
    """range(count) in the order rng.shuffle leaves a list of `count` items (its Fisher-Yates steps,
    randrange(n) drawing as shuffle's randbelow(n) does): x[shuffled_positions(len(x), rng)] is
    rng.shuffle(x), at 8 bytes an item whatever x holds."""
    import numpy as np

    order = array.array("q", range(count))
    draw = rng.randrange
    for i in range(count - 1, 0, -1):
        j = draw(i + 1)
        order[i], order[j] = order[j], order[i]
    return np.frombuffer(order, dtype=np.int64)


def weighted_pass(indices: np.ndarray, weights: np.ndarray, rng: random.Random, length: int) -> np.ndarray:
    """About `length` indices, each row repeated in proportion to its weight (stochastic rounding
    of the expected count, so the mixture is close to exact), shuffled. One draw per row, in row
    order, as a loop over the rows would draw them."""
    import numpy as np

    total = sum(weights[i] for i in indices)  # summed in order, as the rounding below expects
    expected = weights[indices] * length / total
    whole = np.floor(expected)
    draws = np.frombuffer(array.array("d", (rng.random() for _ in range(len(indices)))), dtype=np.float64)
    copies = whole.astype(np.int64) + (draws < expected - whole)
    out = np.repeat(indices, copies)
    return out[shuffled_positions(len(out), rng)]


def _cycle(indices: np.ndarray, weights: np.ndarray, rng: random.Random) -> Iterator[int]:
    while True:  # weighted passes of about len(indices) rows each, reshuffled every pass
        yield from weighted_pass(indices, weights, rng, len(indices)).tolist()


def progressive_order(general: np.ndarray, own: np.ndarray, weights: np.ndarray, rng: random.Random,
                      length: int, final_general_share: float) -> np.ndarray:
    """The guide's progressive schedule over a run of `length` examples: general text only at
    first; its share falls linearly to final_general_share (data.replay_fraction) by
    PROGRESSIVE_RAMP of the run and stays there."""
    import numpy as np

    general_rows, own_rows = _cycle(general, weights, rng), _cycle(own, weights, rng)
    order = array.array("q")
    for position in range(length):
        progress = min(1.0, position / max(1.0, PROGRESSIVE_RAMP * length))
        share = 1.0 - (1.0 - final_general_share) * progress
        order.append(next(general_rows) if rng.random() < share else next(own_rows))
    return np.frombuffer(order, dtype=np.int64)


def _counts(names: list[str], codes: np.ndarray, order: np.ndarray, limit: int) -> str:
    import numpy as np

    counted = np.bincount(codes[order], minlength=len(names))
    top = sorted(((names[i] or "-", int(n)) for i, n in enumerate(counted) if n), key=lambda kv: -kv[1])
    return ", ".join(f"{k}={v}" for k, v in top[:limit]) + (f", ... ({len(top)} tasks)" if len(top) > limit else "")


def training_order(names: list[str], codes: np.ndarray, task_weights: dict[str, float],
                   cfg: RunConfig) -> Optional[list[int]]:
    """Indices of the tokenized train split in the order training reads them, or None when plain
    shuffling will do (no weights, mixed schedule). The rows' tasks come as codes into names (one
    small integer a row, as Arrow's dictionary encoding gives them); task_weights: weight by task
    name (1.0 when absent).

    Enough rows for the whole run: its steps x batch x accumulation x processes x nodes."""
    import numpy as np

    progressive = cfg.train.schedule == "progressive"
    by_code = np.array([float(task_weights.get(name, 1.0)) for name in names], dtype=np.float64)
    weights = by_code[codes] if len(names) else np.zeros(0)
    if not progressive and len(set(by_code[np.unique(codes)].tolist())) <= 1:
        return None
    if weights.sum() <= 0:
        raise DataError("data.task_weights", cfg.data.task_weights, "every training task has weight 0; give "
                        "at least one a positive weight")
    rows = len(codes)
    length = cfg.train.total_steps(rows) * cfg.train.rows_per_step()
    rng = random.Random(cfg.train.seed)
    is_general = codes == names.index(GENERAL_TASK) if GENERAL_TASK in names else np.zeros(rows, dtype=bool)
    general = np.flatnonzero(is_general & (weights > 0))
    own = np.flatnonzero(~is_general & (weights > 0))
    if not progressive or not len(general) or not len(own):
        if progressive:
            log.warning("train.schedule progressive: the training split holds no %s rows (set "
                        "data.replay_fraction above 0); training on the tasks as mixed",
                        "general-text" if not len(general) else "task")
        order = weighted_pass(np.flatnonzero(weights > 0), weights, rng, max(length, rows))
    else:
        order = progressive_order(general, own, weights, rng, length, cfg.data.replay_fraction)
    log.info("train order (%s): %d rows, by task %s", cfg.train.schedule, len(order),
             _counts(names, codes, order, limit=12))
    return order.tolist()
