"""Training: the transformers Trainer on the prepared model, metrics to MLflow per step, checkpoints
copied to storage so that a retried pod resumes where the last one stopped."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from kubetune import artifacts, sharding
from kubetune.best_checkpoint import BestKeeper, load_weights, make_callback
from kubetune.config import TrainConfig
from kubetune.errors import ConfigError, ServiceError
from kubetune.headline import loss_line

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
COMPLETE_MARKER = "trainer_state.json"  # written by the Trainer into every checkpoint; uploaded last


def precision_flags(precision: str) -> dict[str, bool]:
    """fp16/bf16 only where the device supports it; `auto` picks the best one available."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return {"bf16": bf16_ok, "fp16": cuda and not bf16_ok}
    if precision == "bf16" and not bf16_ok:
        raise ConfigError("train.precision", precision, "this device has no bf16 support; use auto or fp32")
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision", precision, "fp16 training needs a GPU; use auto or fp32")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _step_of(name: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", name.rstrip("/"))
    return int(match.group(1)) if match else -1


def latest_checkpoint(store, prefix: str) -> Optional[str]:
    """The key prefix of the newest complete checkpoint under prefix/checkpoints, if any."""
    complete = [step for step, done in _checkpoint_steps(store, prefix).items() if done]
    return f"{prefix}/{CHECKPOINTS}/checkpoint-{max(complete)}" if complete else None


def _completed(checkpoint: Path, max_steps: int) -> bool:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] >= max_steps


def _checkpoint_steps(store, prefix: str) -> dict[int, bool]:
    """Step -> whether complete, for every checkpoint stored under prefix/checkpoints."""
    found: dict[int, bool] = {}
    for key in store.list(f"{prefix}/{CHECKPOINTS}"):
        step = _step_of(key.rsplit("/", 1)[0])
        found[step] = found.get(step, False) or key.endswith(COMPLETE_MARKER)
    return found


def store_checkpoint(store, folder: Path, prefix: str, keep: int) -> int:
    """Upload one checkpoint folder with trainer_state.json last (a checkpoint counts as complete only
    once it is there, so a half-uploaded one is never resumed from), then delete the stored
    checkpoints older than the newest `keep` complete ones. Returns the files uploaded."""
    count = store.upload_dir(folder, f"{prefix}/{CHECKPOINTS}/{folder.name}", last=COMPLETE_MARKER)
    stored = _checkpoint_steps(store, prefix)
    kept = sorted((step for step, complete in stored.items() if complete), reverse=True)[:keep]
    for step in stored:
        if step not in kept and step < max(kept, default=0):
            store.delete_prefix(f"{prefix}/{CHECKPOINTS}/checkpoint-{step}")
    return count


def logged_through(logger) -> int:
    """The last step an earlier attempt logged: a resumed attempt redoes the steps after its
    checkpoint (with the same values: training is deterministic) and does not log them twice."""
    return max((step for step, _ in logger.metric_values("train/loss")), default=0) if logger else 0


def make_callbacks(logger, store, prefix: str, keep: int, runtime: "Runtime", counter: "TokenCounter"):
    from transformers import TrainerCallback

    # A resumed attempt redoes the steps after its checkpoint; an earlier attempt logged them
    # already (with the same values: training is deterministic), so they are not logged twice.
    through = logged_through(logger)

    class MlflowSteps(TrainerCallback):
        """Loss, learning rate and gradient norm per optimizer step, with step=."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logger is None or not logs or not state.is_world_process_zero or state.global_step <= through:
                return
            names = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}
            logger.metrics({names[k]: v for k, v in logs.items() if k in names}, step=state.global_step)

    class Throughput(TrainerCallback):
        """Tokens/s, padding share and seconds per step since the last log, logged with the loss."""

        def __init__(self):
            self.mark = (time.monotonic(), 0, 0, 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logger is None or not state.is_world_process_zero or state.global_step <= through:
                return
            now = (time.monotonic(), counter.tokens, counter.positions, state.global_step)
            seconds, tokens, positions, steps = (a - b for a, b in zip(now, self.mark))
            self.mark = now
            if seconds > 0 and steps > 0 and positions > 0:
                # _step: the series; the run's own train.tokens_per_s and train.padding_share (step 0)
                # cover the whole loop.
                logger.metrics({"train/tokens_per_s_step": round(tokens / seconds, 2),
                                "train/padding_share_step": round(1 - tokens / positions, 4),
                                "train/seconds_per_step": round(seconds / steps, 3)}, step=state.global_step)

    class UploadCheckpoints(TrainerCallback):
        """Each checkpoint to storage. Storage that stays down past storage.retry_seconds costs a
        warning, not the attempt: the checkpoint is on local disk and the next save uploads again.

        On several nodes each node wrote part of the checkpoint to its own disk (its processes' RNG
        states; under FSDP their shards of weights and optimizer): every other node uploads its part
        first, and the first node adds its own and the completion marker only when all parts are in.
        Under FSDP the last checkpoint also gets the gathered weights, which a retry after training
        finished takes as they are."""

        def on_save(self, args, state, control, model=None, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.global_step >= state.max_steps and model is not None and sharding.is_sharded(model):
                sharding.write_weights(model, folder, state.is_world_process_zero)
            node, nodes = sharding.node_layout()
            stored = True
            if store is not None and nodes > 1 and node > 0 and args.local_process_index == 0:
                stored = _try_store(lambda: store.upload_dir(folder, f"{prefix}/{CHECKPOINTS}/{folder.name}",
                                                             without=COMPLETE_MARKER), folder.name)
            if args.world_size > 1:  # also a barrier: every process has written its part before rank 0 uploads
                stored = sharding.all_agree(stored)
            if not state.is_world_process_zero:
                return
            runtime.write(folder)
            if store is None or not stored:
                return
            count = _try_store(lambda: store_checkpoint(store, folder, prefix, keep), folder.name)
            if count:
                log.info("checkpoint %s: %d files -> %s", folder.name, count,
                         store.uri(f"{prefix}/{CHECKPOINTS}/{folder.name}"))

    return [MlflowSteps(), Throughput(), UploadCheckpoints()]


def _try_store(upload, name: str):
    """upload()'s result, or None (and a warning) when storage stays down."""
    try:
        return upload()
    except ServiceError as exc:
        log.warning("checkpoint %s could not be stored (%s); training goes on and the next save uploads again",
                    name, exc)
        return None


