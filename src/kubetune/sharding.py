"""Sharded training (train.sharding: fsdp): FSDP2 through the transformers Trainer, and what a
sharded model needs to leave the training loop as a normal adapter or model.

FSDP2 (`fully_shard`) splits every parameter across the processes (a DTensor per parameter), so each
holds about 1/N of the weights, gradients and optimizer state. The Trainer switches it on through
accelerate, which does so only for accelerator process groups: on the CPU (gloo) it falls back to DDP
without a word (accelerate 1.15, `AcceleratorState`: MULTI_CPU is not among the types that may become
FSDP). torch's fully_shard itself trains on the CPU with gloo, so `trainer_class` puts the plugin back
there; that is what lets this machine compare FSDP with DDP at all. Measured on a 2-block Llama, 2 CPU
processes, 4 steps: the loss per step equals DDP's to the last digit, and each process holds 250 KB of
parameters against DDP's 501 KB (full) and 258 KB against 515 KB (LoRA).

This module is the only one that reaches into accelerate's state; tests/integration/test_sharding.py
fails if a new accelerate stops honouring it.

Weights leave a sharded model only gathered, which is a collective: every process calls
`write_weights`, the first one writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

FSDP = "fsdp"


def trainer_arguments(sharding: str, model) -> dict[str, Any]:
    """TrainingArguments for the sharding: none for DDP (the Trainer's default under torchrun)."""
    if sharding != FSDP:
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2,
        # Each process saves and loads its own shard: no process ever holds the whole model to checkpoint.
        "state_dict_type": "SHARDED_STATE_DICT",
        # One FSDP unit per transformer block: a block's weights are gathered just before it runs.
        "transformer_layer_cls_to_wrap": block_classes(model),
    }}


def block_classes(model) -> list[str]:
    """The model's transformer block classes (what transformers keeps on one device when it splits a
    model); a PEFT model's from its base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    present = {type(module).__name__ for module in base.modules()}
    return [name for name in names if name in present]


def trainer_class(sharding: str):
    """The Trainer, or for FSDP on the CPU one whose accelerator keeps the FSDP plugin."""
    from transformers import Trainer

    if sharding != FSDP:
        return Trainer

    class ShardingTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:  # CPU processes (gloo)
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                state = self.accelerator.state
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    return ShardingTrainer


def is_sharded(model) -> bool:
    return any(hasattr(parameter, "to_local") for parameter in model.parameters())


def full_state_dict(model) -> Optional[dict]:
    """The whole model's weights on the CPU, gathered from every process (a collective: all call it);
    None where the model is not sharded (its own state_dict is whole)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_weights(model, folder: Path, main: bool) -> None:
    """save_pretrained into folder (the adapter for LoRA, else the model) by the first process; every
    process calls it, since a sharded model's weights are gathered first."""
    state = full_state_dict(model)
    if main:
        model.save_pretrained(folder, **({"state_dict": state} if state is not None else {}))


def parameter_bytes(model) -> int:
    """Bytes of parameters this process holds: its shards under FSDP, the whole model otherwise."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total


def node_layout() -> tuple[int, int]:
    """(this node's rank, number of nodes) under torchrun; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return int(os.environ.get("GROUP_RANK", "0")), max(1, world // max(1, per_node))


def all_agree(ok: bool) -> bool:
    """True only if every process says ok (a collective; just ok outside a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
