"""Evaluation during training: the validation loss every train.eval_steps optimizer steps and at the
last one, the weights of the best evaluation kept, early stopping on it, and those weights as what
the train stage outputs (so evaluate and register see the best model, not the last).

The best weights and their record are copied to storage (`<run>/best/`, the record written last) at
every improvement, so a retried or resumed attempt starts with the best-so-far record: its patience
count is the steps since the best step, which needs no other state.

For LoRA the kept weights are the adapter (a few MB); without LoRA, the whole model.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune import sharding
from kubetune.config import TrainConfig
from kubetune.errors import ServiceError

log = logging.getLogger(__name__)

BEST = "best"  # folder in the work dir, and key under the run's storage prefix
RECORD = "kubetune_best.json"  # written after the weights: a folder without it is incomplete


@dataclass
class Best:
    step: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class BestKeeper:
    """Tracks the best evaluation of a run (lowest validation loss, by more than
    early_stopping.min_delta) and keeps its weights."""

    def __init__(self, cfg: TrainConfig, work_dir: Path, store=None, prefix: str = ""):
        self.cfg = cfg
        self.folder = work_dir / BEST
        self.store, self.key = store, f"{prefix}/{BEST}"
        self.best = self._restore()
        self.stopped_at: Optional[int] = None

    def _restore(self) -> Optional[Best]:
        record = self.folder / RECORD
        if not record.exists() and self.store is not None and f"{self.key}/{RECORD}" in set(self.store.list(self.key)):
            self.store.download_dir(self.key, self.folder)
        if not record.exists():
            return None
        best = Best(**json.loads(record.read_text()))
        log.info("best evaluation so far: step %d, validation loss %.4f", best.step, best.loss)
        return best

    def consider(self, model, step: int, metrics: dict[str, float], save: bool = True) -> bool:
        """Records an evaluation; keeps the weights when it is the best so far. save: whether this
        process writes (under torchrun only the first does; every process tracks the same figures and
        joins in gathering sharded weights)."""
        loss = metrics["eval_loss"]
        min_delta = self.cfg.early_stopping.min_delta if self.cfg.early_stopping else 0.0
        if self.best is not None and not loss < self.best.loss - min_delta:
            return False
        self.best = Best(step, float(loss), {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        if save:
            shutil.rmtree(self.folder, ignore_errors=True)
        sharding.write_weights(model, self.folder, save)
        if save:
            (self.folder / RECORD).write_text(json.dumps(asdict(self.best)))
            if self.store is not None:
                try:
                    self.store.upload_dir(self.folder, self.key, last=RECORD)
                except ServiceError as exc:  # the next improvement uploads again
                    log.warning("the best weights (step %d) could not be stored (%s); training goes on", step, exc)
        return True

    def should_stop(self, step: int) -> bool:
        patience = self.cfg.early_stopping.patience if self.cfg.early_stopping else None
        if patience is None or self.best is None or step - self.best.step < patience * self.cfg.eval_steps:
            return False
        self.stopped_at = step
        return True

    def folder_if_better_than(self, final_step: int) -> Optional[Path]:
        """The kept weights' folder when an evaluation before the last step was the best, else None."""
        if self.best is None or self.best.step == final_step:
            return None
        log.info("the stage outputs the weights of step %d (validation loss %.4f), the best evaluation; "
                 "training ended at step %d", self.best.step, self.best.loss, final_step)
        return self.folder

    def copy_weights(self, out_dir: Path) -> None:
        """The kept weights as the stage's output, as save_pretrained wrote them."""
        for path in self.folder.iterdir():
            if path.is_file() and path.name != RECORD:
                shutil.copy2(path, out_dir / path.name)

    def summary(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {"best_step": self.best.step, "best_eval_loss": round(self.best.loss, 5),
                "stopped_early_at": self.stopped_at}


def load_weights(model, folder: Path) -> None:
    """Weights a checkpoint (or the best folder) holds into model: the adapter, or the whole model."""
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
    else:
        model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)


def eval_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The Trainer's eval_* figures as train/eval_* metrics, with the perplexity of the loss."""
    figures = {f"train/{key}": value for key, value in metrics.items()
               if key.startswith("eval_") and key not in ("eval_runtime", "eval_samples_per_second",
                                                          "eval_steps_per_second", "epoch")}
    if "eval_loss" in metrics:
        figures["train/eval_perplexity"] = round(math.exp(min(metrics["eval_loss"], 50.0)), 4)
    return figures


def make_callback(keeper: BestKeeper, logger, logged_through: int):
    from transformers import TrainerCallback

    class EvaluateAndKeepBest(TrainerCallback):
        """Also evaluates at the last step (the Trainer evaluates only every eval_steps), keeps the
        best weights, logs the figures with step=, and stops early when patience runs out."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = True

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            if not metrics or "eval_loss" not in metrics:
                return
            step = state.global_step
            keeper.consider(model, step, metrics, save=state.is_world_process_zero)
            if logger is not None and state.is_world_process_zero and step > logged_through:
                logger.metrics(eval_figures(metrics), step=step)
            if keeper.should_stop(step):
                log.info("early stopping at step %d: no better validation loss than step %d's %.4f for %d "
                         "evaluations", step, keeper.best.step, keeper.best.loss, keeper.cfg.early_stopping.patience)
                control.should_training_stop = True

    return EvaluateAndKeepBest()