class TokenCounter:
    """Counts the real (attention_mask 1) and padded token positions of every batch the model is
    given (a forward pre-hook, so a batch the data loader fetched ahead is counted when it is used):
    the figures behind tokens/s and the padding share."""

    def __init__(self):
        self.tokens = 0
        self.positions = 0

    def count(self, input_ids, attention_mask=None) -> None:
        self.tokens += int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
        self.positions += input_ids.numel()

    def attach(self, model):
        def hook(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is not None:
                self.count(input_ids, kwargs.get("attention_mask"))
        return model.register_forward_pre_hook(hook, with_kwargs=True)


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and the GPU's peak allocation where there is one), in MB."""
    import resource

    import torch

    peaks = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peaks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


class Runtime:
    """Training seconds summed over attempts: each checkpoint records the total so far, and a resumed
    attempt starts from its checkpoint's total (time an attempt spent after its last checkpoint is
    redone, and counted once)."""

    FILE = "kubetune_runtime.json"

    def __init__(self, resume_from: Optional[Path]):
        self.started = time.monotonic()
        marker = resume_from / self.FILE if resume_from is not None else None
        self.before = json.loads(marker.read_text())["train_seconds"] if marker and marker.exists() else 0.0

    def total(self) -> float:
        return round(self.before + time.monotonic() - self.started, 1)

    def write(self, folder: Path) -> None:
        (folder / self.FILE).write_text(json.dumps({"train_seconds": self.total()}))


def describe(summary: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """The train stage's line: the steps and the loss as kubetune.headline.loss_line reads it
    (validation first -> best; single training steps are too noisy to compare)."""
    text = f"{summary.get('steps')} steps"
    if summary.get("resumed_from"):
        text += f" (resumed from {Path(summary['resumed_from']).name})"
    text += f", {loss_line(history)}"
    if summary.get("stopped_early_at"):
        text += f" (stopped early at {summary['stopped_early_at']})"
    return text


def loss_curve(history: list[dict[str, Any]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(row["step"], row[key]) for row in history if key in row]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("Training and validation loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def train(model, collator, tokenizer, train_dataset, cfg: TrainConfig, work_dir: Path, out_dir: Path,
          logger=None, store=None, prefix: str = "", progress: bool = True,
          order: Optional[list[int]] = None, eval_dataset=None, compute_metrics=None) -> dict[str, Any]:
    """Trains in place, writes the adapter (or weights) and tokenizer to out_dir, returns a summary.

    order: row indices to read in exactly this sequence (task weights, progressive schedule)
    instead of the Trainer's shuffle; under DDP the workers take consecutive batches of it.
    eval_dataset: validation rows scored every cfg.eval_steps (kubetune.best_checkpoint), with
    compute_metrics for the task's own figure where it has a cheap one; the output is then the
    weights of the best evaluation.

    Under torchrun every worker process calls this; only the first writes, logs and uploads."""
    import torch
    from transformers import TrainingArguments

    work_dir.mkdir(parents=True, exist_ok=True)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    total_steps = cfg.total_steps(len(train_dataset))
    evaluating = bool(cfg.eval_steps) and eval_dataset is not None and len(eval_dataset) > 0
    if order is not None:
        train_dataset = train_dataset.select(order)
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        max_steps=total_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm or None,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=cfg.eval_steps if evaluating else None,
        # at the training batch size: on the demo (8-bit, 2 CPUs) a pass over 50 rows took 11.4 s at 4
        # rows a batch and 15-17.6 s at 8 (more padding)
        per_device_eval_batch_size=cfg.batch_size,
        prediction_loss_only=compute_metrics is None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Grouping by length cut padding from 29% to a few percent of the quotes' batches (bench/).
        train_sampling_strategy="sequential" if order is not None else
        "group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps or total_steps,
        save_total_limit=cfg.keep_checkpoints,
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),  # a model to be sharded may still be on the CPU
        # Workers started by torchrun (train.processes or train.nodes > 1): NCCL on GPUs, gloo on CPUs.
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        **sharding.trainer_arguments(cfg.sharding, model),
        **precision_flags(cfg.precision),
    )
    resume_from = None
    if store is not None:
        latest = latest_checkpoint(store, prefix)
        if latest is not None:
            resume_from = str(work_dir / Path(latest).name)
            with args.main_process_first(desc="checkpoint download"):  # one download per node
                if not (Path(resume_from) / "trainer_state.json").exists():
                    store.download_dir(latest, Path(resume_from))
            log.info("resuming from %s", store.uri(latest))
    if logger is not None and resume_from is None and args.process_index == 0:
        # Once per run (a resumed attempt trains with the same arguments); an artifact, not params:
        # the run's params are its config, and ~150 Trainer defaults would bury them.
        logger.json(args.to_dict(), "train/training_arguments.json")
    runtime = Runtime(Path(resume_from) if resume_from else None)
    counter = TokenCounter()
    counting = counter.attach(model)
    loop_started = time.monotonic()
    callbacks = make_callbacks(logger, store, prefix, cfg.keep_checkpoints, runtime, counter)
    keeper = BestKeeper(cfg, work_dir, store, prefix) if evaluating else None
    if keeper is not None:
        callbacks.append(make_callback(keeper, logger, logged_through(logger)))
    trainer = sharding.trainer_class(cfg.sharding)(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                      eval_dataset=eval_dataset if evaluating else None, compute_metrics=compute_metrics,
                      callbacks=callbacks)
    if resume_from is not None and _completed(Path(resume_from), total_steps):
        # An earlier attempt finished training but failed later: take its weights as they are
        # (the Trainer would otherwise run one step more on resume).
        load_weights(model, Path(resume_from))
        trainer.state = trainer.state.load_from_json(str(Path(resume_from) / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    loop_seconds = time.monotonic() - loop_started
    counting.remove()

    main = trainer.is_world_process_zero()
    held = sharding.parameter_bytes(trainer.model)
    best = keeper.folder_if_better_than(trainer.state.global_step) if keeper is not None else None
    if best is None:
        sharding.write_weights(trainer.model, out_dir, main)  # every process: sharded weights are gathered
    if not main:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    if best is not None:
        keeper.copy_weights(out_dir)
    tokenizer.save_pretrained(out_dir)
    history = [row for row in trainer.state.log_history if "loss" in row or "eval_loss" in row]
    losses = [row["loss"] for row in history if "loss" in row]
    # From the whole log history (a resumed Trainer restores it from the checkpoint), so the figures
    # cover every attempt; the Trainer's own training_loss covers only the last one.
    summary = {"steps": trainer.state.global_step, "train_runtime_seconds": runtime.total(),
               "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
               "train_loss_mean": round(sum(losses) / len(losses), 4) if losses else None,
               "resumed_from": resume_from, "processes": args.world_size,
               # this attempt's loop (per process): what the batches held and how fast they went
               "tokens": counter.tokens, "tokens_per_s": round(counter.tokens / loop_seconds, 2) if counter.tokens else None,
               "padding_share": round(1 - counter.tokens / counter.positions, 4) if counter.positions else None,
               "sharding": cfg.sharding, "parameter_mb_per_process": round(held / 2**20, 3),
               **(keeper.summary() if keeper is not None else {}), **peak_memory_mb()}
    artifacts.write_training_summary(out_dir, summary, history)
    if logger is not None and history:
        import matplotlib.pyplot as plt

        figure = loss_curve(history)
        logger.figure(figure, "plots/train_loss.png")
        plt.close(figure)
    if store is not None:
        store.upload_dir(out_dir, f"{prefix}/{ADAPTER}")
    shutil.rmtree(work_dir, ignore_errors=True)
    return summary
