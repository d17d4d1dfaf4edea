"""instruction and multitask: prompt -> answer tuning, with the loss on the answer tokens only.

Records are {"prompt": str, "answer": str} (+ "task" for multitask). prepare_data builds the
prompt from data.template, so the prepared train split shows exactly what the model reads;
tokenize appends the answer and EOS and masks every prompt token (labels IGNORE_INDEX), so the
model learns to answer, not to repeat the prompt (kubetune.tasks.answer_tokens).

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
from typing import Any, Iterable, Iterator, Optional

from kubetune.config import DataConfig, EvaluateConfig, RunConfig
from kubetune.errors import ConfigError, DataError
from kubetune.sources import field_names, label_names_beside, require_fields
from kubetune.tasks.answer_metrics import answer_metrics, loss_metrics, per_task_scores, task_metrics
from kubetune.tasks.answer_tokens import AnswerCollator, answer_tokens, encode_answers, prompt_ids
from kubetune.tasks.base import Completion, Evaluation, Scores, TaskKind, label_text, require_label_field
from kubetune.tasks.prompts import (GENERAL_TASK, AnswerSet, Expanded, build_prompt, check_template, closed_answer_set,
                                    field_text, instances, is_short)
from kubetune.tasks.schedule import training_order

log = logging.getLogger(__name__)

#: Greedy answers scored against a short expected answer get this many tokens beyond the longest
#: answer, so "Positive." or "The answer is yes" can still match.
ANSWER_SLACK_TOKENS = 6


class Instruction(TaskKind):
    name = "instruction"
    peft_task_type = "CAUSAL_LM"
    labelled_tail = True
    retrieval = True
    headline_metrics = ("eval/base_perplexity", "eval/tuned_perplexity", "eval/perplexity_change_pct",
                        "eval/base_answer_accuracy", "eval/tuned_answer_accuracy")

    record_columns = {"prompt": "string", "answer": "string", "task": "string"}

    def check_config(self, cfg: RunConfig) -> None:
        require_label_field(cfg, "answer")

    # ---- prepare_data -------------------------------------------------------------------------
    def expand(self, located: Iterable[tuple[dict[str, Any], str]]) -> Iterator[tuple[dict[str, Any], str]]:
        return instances(located)

    def required_fields(self, cfg: DataConfig) -> list[tuple[str, str]]:
        """The answer, and the instruction (or, under one fixed data.instruction, the text); the
        input field may be empty (Alpaca's records without input)."""
        prompt = ("data.text_field", cfg.text_field) if cfg.instruction is not None else \
            ("data.instruction_field", cfg.instruction_field)
        return [prompt, ("data.label_field", cfg.label_field)]

    def check_fields(self, rows: Iterable[dict[str, Any]], cfg: DataConfig) -> None:
        check_template(cfg.template)
        rows = Expanded(rows)
        fields = set(field_names(rows))
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
        # else TweetEval's mapping.txt beside the data
        return cfg.label_names or label_names_beside(cfg.path)

    def _fields(self, row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> tuple[str, str, str]:
        if cfg.instruction is not None:
            instruction, input_text = cfg.instruction.strip(), field_text(row.get(cfg.text_field))
        else:
            instruction = field_text(row.get(cfg.instruction_field))
            input_text = field_text(row.get(cfg.input_field)) if cfg.input_field else ""
        answer = label_text(row.get(cfg.label_field), cfg)
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

    def normalise(self, rows: list[dict[str, Any]], cfg: DataConfig, whole: bool = True) -> list[dict[str, Any]]:
        names = self.label_names(cfg)
        out = [rec for rec in (self.record(row, cfg, names) for row in Expanded(rows)) if rec is not None]
        if not out and whole:
            raise DataError("data.label_field", cfg.label_field, "no record has both a prompt and an answer; check "
                            "data.label_field and the instruction/input fields")
        return out

    def replay_record(self, text: str) -> dict[str, Any]:
        """General text as a record with an empty prompt: every token is learned, like causal_lm."""
        return {"prompt": "", "answer": text, "task": GENERAL_TASK}

    # ---- tokenize -----------------------------------------------------------------------------
    def info(self, train: Iterable[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
        answer_set = closed_answer_set(row["answer"] for row in train if row.get("task") != GENERAL_TASK)
        return {"answer_set": answer_set} if answer_set else {}

    def encode(self, records: list[dict[str, Any]], tokenizer, cfg: DataConfig,
               info: dict[str, Any], whole: bool = True) -> dict[str, list]:
        columns = encode_answers(records, tokenizer, cfg.max_length)
        if whole and records and not columns["input_ids"]:
            raise self.none_encoded(len(records), cfg)
        return columns

    def none_encoded(self, records: int, cfg: DataConfig) -> Optional[Exception]:
        return DataError("data.max_length", cfg.max_length, f"every one of {records} answers is too long to fit with "
                         "its prompt; raise data.max_length")

    # ---- train --------------------------------------------------------------------------------
    def collator(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return AnswerCollator(pad)

    def task_weights(self, cfg: RunConfig) -> dict[str, float]:
        """Sampling weight by task name (1.0 for a task not named)."""
        return {}

    def train_order(self, dataset, cfg: RunConfig) -> Optional[list[int]]:
        """Task weights and the progressive schedule (kubetune.tasks.schedule); read in order."""
        if cfg.train.schedule != "progressive" and all(w == 1.0 for w in self.task_weights(cfg).values()):
            return None  # plain shuffling: no need to read a task name per row
        names, codes = task_codes(dataset)
        return training_order(names, codes, self.task_weights(cfg), cfg)

    # ---- evaluate -----------------------------------------------------------------------------
    def heldout_rows(self, dataset, tokenizer, cfg: EvaluateConfig) -> list[dict[str, Any]]:
        subset = dataset.select(range(min(cfg.max_samples, len(dataset))))
        return [subset[i] for i in range(len(subset))]

    def scored_answer_set(self, row: dict[str, Any], info: dict[str, Any]) -> Optional[list[str]]:
        return info.get("answer_set")

    def completions(self, rows: list[dict[str, Any]], info: dict[str, Any], tokenizer,
                    cfg: EvaluateConfig) -> list[Completion]:
        """Every row scored for accuracy or exact match (a short budget), then the first
        evaluate.num_generations rows as samples (the full budget)."""
        scored = sorted(i for i, row in enumerate(rows) if self.scored_answer_set(row, info) or is_short(row["answer"]))
        samples = sorted(set(range(min(cfg.num_generations, len(rows)))) - set(scored))
        longest = max((answer_tokens(rows[i]) for i in scored), default=0)
        short_budget = min(cfg.max_new_tokens, longest + ANSWER_SLACK_TOKENS)
        return [Completion(row=i, prompt_ids=prompt_ids(rows[i]), max_new_tokens=budget,
                           prompt=tokenizer.decode(prompt_ids(rows[i]), skip_special_tokens=True),
                           labelled_answer=rows[i]["answer"])
                for indices, budget in ((scored, short_budget), (samples, cfg.max_new_tokens)) for i in indices]

    def report(self, rows: list[dict[str, Any]], scores: dict[str, Scores], completions: list[Completion],
               info: dict[str, Any], tokenizer, cfg: EvaluateConfig) -> Evaluation:
        metrics = loss_metrics(rows, scores)
        more, tables = self.answer_report(rows, info, scores)
        metrics.update(more)
        shown = {c.row: c for c in completions if c.row < cfg.num_generations}
        generations = [{"prompt": shown[i].prompt, "expected": rows[i]["answer"], "base": scores["base"].texts[i],
                        "tuned": scores["tuned"].texts[i], **({"task": rows[i]["task"]} if rows[i]["task"] else {})}
                       for i in sorted(shown)]
        return Evaluation(metrics=metrics, generations=generations, tables=tables)

    def answer_report(self, rows: list[dict[str, Any]], info: dict[str, Any],
                      scores: dict[str, Scores]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(metrics, tables for evaluation.json too large to be metrics) from the greedy answers."""
        return answer_metrics(rows, scores, lambda row: self.scored_answer_set(row, info)), {}

    # ---- register -----------------------------------------------------------------------------
    def prompt_format(self, cfg: DataConfig) -> Optional[dict[str, Any]]:
        """A served model builds its prompts from `instruction` / `input` columns as training did."""
        return {"template": cfg.template, "instruction": cfg.instruction}


class Multitask(Instruction):
    name = "multitask"

    def required_fields(self, cfg: DataConfig) -> list[tuple[str, str]]:
        return [*super().required_fields(cfg), ("data.task_field", cfg.task_field)]

    def check_fields(self, rows: Iterable[dict[str, Any]], cfg: DataConfig) -> None:
        super().check_fields(rows, cfg)
        expanded = Expanded(rows)
        require_fields(expanded, cfg, [("data.task_field", cfg.task_field)])
        tasks = {field_text(row.get(cfg.task_field)) for row in expanded}
        unknown = sorted(set(cfg.task_weights or {}) - tasks - {GENERAL_TASK})
        if unknown:
            shown = ", ".join(sorted(tasks)[:15]) + (", ..." if len(tasks) > 15 else "")
            raise DataError(f"data.task_weights.{unknown[0]}", cfg.task_weights[unknown[0]],
                            f"no task of that name in data.task_field {cfg.task_field}; tasks found: {shown}")

    def record(self, row: dict[str, Any], cfg: DataConfig, names: dict[str, str]) -> Optional[dict[str, Any]]:
        record = super().record(row, cfg, names)
        task = field_text(row.get(cfg.task_field))
        if record is None or not task:
            return None
        return {**record, "task": task}

    def info(self, train: Iterable[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
        overall, by_task = AnswerSet(), {}  # one pass: train may be a stream
        for row in train:
            if row["task"] == GENERAL_TASK:  # replayed general text is no task of the data
                continue
            overall.add(row["answer"])
            by_task.setdefault(row["task"], AnswerSet()).add(row["answer"])
        info = {"answer_set": overall.closed()} if overall.closed() else {}
        tasks = {}
        for task, answers in sorted(by_task.items()):
            answer_set = answers.closed()
            tasks[task] = {"train_rows": answers.rows, **({"answer_set": answer_set} if answer_set else {})}
        weights = cfg.task_weights or {}
        info["tasks"] = tasks
        info["task_weights"] = {task: weights.get(task, 1.0) for task in tasks if weights.get(task, 1.0) != 1.0}
        return info

    def task_weights(self, cfg: RunConfig) -> dict[str, float]:
        return {task: float(weight) for task, weight in (cfg.data.task_weights or {}).items()}

    def scored_answer_set(self, row: dict[str, Any], info: dict[str, Any]) -> Optional[list[str]]:
        return info.get("answer_set") or info.get("tasks", {}).get(row["task"], {}).get("answer_set")

    def answer_report(self, rows: list[dict[str, Any]], info: dict[str, Any],
                      scores: dict[str, Scores]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Adds per-task figures: every task in the table, the larger ones also as metrics."""
        metrics, tables = super().answer_report(rows, info, scores)
        per_task = per_task_scores(rows, scores, lambda row: self.scored_answer_set(row, info))
        return {**metrics, **task_metrics(per_task)}, {**tables, "per_task": per_task}


def task_codes(dataset) -> tuple[list[str], Any]:
    """(task names, one code per row into them) of a tokenized split, from Arrow's dictionary
    encoding of its task column, a batch at a time (a split without one: every row task "")."""
    import numpy as np
    import pyarrow.compute as pc

    if "task" not in dataset.column_names:
        return [""], np.zeros(len(dataset), dtype=np.int64)
    names: dict[str, int] = {}
    parts = []
    for batch in dataset.select_columns(["task"]).with_format("arrow").iter(batch_size=100_000):
        encoded = pc.dictionary_encode(pc.fill_null(batch["task"], "")).combine_chunks()
        local = [names.setdefault(name, len(names)) for name in encoded.dictionary.to_pylist()]
        parts.append(np.asarray(local, dtype=np.int64)[encoded.indices.to_numpy(zero_copy_only=False)])
    return list(names), np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
