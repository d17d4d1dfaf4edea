"""The answer at a glance: what a run and a registered version say first.

One module writes the headline for every place a person looks: the MLflow run's description
(`mlflow.note.content`, Markdown, shown at the top of the run page), the registered model's and each
version's description, the model card (README.md beside the adapter, in place of PEFT's blank
template) and the console. Each says base against tuned on the task kind's own figures (the
same held-out rows), forgetting where it was measured, the loss in one honest line and, after
register, whether the version became the champion and against what.

The loss line reads the validation loss (first evaluation, then the best) where training
validated, because single training steps are noisy: in the demo (2026-12-07) step 40's training
loss (4.171) is above step 1's (3.809) while the validation loss fell from 3.5406 at step 20 to
3.4355 at step 40, and held-out perplexity from 55.25 to 29.71. Without validation it compares the
mean training loss of the first and the last tenth of the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

#: Figures where lower is better; every other headline figure (accuracy, F1, hit rate) is better higher.
LOWER_IS_BETTER = ("perplexity", "loss")
#: Forgetting's figures, shown after the task kind's own wherever the run measured them.
RETENTION_METRICS = ("eval/retention.base_perplexity", "eval/retention.tuned_perplexity", "eval/forgetting_pct")


def headline_keys(kind_metrics: Sequence[str]) -> tuple[str, ...]:
    """The figures a run leads with, in order: the task kind's, the same with retrieval
    (evaluate.rag) and its hit rate, then forgetting's."""
    retrieved = tuple(f"eval/rag.{key.split('/', 1)[1]}" for key in kind_metrics)
    return (*kind_metrics, *retrieved, "eval/rag.hit_rate", *RETENTION_METRICS)


@dataclass(frozen=True)
class Row:
    """One line of the headline table: a figure of the base and the tuned model on the same rows."""
    label: str
    base: float
    tuned: float
    lower_is_better: bool

    @property
    def better(self) -> Optional[bool]:
        if self.tuned == self.base:
            return None
        return (self.tuned < self.base) == self.lower_is_better

    def change(self) -> str:
        """Relative change for perplexities and losses (−46.2%), points for shares (+12.5 points)."""
        if self.lower_is_better:
            return f"{(self.tuned - self.base) / self.base * 100:+.1f}%" if self.base else "n/a"
        return f"{(self.tuned - self.base) * 100:+.1f} points"


def number(value: Any) -> str:
    """A figure as a person reads it: 4 significant digits, no exponent below a million."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.2e}"


def rows(metrics: dict[str, float], headline: Sequence[str]) -> list[Row]:
    """The base/tuned pairs of the kind's headline figures, then retrieval's and forgetting's."""
    names = [key[len("eval/base_"):] for key in headline if key.startswith("eval/base_")]
    out = []
    for prefix, where in (("eval/", "held-out"), ("eval/rag.", "held-out, with retrieval")):
        for name in names:
            base, tuned = metrics.get(f"{prefix}base_{name}"), metrics.get(f"{prefix}tuned_{name}")
            if base is not None and tuned is not None:
                label = f"{name.replace('_', ' ')} ({where})"
                out.append(Row(label, base, tuned, any(word in name for word in LOWER_IS_BETTER)))
    base, tuned = metrics.get("eval/retention.base_perplexity"), metrics.get("eval/retention.tuned_perplexity")
    if base is not None and tuned is not None:
        out.append(Row("perplexity on general text (forgetting)", base, tuned, True))
    return out


def one_line(metrics: dict[str, float], headline: Sequence[str]) -> str:
    """The headline on one console line: `perplexity (held-out) 55.25 -> 29.71 (-46.2%, better); ...`."""
    return "; ".join(f"{row.label} {number(row.base)} -> {number(row.tuned)} ({row.change()}, "
                     f"{ {True: 'better', False: 'worse', None: 'same'}[row.better]})" for row in rows(metrics, headline))


def table(metrics: dict[str, float], headline: Sequence[str]) -> str:
    """The headline as a Markdown table: figure, base, tuned, change, and whether it is better."""
    found = rows(metrics, headline)
    if not found:
        return ""
    lines = ["| figure | base | tuned | change |", "|---|---:|---:|---|"]
    for row in found:
        verdict = {True: "better", False: "worse", None: "same"}[row.better]
        lines.append(f"| {row.label} | {number(row.base)} | {number(row.tuned)} | {row.change()} ({verdict}) |")
    return "\n".join(lines)


