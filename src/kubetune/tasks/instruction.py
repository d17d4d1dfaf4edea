"""instruction and multitask: prompt -> answer tuning, with the loss on the answer tokens only.

Records are {"prompt": str, "answer": str} (+ "task" for multitask). prepare_data builds the
prompt from data.template, so train.jsonl shows exactly what the model reads; tokenize appends the
answer and EOS and masks every prompt token (labels -100), so the model learns to answer, not to
repeat the prompt.

Two record forms are read:
- Alpaca-style: the instruction in data.instruction_field, an optional input in data.input_field,
  the answer in data.label_field (Alpaca: output; GPTeacher: response).
- The guide's form: no instruction field; data.instruction is one fixed instruction ("Classify the
  sentiment of this review as positive or negative."), the input comes from data.text_field and
  the answer is the label, named through data.label_names ({0: negative, 1: positive}).
Self-instruct seed tasks (one record per task, `instances: [{input, output}]`) are expanded into one
record per instance first.

multitask adds a task name per record (data.task_field), per-task sampling weights
(data.task_weights, applied to the training split only, at train time) and per-task held-out
metrics. Both kinds take general text (data.replay_path) as records with an empty prompt, and can
order training progressively (train.schedule: progressive): general text first, the tasks ramped in.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import string
from typing import Any, Iterator, Optional

from kubetune.config import ALPACA_TEMPLATE, DataConfig, RunConfig
from kubetune.errors import ConfigError, DataError
from kubetune.tasks.base import TaskKind

log = logging.getLogger(__name__)

#: Task name of general-text (replay) records; the progressive schedule starts from them.
GENERAL_TASK = "general"
ALPACA_INPUT_CLAUSE = ", paired with an input that provides further context"
#: Answers from at most this many distinct values (each seen at least twice on average) are a
#: closed answer set: greedy answers are then scored for accuracy.
MAX_ANSWER_SET = 20
#: multitask: a task gets its own eval.task.<name>.* metrics with at least this many held-out
#: examples; at most MAX_TASK_METRICS tasks (the largest) are logged one by one, all go into the
#: macro averages.
MIN_TASK_EXAMPLES = 2
MAX_TASK_METRICS = 20
#: Short answers (at most this many words) are also scored by exact match when no answer set applies.
SHORT_ANSWER_WORDS = 3
#: progressive: the general share falls from 1 to data.replay_fraction over this share of the run.
PROGRESSIVE_RAMP = 0.5
IGNORE_INDEX = -100


# ---- prompts and answers --------------------------------------------------------------------------


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
    if template == "alpaca":
        if input_text:
            return ALPACA_TEMPLATE.format(instruction=instruction, input_clause=ALPACA_INPUT_CLAUSE,
                                          input_block=f"### Input:\n{input_text}\n\n")
        return ALPACA_TEMPLATE.format(instruction=instruction, input_clause="", input_block="")
    return template.format(instruction=instruction, input=input_text)


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


def closed_answer_set(answers: list[str], min_rows: int = 4) -> Optional[list[str]]:
    """The sorted distinct answers when they form a small closed set (labels, yes/no), else None."""
    distinct = sorted(set(answers))
    if len(answers) >= min_rows and 1 <= len(distinct) <= MAX_ANSWER_SET and len(answers) >= 2 * len(distinct):
        return distinct
    return None


def metric_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", task)[:100] or "_"


# ---- records ----------------------------------------------------------------------------------------


def expand_instances(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Self-instruct records (one task, `instances: [{input, output}, ...]`) as one record per
    instance, each carrying the task's other fields (name, instruction, ...)."""
    out = []
    for row in rows:
        instances = row.get("instances")
        if isinstance(instances, list):
            common = {k: v for k, v in row.items() if k != "instances"}
            out.extend({**common, **inst} for inst in instances if isinstance(inst, dict))
        else:
            out.append(row)
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


