"""Messages to a webhook when a pipeline run ends: failed, succeeded, a new champion, or skipped.

The pipeline's exit handler (stages.finish_run) sends them: it runs however the run ended, so a run
whose pod was killed or timed out still notifies. What a message says comes from the run's MLflow
run (the stage it failed in and its error, the headline figures, the champion decision, why it was
skipped) and from the exit handler's own status.

Each message is one JSON object with a `text` field, which Slack's and Teams' incoming webhooks
show as the message, and the same facts under `kubetune` for anything that reads JSON. Credentials
never appear: every text goes through errors.redacted (a URI's password) and has the values of the
secret variables the pods get (S3, MLflow, hub, KFP tokens, the webhook URL itself) replaced by ***.
Delivery is best effort: one retry after a short pause, then a warning in the task's log; a webhook
that is down, slow or refusing never fails the run.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from kubetune.config_outputs import WEBHOOK_ENV, NotifyConfig, webhook_shown
from kubetune.errors import bounded, redacted
from kubetune.headline import number, one_line

log = logging.getLogger(__name__)

#: Environment variables whose values are secrets wherever kubetune runs (pipelines.SECRETS_AS_ENV
#: and the KFP client's token): never sent, whatever text they turn up in.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                    "HF_TOKEN", "KF_PIPELINES_TOKEN", WEBHOOK_ENV)
TEXT_LIMIT = 3000  # Slack cuts a text field at 40,000 characters; a message is read on a phone
RETRY_PAUSE = 2.0


@dataclass(frozen=True)
class Event:
    kind: str  # one of config_outputs.EVENTS
    text: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How a pipeline run ended, as the exit handler sees it."""

    model_name: str
    state: str  # KFP's final state: SUCCEEDED, FAILED, CANCELED, ...
    error: str = ""  # the exit handler's error message
    pipeline_run: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # its MLflow run's (empty: preflight opened none)
    metrics: dict[str, float] = field(default_factory=dict)
    headline: Sequence[str] = ()  # the task kind's headline metric keys
    mlflow_page: str = ""
    kfp_page: str = ""
    previous_figures: dict[str, str] = field(default_factory=dict)  # the replaced champion's version tags


def events(outcome: Outcome) -> list[Event]:
    """What to say about a run that ended so: one event, plus `champion` when it made a new one."""
    tags, name = outcome.tags, outcome.model_name
    links = [f"MLflow: {outcome.mlflow_page}" if outcome.mlflow_page else "",
             f"KFP: {outcome.kfp_page}" if outcome.kfp_page else ""]
    tail = " · ".join(link for link in links if link)
    facts = {"model": name, "state": outcome.state, "pipeline_run": outcome.pipeline_run,
             "mlflow_run": outcome.mlflow_page, "kfp_run": outcome.kfp_page}
    if outcome.state != "SUCCEEDED":
        stage = tags.get("kubetune.failed_stage") or tags.get("kubetune.stage") or "an unknown stage"
        error = (tags.get("kubetune.error") or outcome.error or "no error was recorded").strip().splitlines()[0]
        text = f"kubetune: {name} run {outcome.state} in {stage}: {error}"
        return [Event("failed", _with(text, tail), {**facts, "stage": stage, "error": error})]
    if tags.get("kubetune.skipped"):
        return [Event("skipped", _with(f"kubetune: {name} {tags['kubetune.skipped']}", tail),
                      {**facts, "reason": tags["kubetune.skipped"]})]
    registered = (f"{tags['kubetune.registered_model']}/{tags['kubetune.registered_version']}"
                  if "kubetune.registered_version" in tags else "")
    figures = {key: outcome.metrics[key] for key in outcome.headline if key in outcome.metrics}
    headline = one_line(outcome.metrics, outcome.headline) or "no headline figures recorded"
    said = [Event("succeeded", _with(f"kubetune: {name} run succeeded: {headline}"
                                     + (f"; registered {registered}" if registered else ""), tail),
                  {**facts, "registered": registered, "figures": figures})]
    if tags.get("kubetune.champion") == "yes":
        before = _before_after(outcome.previous_figures, outcome.metrics, outcome.headline)
        decision = tags.get("kubetune.champion_decision", f"{registered} is the new champion")
        said.append(Event("champion", _with(f"kubetune: {decision}" + (f" ({before})" if before else ""), tail),
                          {**facts, "registered": registered, "figures": figures,
                           "previous": outcome.previous_figures, "decision": decision}))
    return said


