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
import math
import os
from pathlib import Path
from typing import Any, Optional

from kubetune_serving.loading import load_tokenizer  # noqa: F401 (every stage loads tokenizers from here)

from kubetune import __version__, artifacts
from kubetune.config import DataConfig
from kubetune.overrides import locations
from kubetune.tasks import get_task

log = logging.getLogger(__name__)


#: Rows per encode call: the fast tokenizer's batch (its Rust side splits a batch over threads).
ENCODE_BATCH = 1000
#: Below this many rows a split is encoded in this process: starting workers costs more than it saves.
MIN_ROWS_PER_PROCESS = 20_000


def cpu_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: the container's CPU limit (cgroup v2 cpu.max, or v1's cfs
    quota) where there is one, else the CPUs it may run on. os.cpu_count() would give the node's cores."""
    quota = None
    for limit_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = (cgroup / limit_file).read_text().split()
            limit, period = (text[0], text[1]) if period_file is None else \
                (text[0], (cgroup / period_file).read_text().strip())
        except (OSError, IndexError):
            continue
        if limit not in ("max", "-1"):
            quota = max(1, math.ceil(int(limit) / int(period)))
        break
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(available, quota) if quota else available


def token_stats(batches, max_length: int) -> dict[str, Any]:
    """Token counts of an encoded split, from Arrow's list lengths of its input_ids a batch at a time."""
    import pyarrow.compute as pc

    total = longest = truncated = rows = 0
    for input_ids in batches:
        lengths = pc.list_value_length(input_ids)
        rows += len(lengths)
        total += pc.sum(lengths).as_py() or 0
        longest = max(longest, pc.max(lengths).as_py() or 0)
        truncated += pc.sum(pc.greater_equal(lengths, max_length)).as_py() or 0
    rows = max(rows, 1)
    return {"tokens_total": total, "tokens_mean": round(total / rows, 1), "tokens_max": longest,
            "truncated_share": round(truncated / rows, 4)}


def _encode_batch(batch: dict[str, list], kind, tokenizer, cfg: DataConfig, info: dict[str, Any]) -> dict[str, list]:
    names = list(batch)
    records = [artifacts.present(dict(zip(names, values))) for values in zip(*(batch[name] for name in names))]
    return kind.encode(records, tokenizer, cfg, info, whole=False)


def encode_split(dataset, kind, tokenizer, cfg: DataConfig, info: dict[str, Any], folder: Path, number: int,
                 processes: int):
    """The split's records as token columns, encoded ENCODE_BATCH rows at a time by up to
    `processes` workers (datasets' map). Its output files are the tokenized artifact's split
    (kubetune.artifacts.tokenized_shard_name): written once, not copied again by save_to_disk."""
    from datasets import Dataset

    sample = dataset.select(range(min(len(dataset), 64))).to_list()
    encoded_sample = kind.encode([artifacts.present(row) for row in sample], tokenizer, cfg, info, whole=False)
    features = Dataset.from_dict(encoded_sample).features if encoded_sample["input_ids"] else None
    workers = max(1, min(processes, len(dataset) // MIN_ROWS_PER_PROCESS))
    return dataset.map(_encode_batch, batched=True, batch_size=ENCODE_BATCH, num_proc=workers if workers > 1 else None,
                       remove_columns=dataset.column_names, features=features, load_from_cache_file=False,
                       cache_file_name=str(artifacts.tokenized_shard_name(folder, number)),
                       new_fingerprint=f"kubetune-{folder.name}-{number}",
                       fn_kwargs={"kind": kind, "tokenizer": tokenizer, "cfg": cfg, "info": info},
                       desc=f"tokenize {folder.name}")


def tokenize(data_dir: Path, model_dir: Path, cfg: DataConfig, out_dir: Path, task: str = "causal_lm",
             processes: Optional[int] = None) -> dict[str, Any]:
    """Writes the tokenized artifact (every split, the tokenizer, the task info); returns token
    statistics. processes: encoding workers (default: the CPU limit)."""
    kind = get_task(task)
    info = kind.info(artifacts.split_rows(data_dir, "train"), cfg)
    tokenizer = load_tokenizer(model_dir)
    kind.prepare_tokenizer(tokenizer, cfg)
    processes = processes or cpu_limit()
    out_dir = Path(out_dir)
    stats: dict[str, Any] = {}
    for split in artifacts.split_names(data_dir):
        if split != "train":
            kind.check_split(artifacts.read_split(data_dir, split), info, cfg)
        folder = artifacts.new_tokenized_split(out_dir, split)
        rows = kept = 0
        # A shard at a time: a memory-mapped file's pages stay in the process's RSS while it is
        # open, so one shard open at once keeps RSS at a shard's size, not the split's.
        for number, shard in enumerate(artifacts.split_shards(data_dir, split)):
            dataset = artifacts.read_shard(shard)
            encoded = encode_split(dataset, kind, tokenizer, cfg, info, folder, number, processes)
            rows, kept = rows + len(dataset), kept + len(encoded)
            del encoded, dataset
        if rows and not kept:
            raise kind.none_encoded(rows, cfg)
        if kept < rows:
            log.info("tokenize %s: %d of %d examples dropped (their answer does not fit data.max_length %d)",
                     split, rows - kept, rows, cfg.max_length)
        lengths = artifacts.tokenized_batches(out_dir, split, "input_ids")
        stats.update({f"{split}_{k}": v for k, v in token_stats(lengths, cfg.max_length).items()})
    artifacts.write_tokenized(out_dir, tokenizer, info, stats)
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
