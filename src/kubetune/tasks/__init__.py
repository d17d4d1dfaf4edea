"""Task kinds: what differs between causal LM, classification, instruction, multitask and chat tuning.

The pipeline stages are the same for every kind; each stage asks the run's TaskKind for the parts
that differ (kubetune.tasks.base lists them). KINDS is the one list of kinds: the config's `task`
names one of them (kubetune.run_config checks it and the kind's own rules). Adding a kind: subclass
TaskKind, add it to KINDS and describe it in the help of kubetune.config.RunConfig.task (a test
checks the help names every kind).
"""

from __future__ import annotations

from kubetune.errors import ConfigError
from kubetune.tasks.base import TaskKind
from kubetune.tasks.causal_lm import CausalLM
from kubetune.tasks.chat import Chat
from kubetune.tasks.classification import Classification
from kubetune.tasks.instruction import Instruction, Multitask

KINDS: dict[str, type[TaskKind]] = {kind.name: kind for kind in (CausalLM, Classification, Instruction, Multitask,
                                                                    Chat)}


def get_task(name: str) -> TaskKind:
    if name not in KINDS:
        raise ConfigError("task", name, f"use one of {', '.join(sorted(KINDS))}")
    return KINDS[name]()


__all__ = ["KINDS", "TaskKind", "get_task"]
