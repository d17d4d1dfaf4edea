"""Instruction examples as token ids: [prompt | answer | EOS], with the loss on the answer only.

The prompt's labels are IGNORE_INDEX, so the model learns to answer, not to repeat the prompt. An
example longer than data.max_length loses prompt tokens from the start (after BOS), so the answer
and the cue just before it survive.
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune.errors import DataError
from kubetune.tasks.base import IGNORE_INDEX, first_labelled

log = logging.getLogger(__name__)


def encode_answers(records: list[dict[str, Any]], tokenizer, max_length: int) -> dict[str, list]:
    """[prompt ids (with BOS) | answer ids | EOS]; labels IGNORE_INDEX on the prompt.

    Longer than max_length: the prompt loses tokens from its start (after BOS) so the answer and
    the cue just before it survive; an answer that leaves less than a quarter of max_length for the
    prompt drops the example. General text (empty prompt) is truncated at its end.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("model.name_or_path", getattr(tokenizer, "name_or_path", "?"),
                        "the tokenizer has no EOS token; instruction tuning needs one to end answers")
    eos = tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    prompts = tokenizer([row["prompt"] for row in records], add_special_tokens=True)["input_ids"]
    answers = tokenizer([row["answer"] for row in records], add_special_tokens=False)["input_ids"]
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "answer": [], "task": []}
    dropped = truncated = 0
    limit = max_length
    for row, prompt, answer in zip(records, prompts, answers):
        prefix = 0
        while prefix < len(prompt) and prompt[prefix] in special:
            prefix += 1
        while len(prompt) > prefix and prompt[-1] in special:  # tokenizers that also append EOS
            prompt = prompt[:-1]
        if not row["prompt"]:  # general text: the whole text is the answer
            if len(prompt) + len(answer) + 1 > limit:
                answer, truncated = answer[: limit - len(prompt) - 1], truncated + 1
        else:
            room = limit - len(answer) - 1
            if room < min(len(prompt), max(prefix + 1, limit // 4)) or not answer:
                dropped += 1
                continue
            if len(prompt) > room:
                prompt, truncated = prompt[:prefix] + prompt[len(prompt) - (room - prefix):], truncated + 1
        ids = prompt + answer + [eos]
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append([IGNORE_INDEX] * len(prompt) + answer + [eos])
        columns["answer"].append(row["answer"])
        columns["task"].append(str(row.get("task") or ""))
    if dropped or truncated:  # per batch: tokenize logs the split's totals
        log.debug("encode: %d of %d examples dropped (answer too long for data.max_length %d), %d truncated",
                 dropped, len(records), limit, truncated)
    return columns


def answer_start(row: dict[str, Any]) -> int:
    """Where the answer evaluation generates starts: the row's `answer_start` (a chat row's last
    answer), else its first labelled token."""
    if row.get("answer_start") is not None:
        return int(row["answer_start"])
    return first_labelled(row["labels"])


def prompt_ids(row: dict[str, Any]) -> list[int]:
    """The prompt as the model saw it in training (after any truncation): tokens before the answer."""
    return list(row["input_ids"][: answer_start(row)])


def answer_tokens(row: dict[str, Any]) -> int:
    """Labelled tokens of the answer evaluation generates."""
    return sum(label != IGNORE_INDEX for label in row["labels"][answer_start(row):])


class AnswerCollator:
    """Pads on the right: input_ids with the pad id, attention_mask with 0, labels with IGNORE_INDEX.
    Reads only those three columns, so string columns (answer, task) never reach it as tensors."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]):
        import torch

        width = max(len(f["input_ids"]) for f in features)

        def padded(key: str, value: int):
            return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

        return {"input_ids": padded("input_ids", self.pad_token_id), "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", IGNORE_INDEX)}
