"""Task kinds: what differs between causal LM, classification, instruction and multitask tuning.

The pipeline stages are the same for every kind; each stage asks the run's TaskKind for the parts
that differ (record schema, encoding, model class, collator, metrics).
"""

from __future__ import annotations

from kubetune.tasks.base import TaskKind


def get_task(name: str) -> TaskKind:
    from kubetune.errors import ConfigError

    kinds = _kinds()
    if name not in kinds:
        raise ConfigError("task", name, f"use one of {', '.join(sorted(kinds))}")
    return kinds[name]()


def _kinds() -> dict[str, type[TaskKind]]:
    from kubetune.tasks.causal_lm import CausalLM
    from kubetune.tasks.classification import Classification
    from kubetune.tasks.instruction import Instruction, Multitask

    return {"causal_lm": CausalLM, "classification": Classification, "instruction": Instruction,
            "multitask": Multitask}


__all__ = ["TaskKind", "get_task"]