def loss_line(history: Sequence[dict[str, Any]]) -> str:
    """The loss in one line: validation first -> best where training validated, else the mean
    training loss of the first and last tenth of the logged steps."""
    validated = [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row]
    if validated:
        (first_step, first), (best_step, best) = validated[0], min(validated, key=lambda point: point[1])
        if len(validated) == 1:
            return f"validation loss {first:.4f} at step {first_step} (evaluated once)"
        return f"validation loss {first:.4f} at step {first_step} -> best {best:.4f} at step {best_step}"
    losses = [row["loss"] for row in history if "loss" in row]
    if not losses:
        return "no loss was logged"
    window = max(1, len(losses) // 10)
    start, end = sum(losses[:window]) / window, sum(losses[-window:]) / window
    span = "step" if window == 1 else f"{window} steps"
    return f"training loss {start:.4f} over the first {span} -> {end:.4f} over the last {span} (no validation)"


@dataclass(frozen=True)
class Facts:
    """What a run trained: the lines under the headline table (all from the run's lineage and plan)."""
    model_name: str
    task: str
    base_model: str
    technique: str
    trainable_line: str = ""
    data: str = ""
    data_sha256: str = ""

    def lines(self) -> list[str]:
        out = [f"- base model: `{self.base_model}`, tuned with {self.technique} for {self.task}"]
        if self.trainable_line:
            out.append(f"- {self.trainable_line}")
        if self.data:
            digest = f" (sha256 `{self.data_sha256[:16]}`)" if self.data_sha256 else ""
            out.append(f"- data: `{self.data}`{digest}")
        return out


def run_description(summary: "Headline", decision: str = "", links: Sequence[str] = ()) -> str:
    """The MLflow run's description (Markdown): the champion decision and the headline first, then
    what was trained."""
    facts = summary.facts
    parts = [f"**{facts.model_name}**: {facts.task} on `{facts.base_model}` ({facts.technique})", ""]
    if decision:  # first: MLflow folds a long description after its first lines
        parts += [f"**Registry**: {decision}", ""]
    if summary.table:
        parts += [summary.table, ""]
    parts += [f"**Loss**: {summary.loss}", "", *facts.lines()]
    if links:
        parts += ["", " · ".join(links)]
    return "\n".join(parts) + "\n"


def skipped_description(model_name: str, reason: str, data: dict) -> str:
    """The description of a run that when_data_changes ended after preflight."""
    return (f"**{model_name}**: {reason}.\n\nThe data was read and checked ({data.get('rows', '?')} records, "
            f"sha256 `{data.get('sha256', '')[:16]}`); no GPU was asked for. Run without when_data_changes "
            "to train on the same data again (a new base model or new settings).\n")


def version_description(summary: "Headline", decision: str, run_link: str) -> str:
    """A registered version's description: why it is (or is not) the champion, then the headline."""
    parts = [decision, ""]
    if summary.table:
        parts += [summary.table, ""]
    parts += [f"Loss: {summary.loss}", "", *summary.facts.lines(), f"- trained in {run_link}"]
    return "\n".join(parts) + "\n"


def model_description(facts: Facts, metric: str, higher_is_better: bool, champion: Optional[str],
                      champion_score: Optional[str]) -> str:
    """The registered model's description: what its versions are and which one is the champion."""
    name = metric.split("/", 1)[-1].replace("_", " ")
    text = (f"{facts.task} fine-tunes of `{facts.base_model}` by kubetune ({facts.technique}). The `champion` alias "
            f"marks the version with the best {name} on held-out rows ({'higher' if higher_is_better else 'lower'} "
            "is better)")
    if champion is not None:
        text += f": version {champion}" + (f", {name} {number(float(champion_score))}" if champion_score else "")
    return text + ". Each version's description says how it compares."


def model_card(summary: "Headline", decision: str, model_uri: str, serving: str, limits: Sequence[str]) -> str:
    """README.md beside the adapter: written from the run, in place of PEFT's blank template."""
    facts, table_md, loss = summary.facts, summary.table, summary.loss
    parts = [f"# {facts.model_name}", "",
             f"A {facts.technique} fine-tune of `{facts.base_model}` for {facts.task}, trained and registered by "
             "kubetune.", "", "## Training", "", *facts.lines(), f"- loss: {loss}", ""]
    if table_md:
        parts += ["## Results", "", "Base and tuned model on the same held-out rows:", "", table_md, ""]
    if decision:
        parts += [decision, ""]
    parts += ["## Use", "", "```python", "import mlflow, pandas as pd", f'model = mlflow.pyfunc.load_model("{model_uri}")',
              serving, "```", "",
              "It needs mlflow, torch, transformers and peft, not kubetune. The base model is not part of this "
              "version: it is loaded from `$KUBETUNE_BASE_MODEL_PATH`, else from where it was at registration, "
              "else by its hub id.", ""]
    if limits:
        parts += ["## Limits", "", *(f"- {limit}" for limit in limits), ""]
    return "\n".join(parts)


@dataclass(frozen=True)
class Headline:
    """What every view leads with: what was trained, the base/tuned table, the loss line."""
    facts: Facts
    table: str
    loss: str