def _with(text: str, tail: str) -> str:
    return f"{text} — {tail}" if tail else text


def _before_after(previous: dict[str, str], metrics: dict[str, float], headline: Sequence[str]) -> str:
    """`perplexity 31.02 -> 29.71` for each tuned headline figure the old champion had too."""
    tuned = dict.fromkeys(key.replace("base_", "tuned_") for key in headline if "base_" in key or "tuned_" in key)
    return "; ".join(f"{key.split('/')[-1].replace('tuned_', '').replace('_', ' ')} {number(float(previous[key]))} -> "
                     f"{number(metrics[key])}" for key in tuned if key in metrics and key in previous)


def masked(text: str, environ: Optional[dict[str, str]] = None) -> str:
    """text with URI credentials and the values of SECRET_VARIABLES masked."""
    environ = os.environ if environ is None else environ
    text = redacted(text)
    for name in SECRET_VARIABLES:
        value = environ.get(name) or ""
        if len(value) >= 4:  # shorter would mask ordinary words
            text = text.replace(value, "***")
    return text


def payload(event: Event, environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The JSON sent: Slack's and Teams' `text`, and the facts under `kubetune`, all masked."""
    facts = json.loads(masked(json.dumps({"event": event.kind, **event.facts}), environ))
    return {"text": bounded(masked(event.text, environ), TEXT_LIMIT), "kubetune": facts}


def webhook(config: NotifyConfig, environ: Optional[dict[str, str]] = None) -> str:
    """The URL to post to: notify.webhook_url, else $KUBETUNE_WEBHOOK_URL; "" sends nothing."""
    environ = os.environ if environ is None else environ
    return (config.webhook_url or environ.get(WEBHOOK_ENV) or "").strip()


def send(config: NotifyConfig, said: list[Event], environ: Optional[dict[str, str]] = None) -> list[str]:
    """Posts each event config.events asks for; returns one line per event on what happened (for
    the task's log). Never raises: a notification must not fail the run it reports on."""
    url = webhook(config, environ)
    if not url:
        return [f"{event.kind}: not sent (no notify.webhook_url, no ${WEBHOOK_ENV})" for event in said]
    if not url.startswith(("http://", "https://")):
        return [f"{event.kind}: not sent (${WEBHOOK_ENV} is not an http(s) URL)" for event in said]
    done = []
    for event in said:
        if event.kind not in config.events:
            done.append(f"{event.kind}: not sent (not in notify.events)")
            continue
        done.append(f"{event.kind}: {_post(url, payload(event, environ), config.timeout_seconds)}")
    return done


def _post(url: str, body: dict[str, Any], timeout: float) -> str:
    data = json.dumps(body).encode()
    problem = ""
    for attempt in range(2):
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "kubetune"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return f"sent to {webhook_shown(url)} (HTTP {answer.status})"
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} {exc.reason}"
            if exc.code < 500 and exc.code != 429:  # refused for good: a wrong URL or payload
                break
        except (urllib.error.URLError, OSError, ValueError) as exc:  # down, unreachable, timed out
            problem = type(getattr(exc, "reason", exc)).__name__
        if attempt == 0:
            time.sleep(RETRY_PAUSE)
    log.warning("notification not delivered to %s (%s); the run is not affected", webhook_shown(url), problem)
    return f"not delivered to {webhook_shown(url)} ({problem})"
