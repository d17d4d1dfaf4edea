"""The run report the KFP UI shows (an HTML artifact of evaluate): the figures someone opening one
pipeline run looks for first, without going to MLflow: base vs tuned on the task's headline metrics,
the training loss curve, and a few held-out examples side by side.

One self-contained page: the loss curve is an inline PNG, so the KFP UI needs no access to MLflow
or storage to draw it.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Optional

from kubetune.training import loss_curve


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def headline_rows(metrics: dict[str, float], headline: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(measure, base, tuned) for each headline measure that has both sides, then the figures
    that have no base/tuned pair (a change in percent, forgetting) as (name, value, "")."""
    rows, seen = [], set()
    for key in headline:
        section, _, name = key.rpartition("/")
        for side in ("base_", "tuned_"):
            if name.startswith(side):
                measure = name[len(side):]
                base, tuned = metrics.get(f"{section}/base_{measure}"), metrics.get(f"{section}/tuned_{measure}")
                if measure not in seen and base is not None and tuned is not None:
                    rows.append((measure, _number(base), _number(tuned)))
                seen.add(measure)
                break
        else:
            if key in metrics:
                rows.append((name, _number(metrics[key]), ""))
    return rows


def html_report(title: str, metrics: dict[str, float], headline: tuple[str, ...], history: list[dict[str, Any]],
                examples: list[dict[str, Any]], note: Optional[str] = None) -> str:
    table = "".join(f"<tr><td>{html.escape(measure)}</td><td>{base}</td><td>{tuned}</td></tr>" if tuned else
                    f"<tr><td>{html.escape(measure)}</td><td colspan='2'>{base}</td></tr>"
                    for measure, base, tuned in headline_rows(metrics, headline))
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}</style></head><body>",
             f"<h2>{html.escape(title)}</h2>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append(f"<table><tr><th>measure</th><th>base</th><th>tuned</th></tr>{table}</table>")
    if any("loss" in row for row in history):
        parts.append(f"<h3>Loss per step</h3><img alt='training and validation loss per step' "
                     f"src='data:image/png;base64,{_png(loss_curve(history))}'>")
    if examples:
        columns = list(examples[0])
        header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                       for row in examples)
        parts.append(f"<h3>Held-out examples</h3><table><tr>{header}</tr>{body}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
