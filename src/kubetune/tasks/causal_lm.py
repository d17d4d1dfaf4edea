"""causal_lm: continue pre-training on plain text (the quotes demo). All defaults of TaskKind."""

from kubetune.tasks.base import TaskKind


class CausalLM(TaskKind):
    name = "causal_lm"