class Instruction(TaskKind):
    name = "instruction"
    peft_task_type = "CAUSAL_LM"

    # ---- prepare_data -------------------------------------------------------------------------
    def check_fields(self, rows: list[dict[str, Any]], cfg: DataConfig) -> None:
        from kubetune.data import require_fields

        check_template(cfg.template)
        rows = expand_instances(rows)
        fields = {key for row in rows[:100] for key in row}
        if cfg.instruction is not None:
            if not cfg.instruction.strip():
                raise ConfigError("data.instruction", cfg.instruction, "give the instruction text, or null to read "
                                  "it from data.instruction_field")
            require_fields(rows, cfg, [("data.text_field", cfg.text_field)])
        else:
            if cfg.input_field is not None and cfg.input_field not in fields:
                raise DataError("data.input_field", cfg.input_field,
                                f"not a field of the data (fields found: {', '.join(sorted(fields))}); name the "
                                "input field, or set data.input_field: null if the records have none")
            if cfg.instruction_field not in fields:
                raise DataError("data.instruction_field", cfg.instruction_field,
                                f"not a field of the data (fields found: {', '.join(sorted(fields))}); name the "
                                "instruction field, or set data.instruction to one fixed instruction and "
                                "data.text_field to the input (the guide's form)")
            require_fields(rows, cfg, [("data.instruction_field", cfg.instruction_field)])
        require_fields(rows, cfg, [("data.label_field", cfg.label_field)])

    def label_names(self, cfg: DataConfig) -> dict[str, str]:
        if cfg.label_names:
            return cfg.label_names
        from kubetune.data import label_names_beside  # TweetEval's mapping.txt beside the data

        return label_names_beside(cfg.path)

    def _fields(self, row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> tuple[str, str, str]:
        if cfg.instruction is not None:
            instruction, input_text = cfg.instruction.strip(), _text(row.get(cfg.text_field))
        else:
            instruction = _text(row.get(cfg.instruction_field))
            input_text = _text(row.get(cfg.input_field)) if cfg.input_field else ""
        answer = _text(row.get(cfg.label_field))
        if names and answer:
            if answer not in names:
                raise DataError("data.label_names", names, f"label {answer!r} (data.label_field "
                                f"{cfg.label_field}) has no name; add it, e.g. {{{answer}: ...}}")
            answer = names[answer]
        return instruction, input_text, answer

    def record(self, row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> Optional[dict[str, Any]]:
        instruction, input_text, answer = self._fields(row, cfg, names)
        if not answer or not (instruction or input_text):
            return None
        return {"prompt": build_prompt(cfg.template, instruction, input_text), "answer": answer}

    def normalise(self, rows: list[dict[str, Any]], cfg: DataConfig) -> list[dict[str, Any]]:
        names = self.label_names(cfg)
        out = [rec for rec in (self.record(row, cfg, names) for row in expand_instances(rows)) if rec is not None]
        if not out:
            raise DataError("data.label_field", cfg.label_field, "no record has both a prompt and an answer; check "
                            "data.label_field and the instruction/input fields")
        return out

    def info(self, train: list[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
        answers = [row["answer"] for row in train if row.get("task") != GENERAL_TASK]
        answer_set = closed_answer_set(answers)
        return {"answer_set": answer_set} if answer_set else {}

    def replay_record(self, text: str) -> dict[str, Any]:
        """General text as a record with an empty prompt: every token is learned, like causal_lm."""
        return {"prompt": "", "answer": text, "task": GENERAL_TASK}

    # ---- tokenize -----------------------------------------------------------------------------
    def encode(self, records: list[dict[str, Any]], tokenizer, cfg: DataConfig,
               info: dict[str, Any]) -> dict[str, list]:
        """[prompt ids (with BOS) | answer ids | EOS]; labels -100 on the prompt.

        Longer than data.max_length: the prompt loses tokens from its start (after BOS) so the answer
        and the cue just before it survive; an answer that leaves less than a quarter of max_length
        for the prompt drops the example. General text (empty prompt) is truncated at its end.
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
        limit = cfg.max_length
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
        if records and not columns["input_ids"]:
            raise DataError("data.max_length", cfg.max_length, f"every one of {len(records)} answers is too long to "
                            "fit with its prompt; raise data.max_length")
        if dropped or truncated:
            log.info("encode: %d of %d examples dropped (answer too long for data.max_length %d), %d truncated",
                     dropped, len(records), limit, truncated)
        return columns

    # ---- train --------------------------------------------------------------------------------
    def collator(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return AnswerCollator(pad)

    def row_weights(self, tasks: list[str], cfg: RunConfig) -> list[float]:
        return [1.0] * len(tasks)

    def train_order(self, dataset, cfg: RunConfig) -> Optional[list[int]]:
        """Indices of the tokenized train split in the order training reads them, or None to let
        the Trainer shuffle. Read them in order (a sequential sampler): they are already shuffled
        with train.seed, weighted (multitask) and, for the progressive schedule, ramped."""
        tasks = list(dataset["task"]) if "task" in dataset.column_names else [""] * len(dataset)
        weights = self.row_weights(tasks, cfg)
        progressive = cfg.train.schedule == "progressive"
        if not progressive and len(set(weights)) <= 1:
            return None
        if sum(weights) <= 0:
            raise DataError("data.task_weights", cfg.data.task_weights, "every training task has weight 0; give "
                            "at least one a positive weight")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        length = cfg.train.max_steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world
        rng = random.Random(cfg.train.seed)
        general = [i for i, task in enumerate(tasks) if task == GENERAL_TASK and weights[i] > 0]
        own = [i for i, task in enumerate(tasks) if task != GENERAL_TASK and weights[i] > 0]
        if not progressive or not general or not own:
            if progressive:
                log.warning("train.schedule progressive: the training split holds no %s rows (set "
                            "data.replay_fraction above 0); training on the tasks as mixed",
                            "general-text" if not general else "task")
            order = weighted_pass([i for i in range(len(tasks)) if weights[i] > 0], weights, rng,
                                  max(length, len(tasks)))
        else:
            order = progressive_order(general, own, weights, rng, length, cfg.data.replay_fraction)
        log.info("train order (%s): %d rows, by task %s", cfg.train.schedule, len(order),
                 _counts([tasks[i] for i in order], limit=12))
        return order

    # ---- evaluate -----------------------------------------------------------------------------
    def evaluate(self, base_model, tuned_model, tokenizer, dataset, info: dict[str, Any],
                 cfg: RunConfig) -> dict[str, Any]:
        subset = dataset.select(range(min(cfg.evaluate.max_samples, len(dataset))))
        rows = [subset[i] for i in range(len(subset))]
        plan = self.generation_plan(rows, info, cfg)
        scores = score_variants(base_model, tuned_model, tokenizer, rows, plan, cfg)
        metrics = loss_metrics(rows, scores)
        answer_metrics, tables = self.answer_figures(rows, info, scores)
        metrics.update(answer_metrics)
        generations = [{"prompt": tokenizer.decode(prompt_ids(row), skip_special_tokens=True),
                        "expected": row["answer"], "base": scores["base"]["texts"][i],
                        "tuned": scores["tuned"]["texts"][i], **({"task": row["task"]} if row["task"] else {})}
                       for i, row in enumerate(rows) if i in plan["samples"]]
        log.info("evaluate: answer-token loss %.3f -> %.3f on %d examples; %s", metrics["eval.base_loss"],
                 metrics["eval.tuned_loss"], len(rows),
                 ", ".join(f"{k} {v}" for k, v in metrics.items() if k.count(".") == 1 and ("accuracy" in k or
                                                                                           "exact_match" in k)))
        return {"metrics": metrics, "generations": generations, **tables}

    def scored_answer_set(self, row: dict[str, Any], info: dict[str, Any]) -> Optional[list[str]]:
        return info.get("answer_set")

    def generation_plan(self, rows: list[dict[str, Any]], info: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
        """Which held-out rows are completed by both models: every row scored for accuracy or exact
        match (with a short budget), plus the first evaluate.num_generations as samples."""
        scored = {i for i, row in enumerate(rows) if self.scored_answer_set(row, info) or _short(row["answer"])}
        samples = set(range(min(cfg.evaluate.num_generations, len(rows))))
        return {"scored": scored, "samples": samples}

    def answer_figures(self, rows: list[dict[str, Any]], info: dict[str, Any],
                       scores: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(metrics, tables for evaluation.json too large to be metrics) from the greedy answers:
        accuracy where the answers form a closed set; exact match of the first line for the other
        short answers (a word or three: yes/no, a number, a name)."""
        metrics: dict[str, Any] = {}
        answer_set_of = lambda row: self.scored_answer_set(row, info)  # noqa: E731
        closed = [i for i, row in enumerate(rows) if answer_set_of(row)]
        if closed:
            for name in ("base", "tuned"):
                metrics[f"eval.{name}_answer_accuracy"] = accuracy(rows, closed, scores[name]["texts"], answer_set_of)
            metrics["eval.answer_accuracy_samples"] = len(closed)
        short = [i for i, row in enumerate(rows) if _short(row["answer"]) and not answer_set_of(row)]
        if short:
            for name in ("base", "tuned"):
                texts = scores[name]["texts"]
                metrics[f"eval.{name}_short_answer_exact_match"] = round(
                    sum(exact_match(texts[i], rows[i]["answer"]) for i in short) / len(short), 4)
            metrics["eval.short_answer_samples"] = len(short)
        return metrics, {}


class Multitask(Instruction):
    name = "multitask"

    def check_fields(self, rows: list[dict[str, Any]], cfg: DataConfig) -> None:
        from kubetune.data import require_fields

        super().check_fields(rows, cfg)
        expanded = expand_instances(rows)
        require_fields(expanded, cfg, [("data.task_field", cfg.task_field)])
        tasks = {_text(row.get(cfg.task_field)) for row in expanded}
        unknown = sorted(set(cfg.task_weights or {}) - tasks - {GENERAL_TASK})
        if unknown:
            shown = ", ".join(sorted(tasks)[:15]) + (", ..." if len(tasks) > 15 else "")
            raise DataError(f"data.task_weights.{unknown[0]}", cfg.task_weights[unknown[0]],
                            f"no task of that name in data.task_field {cfg.task_field}; tasks found: {shown}")

    def record(self, row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> Optional[dict[str, Any]]:
        record = super().record(row, cfg, names)
        task = _text(row.get(cfg.task_field))
        if record is None or not task:
            return None
        return {**record, "task": task}

    def info(self, train: list[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
        info = super().info(train, cfg)
        by_task: dict[str, list[str]] = {}
        for row in train:
            by_task.setdefault(row["task"], []).append(row["answer"])
        tasks = {}
        for task, answers in sorted(by_task.items()):
            answer_set = closed_answer_set(answers)
            tasks[task] = {"train_rows": len(answers), **({"answer_set": answer_set} if answer_set else {})}
        weights = cfg.task_weights or {}
        info["tasks"] = tasks
        info["task_weights"] = {task: weights.get(task, 1.0) for task in tasks if weights.get(task, 1.0) != 1.0}
        return info

    def row_weights(self, tasks: list[str], cfg: RunConfig) -> list[float]:
        weights = cfg.data.task_weights or {}
        return [float(weights.get(task, 1.0)) for task in tasks]

    def scored_answer_set(self, row: dict[str, Any], info: dict[str, Any]) -> Optional[list[str]]:
        return info.get("answer_set") or info.get("tasks", {}).get(row["task"], {}).get("answer_set")

    def answer_figures(self, rows: list[dict[str, Any]], info: dict[str, Any],
                       scores: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Adds per-task figures: every task in the table, the larger ones also as metrics."""
        metrics, tables = super().answer_figures(rows, info, scores)
        per_task = per_task_scores(rows, scores, lambda row: self.scored_answer_set(row, info))
        return {**metrics, **task_metrics(per_task)}, {**tables, "per_task": per_task}


# ---- collation and ordering -----------------------------------------------------------------------


class AnswerCollator:
    """Pads on the right: input_ids with the pad id, attention_mask with 0, labels with -100.
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


def weighted_pass(indices: list[int], weights: list[float], rng: random.Random, length: int) -> list[int]:
    """About `length` indices, each row repeated in proportion to its weight (stochastic rounding
    of the expected count, so the mixture is close to exact), shuffled."""
    total = sum(weights[i] for i in indices)
    out = []
    for i in indices:
        expected = weights[i] * length / total
        copies = int(expected) + (rng.random() < expected - int(expected))
        out.extend([i] * copies)
    rng.shuffle(out)
    return out


def _cycle(indices: list[int], weights: list[float], rng: random.Random) -> Iterator[int]:
    while True:  # weighted passes of about len(indices) rows each, reshuffled every pass
        yield from weighted_pass(indices, weights, rng, len(indices))


def progressive_order(general: list[int], own: list[int], weights: list[float], rng: random.Random,
                      length: int, final_general_share: float) -> list[int]:
    """The guide's progressive schedule over a run of `length` examples: general text only at
    first; its share falls linearly to final_general_share (data.replay_fraction) by
    PROGRESSIVE_RAMP of the run and stays there."""
    general_rows, own_rows = _cycle(general, weights, rng), _cycle(own, weights, rng)
    order = []
    for position in range(length):
        progress = min(1.0, position / max(1.0, PROGRESSIVE_RAMP * length))
        share = 1.0 - (1.0 - final_general_share) * progress
        order.append(next(general_rows) if rng.random() < share else next(own_rows))
    return order


def _counts(values: list[str], limit: int) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[value or "-"] = counts.get(value or "-", 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k}={v}" for k, v in top[:limit]) + (f", ... ({len(top)} tasks)" if len(top) > limit else "")


# ---- evaluation -------------------------------------------------------------------------------------


def prompt_ids(row: dict[str, Any]) -> list[int]:
    """The prompt as the model saw it in training (after any truncation): tokens before the answer."""
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    return list(row["input_ids"][:first])


def _short(answer: str) -> bool:
    return 0 < len(answer.split()) <= SHORT_ANSWER_WORDS and "\n" not in answer.strip()


def left_padded(rows: list[dict[str, Any]], pad: int):
    """input_ids, attention_mask, position_ids and labels with the padding on the left, so every
    row's answer ends at the last position (positions count real tokens only, as unpadded)."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    gaps = [width - len(row["input_ids"]) for row in rows]
    input_ids = torch.tensor([[pad] * gap + list(row["input_ids"]) for gap, row in zip(gaps, rows)])
    mask = torch.tensor([[0] * gap + [1] * len(row["input_ids"]) for gap, row in zip(gaps, rows)])
    # nothing precedes a row's first token, so its label is never predicted (as in training's shift)
    labels = torch.tensor([[IGNORE_INDEX] * (gap + 1) + list(row["labels"][1:]) for gap, row in zip(gaps, rows)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions, labels


def answer_losses(model, rows: list[dict[str, Any]], pad: int, batch_size: int) -> list[tuple[float, int, bool]]:
    """(summed cross-entropy, answer tokens, greedy-exact) per row, on the answer tokens only.

    Rows are left-padded so the answers sit at the end and the LM head runs on those positions only
    (logits_to_keep): with Gemma's 262k vocabulary the head costs more than the layers. greedy-exact:
    the argmax at every answer position is the answer token, i.e. greedy decoding reproduces the
    answer and its EOS exactly.
    """
    import torch

    device = next(model.parameters()).device
    out: list[tuple[float, int, bool]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            input_ids, mask, positions, labels = (t.to(device) for t in left_padded(chunk, pad))
            # the answers' positions plus the one before each (it predicts the first answer token)
            longest = max(sum(label != IGNORE_INDEX for label in row["labels"]) for row in chunk)
            keep = min(input_ids.shape[1], longest + 1)
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits[:, -keep:-1].float()
            labels = labels[:, -(keep - 1):]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                       reduction="none")
            exact = ((logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(dim=1)
            out.extend(zip(losses.sum(dim=1).tolist(), (labels != IGNORE_INDEX).sum(dim=1).tolist(), exact.tolist()))
    return out


def generate_batched(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of token-id prompts, left-padded in batches; the new text only."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Stop at the tokenizer's EOS (what training appends) and at whatever the model's own
    # generation config stops at (Gemma: <end_of_turn> too).
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = sorted({tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None})
    texts = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            ids = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=stop)
            texts.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in ids)
    return texts


def score_variants(base_model, tuned_model, tokenizer, rows: list[dict[str, Any]], plan: dict[str, Any],
                   cfg: RunConfig) -> dict[str, Any]:
    """Answer-token losses of every row and greedy answers of the planned rows, for the base and
    the tuned model (each context manager entered once). A row whose greedy answer is already
    known from the scoring pass (greedy-exact) is not generated again."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answer_tokens = max((sum(label != IGNORE_INDEX for label in rows[i]["labels"]) for i in plan["scored"]), default=0)
    # a few tokens beyond the longest answer, so "Positive." or "The answer is yes" can still match
    short_budget = min(cfg.evaluate.max_new_tokens, answer_tokens + 6)
    results = {}
    for name, variant in (("base", base_model), ("tuned", tuned_model)):
        with variant as model:
            losses = answer_losses(model, rows, pad, cfg.evaluate.batch_size)
            texts = [row["answer"] if exact else "" for row, (_, _, exact) in zip(rows, losses)]
            scored = sorted(i for i in plan["scored"] if not losses[i][2])
            samples = sorted(i for i in plan["samples"] - plan["scored"] if not losses[i][2])
            for indices, budget in ((scored, short_budget), (samples, cfg.evaluate.max_new_tokens)):
                if indices:
                    done = generate_batched(model, tokenizer, [prompt_ids(rows[i]) for i in indices], budget,
                                            cfg.evaluate.batch_size)
                    for i, text in zip(indices, done):
                        texts[i] = text
        results[name] = {"losses": [(loss, n) for loss, n, _ in losses], "texts": texts,
                         "greedy_exact": sum(exact for _, _, exact in losses)}
    return results


def _loss(pairs: list[tuple[float, int]]) -> float:
    return sum(loss for loss, _ in pairs) / max(1, sum(n for _, n in pairs))


def _ppl(loss: float) -> float:
    return round(math.exp(min(loss, 50.0)), 4)


def loss_metrics(rows: list[dict[str, Any]], scores: dict[str, Any]) -> dict[str, Any]:
    """Token-weighted answer-token loss and perplexity of both models on the same rows."""
    base, tuned = _loss(scores["base"]["losses"]), _loss(scores["tuned"]["losses"])
    return {"eval.samples": len(rows), "eval.answer_tokens": sum(n for _, n in scores["base"]["losses"]),
            "eval.base_exact_match": round(scores["base"]["greedy_exact"] / max(1, len(rows)), 4),
            "eval.tuned_exact_match": round(scores["tuned"]["greedy_exact"] / max(1, len(rows)), 4),
            "eval.base_loss": round(base, 5), "eval.tuned_loss": round(tuned, 5),
            "eval.base_perplexity": _ppl(base), "eval.tuned_perplexity": _ppl(tuned),
            "eval.perplexity_change_pct": round(100 * (_ppl(tuned) / _ppl(base) - 1), 2)}


def accuracy(rows: list[dict[str, Any]], indices: list[int], texts: list[str], answer_set_of) -> float:
    hits = sum(match_answer(texts[i], answer_set_of(rows[i])) == rows[i]["answer"] for i in indices)
    return round(hits / len(indices), 4)


def per_task_scores(rows: list[dict[str, Any]], scores: dict[str, Any], answer_set_of) -> dict[str, dict[str, float]]:
    """Held-out samples, base/tuned answer loss and perplexity, and answer accuracy (closed answer
    sets) of each task."""
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(row["task"], []).append(i)
    per_task: dict[str, dict[str, float]] = {}
    for task, indices in sorted(by_task.items()):
        values = {"samples": len(indices)}
        for name in ("base", "tuned"):
            loss = _loss([scores[name]["losses"][i] for i in indices])
            values[f"{name}_loss"], values[f"{name}_perplexity"] = round(loss, 5), _ppl(loss)
        closed = [i for i in indices if answer_set_of(rows[i])]
        if closed:
            for name in ("base", "tuned"):
                values[f"{name}_answer_accuracy"] = accuracy(rows, closed, scores[name]["texts"], answer_set_of)
        per_task[task] = values
    return per_task


def task_metrics(per_task: dict[str, dict[str, float]]) -> dict[str, Any]:
    """eval.task.<name>.* for the largest tasks with at least MIN_TASK_EXAMPLES held-out rows, and
    macro averages (every task counts once) over all tasks: eval.task_macro.*."""
    metrics: dict[str, Any] = {"eval.tasks": len(per_task)}
    logged = sorted((t for t in per_task if per_task[t]["samples"] >= MIN_TASK_EXAMPLES),
                    key=lambda t: (-per_task[t]["samples"], t))[:MAX_TASK_METRICS]
    for task in logged:
        metrics.update({f"eval.task.{metric_name(task)}.{k}": v for k, v in per_task[task].items()})
    metrics["eval.tasks_logged"] = len(logged)
    for key in ("base_loss", "tuned_loss", "base_answer_accuracy", "tuned_answer_accuracy"):
        values = [v[key] for v in per_task.values() if key in v]
        if values:
            metrics[f"eval.task_macro.{key}"] = round(sum(values) / len(values), 5)
    return metrics
