"""tokenize: the prepared splits as token ids, with the base model's own tokenizer.

The task kind encodes (kubetune.tasks); here the tokenizer is loaded the way every stage loads it,
the task info is learned from the training split (written once, into the tokenized artifact), and
token statistics are counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from kubetune import __version__, artifacts
from kubetune.config import DataConfig, locations
from kubetune.tasks import get_task

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding with EOS is the usual fix and
        # the attention mask keeps the padding out of the loss.
        tokenizer.pad_token = tokenizer.eos_token
    # Training passes no position ids, so the model numbers positions from the left edge of the
    # batch: left padding (Gemma's converted tokenizer has it) would shift every shorter row's
    # positions and inflate its loss (measured: Gemma 270M 4-bit perplexity 66 alone, 329 in padded
    # batches). Scoring and generation pad on the left and pass their own positions.
    tokenizer.padding_side = "right"
    return tokenizer


def token_stats(ids: list[list[int]], max_length: int) -> dict[str, Any]:
    lengths = [len(row) for row in ids]
    return {"tokens_total": sum(lengths), "tokens_mean": round(statistics.fmean(lengths), 1),
            "tokens_max": max(lengths), "truncated_share": round(sum(n >= max_length for n in lengths) / len(lengths), 4)}


def tokenize(data_dir: Path, model_dir: Path, cfg: DataConfig, out_dir: Path, task: str = "causal_lm") -> dict[str, Any]:
    """Writes the tokenized artifact (every split, the tokenizer, the task info); returns token
    statistics."""
    kind = get_task(task)
    info = kind.info(artifacts.read_split(data_dir, "train"), cfg)
    tokenizer = load_tokenizer(model_dir)
    kind.prepare_tokenizer(tokenizer, cfg)
    columns_by_split: dict[str, dict[str, list]] = {}
    stats: dict[str, Any] = {}
    for split in artifacts.split_names(data_dir):
        columns = kind.encode(artifacts.read_split(data_dir, split), tokenizer, cfg, info)
        columns_by_split[split] = columns
        stats.update({f"{split}_{k}": v for k, v in token_stats(columns["input_ids"], cfg.max_length).items()})
    artifacts.write_tokenized(out_dir, columns_by_split, tokenizer, info, stats)
    log.info("tokenize: %s", stats)
    return stats


def cache_key(data_dir: Path, tokenizer_fingerprint: str, cfg: DataConfig, task: str) -> str:
    """What the tokenized artifact depends on: the prepared rows (by content, not by where the run
    put them), the tokenizer, the data settings other than where the data came from, the task and
    kubetune's version. Equal keys mean an equal artifact, so a later run can reuse it."""
    places = {key for key, _, _ in locations(cfg)}
    settings = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in places}
    text = json.dumps({"rows": artifacts.digest(data_dir), "tokenizer": tokenizer_fingerprint, "settings": settings,
                       "task": task, "kubetune": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
