"""Prompts and answers of instruction data: templates, records, and what a generated answer means.

A prompt is built from data.template (`alpaca`: the Stanford Alpaca prompt) with {instruction} and
{input}; the answer follows it (built by kubetune_serving.prompts.build_prompt, so a registered model
builds the prompts it was trained on without kubetune). Greedy answers are read the way a person
would grade them: the first line, normalised (case, surrounding punctuation), must equal or name
exactly one member of a closed answer set (labels, yes/no), or equal a short expected answer.
"""

from __future__ import annotations

import re
import string
from typing import Any, Iterable, Iterator, Optional

from kubetune_serving import prompts as served_prompts

from kubetune.errors import ConfigError
from kubetune.sources import text_of

#: Task name of general-text (replay) records; the progressive schedule starts from them.
GENERAL_TASK = "general"
#: Answers from at most this many distinct values (each seen at least twice on average) are a
#: closed answer set: greedy answers are then scored for accuracy.
MAX_ANSWER_SET = 20
#: Short answers (at most this many words) are also scored by exact match when no answer set applies.
SHORT_ANSWER_WORDS = 3


def check_template(template: str) -> None:
    """A custom template may use {instruction} and {input}, nothing else."""
    if template == "alpaca":
        return
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError("data.template", template, f"not a valid format string ({exc}); write literal braces "
                          "as {{ and }}") from None
    unknown = sorted(names - {"instruction", "input"})
    if unknown:
        raise ConfigError("data.template", template, f"unknown placeholder {{{unknown[0]}}}; a template may use "
                          "{instruction} and {input}, or be `alpaca`")
    if not names:
        raise ConfigError("data.template", template, "the template uses neither {instruction} nor {input}; "
                          "e.g. \"{instruction}\\n{input}\\nAnswer:\\n\"")


def build_prompt(template: str, instruction: str, input_text: str) -> str:
    """The prompt the answer follows. `alpaca` is the Stanford Alpaca prompt, with its input block
    only when there is an input."""
    return served_prompts.build_prompt(template, instruction, input_text)


def _norm(text: str) -> str:
    return text.strip().lower().strip(" \t.,;:!?\"'`()[]{}*")


def first_line(text: str) -> str:
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def match_answer(generated: str, answer_set: list[str]) -> Optional[str]:
    """The member of answer_set a generated answer means, or None.

    Normalised (stripped, lower case, surrounding punctuation dropped), the first line must equal a
    member or name exactly one (as whole words; "not suitable" counts once, not also as
    "suitable"). A line naming two ("positive or negative") means neither.
    """
    line = _norm(first_line(generated))
    members = {_norm(answer): answer for answer in answer_set}
    if line in members:
        return members[line]
    named = [key for key in members if key and re.search(rf"(?<!\w){re.escape(key)}(?!\w)", line)]
    named = [key for key in named if not any(key != other and key in other for other in named)]
    return members[named[0]] if len(named) == 1 else None


def exact_match(generated: str, expected: str) -> bool:
    return _norm(first_line(generated)) == _norm(first_line(expected))


class AnswerSet:
    """Counts answers one at a time and keeps their distinct values only while they can still form a
    closed answer set, so a million free-text answers cost no memory."""

    def __init__(self, min_rows: int = 4):
        self.min_rows, self.rows, self.distinct = min_rows, 0, set()
        self.open = False  # more distinct answers than a closed set has

    def add(self, answer: str) -> None:
        self.rows += 1
        if not self.open:
            self.distinct.add(answer)
            self.open = len(self.distinct) > MAX_ANSWER_SET

    def closed(self) -> Optional[list[str]]:
        """The sorted distinct answers when they form a small closed set (labels, yes/no), else None."""
        if self.open or not self.distinct:
            return None
        if self.rows >= self.min_rows and self.rows >= 2 * len(self.distinct):
            return sorted(self.distinct)
        return None


def closed_answer_set(answers: Iterable[str], min_rows: int = 4) -> Optional[list[str]]:
    """The sorted distinct answers when they form a small closed set (labels, yes/no), else None."""
    counted = AnswerSet(min_rows)
    for answer in answers:
        counted.add(answer)
    return counted.closed()


def is_short(answer: str) -> bool:
    return 0 < len(answer.split()) <= SHORT_ANSWER_WORDS and "\n" not in answer.strip()


def instances(located: Iterable[tuple[dict[str, Any], str]]) -> Iterator[tuple[dict[str, Any], str]]:
    """Self-instruct records (one task, `instances: [{input, output}, ...]`) as one record per
    instance, each carrying the task's other fields (name, instruction, ...), and where each came from."""
    for row, at in located:
        found = row.get("instances")
        if isinstance(found, list):
            common = {k: v for k, v in row.items() if k != "instances"}
            for number, inst in enumerate(found, start=1):
                if isinstance(inst, dict):
                    yield {**common, **inst}, f"{at} instance {number}"
        else:
            yield row, at


class Expanded:
    """Records with self-instruct instances expanded, read lazily: every loop is a new pass over the
    records it wraps (a list, or a staged source read from disk)."""

    def __init__(self, rows: Iterable[dict[str, Any]]):
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (row for row, _ in instances((row, "") for row in self.rows))


def field_text(value: Any) -> str:
    """A field of a record as stripped text; a missing, null or NaN field is empty."""
    return text_of(value)
