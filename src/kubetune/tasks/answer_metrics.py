"""What instruction and multitask runs report: answer-token loss, answer accuracy, exact match, per task.

All figures compare the base and the tuned model on the same held-out rows: the loss on the answer
tokens only (token-weighted), the accuracy of greedy answers where the answers form a closed set
(labels, yes/no), exact match of the first line for other short answers, and for multitask the same
per task plus macro averages in which every task counts once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from kubetune.tasks.base import Scores, change_pct, mean_loss, perplexity
from kubetune.tasks.prompts import exact_match, is_short, match_answer
from kubetune.tracking import metric_key

VARIANTS = ("base", "tuned")
#: multitask: a task gets its own eval.task.<name>.* metrics with at least this many held-out
#: examples; at most MAX_TASK_METRICS tasks (the largest) are logged one by one, all go into the
#: macro averages.
MIN_TASK_EXAMPLES = 2
MAX_TASK_METRICS = 20

AnswerSetOf = Callable[[dict[str, Any]], Optional[list[str]]]


def loss_metrics(rows: list[dict[str, Any]], scores: dict[str, Scores]) -> dict[str, Any]:
    """Token-weighted answer-token loss and perplexity of both models on the same rows, and how
    often greedy decoding reproduces the whole answer."""
    base, tuned = scores["base"], scores["tuned"]
    metrics: dict[str, Any] = {"eval/samples": len(rows), "eval/answer_tokens": sum(n for _, n in base.losses)}
    for name in VARIANTS:
        metrics[f"eval/{name}_exact_match"] = round(sum(scores[name].greedy_exact) / max(1, len(rows)), 4)
    metrics.update({"eval/base_loss": round(base.loss, 5), "eval/tuned_loss": round(tuned.loss, 5),
                    "eval/base_perplexity": perplexity(base.loss), "eval/tuned_perplexity": perplexity(tuned.loss)})
    metrics["eval/perplexity_change_pct"] = change_pct(metrics["eval/base_perplexity"], metrics["eval/tuned_perplexity"])
    return metrics


def accuracy(rows: list[dict[str, Any]], indices: list[int], texts: dict[int, str], answer_set_of: AnswerSetOf) -> float:
    hits = sum(match_answer(texts.get(i, ""), answer_set_of(rows[i])) == rows[i]["answer"] for i in indices)
    return round(hits / len(indices), 4)


def answer_metrics(rows: list[dict[str, Any]], scores: dict[str, Scores], answer_set_of: AnswerSetOf) -> dict[str, Any]:
    """Accuracy where the answers form a closed set; exact match of the first line for the other
    short answers (a word or three: yes/no, a number, a name)."""
    metrics: dict[str, Any] = {}
    closed = [i for i, row in enumerate(rows) if answer_set_of(row)]
    if closed:
        for name in VARIANTS:
            metrics[f"eval/{name}_answer_accuracy"] = accuracy(rows, closed, scores[name].texts, answer_set_of)
        metrics["eval/answer_accuracy_samples"] = len(closed)
    short = [i for i, row in enumerate(rows) if is_short(row["answer"]) and not answer_set_of(row)]
    if short:
        for name in VARIANTS:
            texts = scores[name].texts
            metrics[f"eval/{name}_short_answer_exact_match"] = round(
                sum(exact_match(texts.get(i, ""), rows[i]["answer"]) for i in short) / len(short), 4)
        metrics["eval/short_answer_samples"] = len(short)
    return metrics


def per_task_scores(rows: list[dict[str, Any]], scores: dict[str, Scores],
                    answer_set_of: AnswerSetOf) -> dict[str, dict[str, float]]:
    """Held-out samples, base/tuned answer loss and perplexity, answer accuracy (closed answer sets)
    and exact match (other short answers) of each task."""
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(row["task"], []).append(i)
    per_task: dict[str, dict[str, float]] = {}
    for task, indices in sorted(by_task.items()):
        values = {"samples": len(indices)}
        for name in VARIANTS:
            loss = mean_loss([scores[name].losses[i] for i in indices])
            values[f"{name}_loss"], values[f"{name}_perplexity"] = round(loss, 5), perplexity(loss)
        closed = [i for i in indices if answer_set_of(rows[i])]
        if closed:
            for name in VARIANTS:
                values[f"{name}_answer_accuracy"] = accuracy(rows, closed, scores[name].texts, answer_set_of)
        short = [i for i in indices if is_short(rows[i]["answer"]) and not answer_set_of(rows[i])]
        if short:
            for name in VARIANTS:
                values[f"{name}_short_answer_exact_match"] = round(sum(
                    exact_match(scores[name].texts.get(i, ""), rows[i]["answer"]) for i in short) / len(short), 4)
        per_task[task] = values
    return per_task


def task_metrics(per_task: dict[str, dict[str, float]]) -> dict[str, Any]:
    """eval/task.<name>.* for the largest tasks with at least MIN_TASK_EXAMPLES held-out rows, and
    macro averages (every task counts once) over all tasks: eval.task_macro.*."""
    metrics: dict[str, Any] = {"eval/tasks": len(per_task)}
    logged = sorted((t for t in per_task if per_task[t]["samples"] >= MIN_TASK_EXAMPLES),
                    key=lambda t: (-per_task[t]["samples"], t))[:MAX_TASK_METRICS]
    for task in logged:
        metrics.update({f"eval/task.{metric_key(task)}.{k}": v for k, v in per_task[task].items()})
    metrics["eval/tasks_logged"] = len(logged)
    for key in ("base_loss", "tuned_loss", "base_answer_accuracy", "tuned_answer_accuracy",
                "base_short_answer_exact_match", "tuned_short_answer_exact_match"):
        values = [v[key] for v in per_task.values() if key in v]
        if values:
            metrics[f"eval/task_macro.{key}"] = round(sum(values) / len(values), 5)
    return metrics
