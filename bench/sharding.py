"""Sharded against replicated training, kubetune's own loop: `python bench/sharding.py --model DIR
--processes N --out FILE.json` trains the same LoRA (or with --full, every weight) on the same
random-token batches twice, train.sharding ddp then fsdp, each in N torchrun processes, and writes
per run: seconds per step, tokens/s, the first process's peak GPU memory (torch's max allocated),
its peak RSS and the parameters it holds, and the loss per step; then FSDP's figures over DDP's.

Why: FSDP is for models that do not fit one GPU whole; what it buys per GPU (memory) and costs
(the all-gathers, time) is only seen on several GPUs. bench/gpu.py runs this when it finds 2 or
more; its --smoke runs it on the CPU with 2 gloo processes (plumbing only: the timings mean nothing,
and there is no GPU memory to compare, only the parameters each process holds).

Each run is a fresh torchrun; the model is prepared once (kubetune's prepare_model, no
quantization: FSDP takes none) and every process loads it as the train stage does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARDINGS = ("ddp", "fsdp")
ROWS, LENGTH = 512, 128  # random token rows: enough for any --steps at batch 4 x 2 processes x 8 GPUs


def config(model_dir: Path, steps: int, processes: int, sharding: str, full: bool):
    from kubetune.config import RunConfig

    return RunConfig.from_dict({
        "model": {"name_or_path": str(model_dir), "quantization": "none", **({"lora": None} if full else {})},
        "train": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": steps, "save_steps": 0,
                  "eval_steps": 0, "warmup_steps": 0, "processes": processes, "sharding": sharding,
                  "group_by_length": False, "seed": 0},
        "evaluate": {"retention_path": None}})


def prepare(model_dir: Path, scratch: Path, full: bool) -> None:
    """The prepared model and a tokenized set of random rows, once for every run."""
    import random

    import datasets

    from kubetune import modeling
    from kubetune.tasks import get_task

    cfg = config(model_dir, 1, 2, "ddp", full)
    rng = random.Random(0)
    vocab = modeling.meta_model(model_dir).config.vocab_size
    rows = [[rng.randrange(1, vocab) for _ in range(LENGTH)] for _ in range(ROWS)]
    datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * LENGTH] * ROWS,
                                "labels": rows}).save_to_disk(str(scratch / "rows"))
    modeling.prepare_model(model_dir, cfg.model, scratch / "prepared", cfg.train.seed, task=get_task("causal_lm"),
                           info={})


def worker(args) -> None:
    """One torchrun process: kubetune's training.train on the prepared model."""
    import datasets
    from transformers import AutoTokenizer, default_data_collator

    from kubetune import artifacts, modeling, training
    from kubetune.tasks import get_task

    cfg = config(args.model, args.steps, int(os.environ["WORLD_SIZE"]), args.sharding, args.full)
    model = modeling.load_for_training(args.model, args.scratch / "prepared", cfg.model, get_task("causal_lm"), {},
                                       sharded=args.sharding == "fsdp")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = datasets.load_from_disk(str(args.scratch / "rows"))
    started = time.monotonic()
    summary = training.train(model, default_data_collator, tokenizer, rows, cfg.train,
                             work_dir=args.scratch / f"work-{args.sharding}", out_dir=args.scratch / f"out-{args.sharding}",
                             progress=False)
    if summary:
        seconds = time.monotonic() - started
        result = {"sharding": args.sharding, "processes": summary["processes"], "steps": summary["steps"],
                  "seconds_per_step": round(seconds / summary["steps"], 4),
                  "tokens_per_s": round(summary["tokens"] * summary["processes"] / seconds, 1),
                  "parameter_mb_per_process": summary["parameter_mb_per_process"],
                  "peak_gpu_mb": summary.get("peak_gpu_mb"), "peak_rss_mb": summary.get("peak_rss_mb"),
                  "losses": [row["loss"] for row in artifacts.read_training_history(args.scratch / f"out-{args.sharding}")
                             if "loss" in row]}
        (args.scratch / f"result-{args.sharding}.json").write_text(json.dumps(result))


def compare(results: dict) -> dict:
    ddp, fsdp = results["ddp"], results["fsdp"]
    ratio = {key: round(fsdp[key] / ddp[key], 3) for key in ("seconds_per_step", "tokens_per_s",
                                                              "parameter_mb_per_process", "peak_gpu_mb",
                                                              "peak_rss_mb")
             if fsdp.get(key) and ddp.get(key)}
    ratio["largest_loss_difference"] = max(abs(a - b) for a, b in zip(ddp["losses"], fsdp["losses"]))
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", choices=SHARDINGS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    scratch = Path(tempfile.mkdtemp(prefix="bench-sharding-"))
    prepare(args.model, scratch, args.full)
    results = {}
    for sharding in SHARDINGS:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.processes}", __file__, "--worker", "--model", str(args.model),
                        "--steps", str(args.steps), "--sharding", sharding, "--scratch", str(scratch),
                        "--out", str(args.out), *(["--full"] if args.full else [])], check=True)
        results[sharding] = json.loads((scratch / f"result-{sharding}.json").read_text())
        print(f"{sharding}: {results[sharding]}", flush=True)
    report = {"runs": results, "fsdp_vs_ddp": compare(results)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["fsdp_vs_ddp"]))


if __name__ == "__main__":
    main()
