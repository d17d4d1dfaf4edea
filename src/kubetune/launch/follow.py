"""`kubetune submit --wait`, `retrain --wait` and `kubetune wait RUN_ID`: follow a run to its end.

It polls the run (GET /apis/v2beta1/runs/{id}), prints each stage's state change with the time,
and ends with the run's outcome as the exit code, so a script or CI job can tell them apart:

    0  SUCCEEDED
    1  FAILED (the failing stage and its error line named) or SKIPPED
    3  CANCELED or CANCELING
    4  not seen to finish: the API was away longer than --outage-patience, or --wait-timeout passed
    2  bad input: a wrong host, token or run id (one line, as every kubetune command)

An API that stops answering (connection refused or cut, a timeout, HTTP 502/503/504 from a proxy
or gateway) is an outage, not an outcome: it says so once on stderr, retries with exponential
backoff (2 s doubling to 60 s, never longer than the poll interval to start with) and gives up
only after the patience, with exit 4 and how to look again. Nothing but a SUCCEEDED state read
from the API exits 0.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

from kubetune.errors import ConfigError, bounded, redacted
from kubetune.launch.cluster import Connection, quiet_retries
from kubetune.launch import kfp_runs
from kubetune.launch.kfp_runs import duration

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "SKIPPED": 1, "CANCELED": 3, "CANCELING": 3}
EXIT_UNSEEN = 4
OUTAGE_STATUSES = {502, 503, 504}  # a proxy or gateway in front of an API server that is away


@dataclass(frozen=True)
class Patience:
    """How often to look and how long to keep looking (seconds)."""

    poll_seconds: float = 10.0
    wait_timeout: Optional[float] = None  # None: until the run ends
    outage: float = 900.0  # the API may be away this long before --wait gives up
    backoff_first: float = 2.0
    backoff_cap: float = 60.0

    def __post_init__(self) -> None:
        if not self.poll_seconds > 0:
            raise ConfigError("--poll-seconds", self.poll_seconds, "give a number of seconds above 0, e.g. 10")
        if self.wait_timeout is not None and not self.wait_timeout > 0:
            raise ConfigError("--wait-timeout", self.wait_timeout, "give a duration above 0, e.g. 6h, or leave it out")
        if not self.outage > 0:
            raise ConfigError("--outage-patience", self.outage, "give a duration above 0, e.g. 15m")


def seconds(field: str, text: Optional[str]) -> Optional[float]:
    """'90', '90s', '15m', '6h' or '2d' as seconds; None stays None."""
    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not found:
        raise ConfigError(field, text, "give a duration: seconds (90), or with a unit: 90s, 15m, 6h, 2d")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def follow(kfp_client, connection: Connection, run_id: str, patience: Patience = Patience(),
           mlflow_uri: Optional[str] = None, out: Optional[TextIO] = None, err: Optional[TextIO] = None,
           sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
    """Follows the run until it ends or the patience runs out; returns the exit code above."""
    out, err = out or sys.stdout, err or sys.stderr
    with quiet_retries():  # an outage is reported once, by the loop
        return _follow(kfp_client, connection, run_id, patience, mlflow_uri, out, err, sleep, clock)


def _follow(kfp_client, connection: Connection, run_id: str, patience: Patience, mlflow_uri: Optional[str],
            out: TextIO, err: TextIO, sleep: Callable[[float], None], clock: Callable[[], float]) -> int:
    first_delay = min(patience.backoff_first, patience.poll_seconds)
    started, seen, outage_since, delay, header = clock(), {}, None, first_delay, False
    try:
        while True:
            now = clock()
            if patience.wait_timeout is not None and now - started >= patience.wait_timeout:
                return _give_up(connection, run_id, f"--wait-timeout {duration(patience.wait_timeout)} passed", err)
            run, why = _poll(kfp_client, connection, run_id)
            now = clock()  # a request that found no server may have taken a while
            if run is None:
                if outage_since is None:
                    outage_since = now
                    print(f"kubetune: lost the KFP API at {connection.host} ({why}); retrying with backoff for up to "
                          f"{duration(patience.outage)}", file=err, flush=True)
                if now - outage_since >= patience.outage:
                    away = duration(now - outage_since)
                    return _give_up(connection, run_id, f"the KFP API did not answer for {away} ({why})", err)
                sleep(min(delay, max(0.01, patience.outage - (now - outage_since)), _left(patience, started, clock())))
                delay = min(delay * 2, patience.backoff_cap)
                continue
            if outage_since is not None:
                print(f"kubetune: the KFP API answers again (away {duration(now - outage_since)})", file=err, flush=True)
                outage_since, delay = None, first_delay
            if not header:
                print(f"kubetune: following run {run_id} ({run.display_name}); Ctrl-C stops following, not the run",
                      file=out, flush=True)
                header = True
            _transitions(run, seen, out)
            if run.state in kfp_runs.FINAL or run.state == "CANCELING":
                return _outcome(run, run_id, mlflow_uri, out, err)
            sleep(min(patience.poll_seconds, _left(patience, started, clock())))
    except KeyboardInterrupt:
        print(f"kubetune: stopped following run {run_id}; the run goes on: {_again(connection, run_id)} follows it "
              f"again, `kubetune cancel {run_id}` stops it", file=err)
        return 130


def _left(patience: Patience, started: float, now: float) -> float:
    """Seconds to the --wait-timeout (at least a little, so the loop looks once more and gives up)."""
    if patience.wait_timeout is None:
        return float("inf")
    return max(0.01, patience.wait_timeout - (now - started))


def _poll(kfp_client, connection: Connection, run_id: str):
    """(the run, '') or (None, why) when the API did not answer; other refusals (a wrong token or
    run id) are raised as one-line errors."""
    import kfp_server_api
    import urllib3

    with kfp_runs.about_run(connection, run_id, f"read run {run_id}"):
        try:
            return kfp_runs.read_run(kfp_client, run_id), ""
        except kfp_server_api.ApiException as exc:
            if exc.status in OUTAGE_STATUSES:  # not 0, kfp_server_api's TLS failure: no retry fixes a certificate
                return None, f"HTTP {exc.status} {exc.reason or ''}".strip()
            raise
        except (urllib3.exceptions.HTTPError, TimeoutError, OSError) as exc:
            # MaxRetryError(reason=NewConnectionError("...: [Errno 111] Connection refused")): the last part
            return None, str(getattr(exc, "reason", None) or exc).rsplit(": ", 1)[-1].strip("\"')") or type(exc).__name__


def _transitions(run, seen: dict[str, str], out: TextIO) -> None:
    """One line per stage whose state changed since the last look: local time, stage, state; a
    stage that ended says how long it took (the server's start and end times)."""
    for stage in kfp_runs.stages(run):
        if seen.get(stage.name) == stage.state:
            continue
        seen[stage.name] = stage.state
        ended = stage.state in kfp_runs.FINAL
        at = kfp_runs.local_time(stage.ended) if ended and stage.ended else time.strftime("%H:%M:%S")
        line = f"  {at}  {stage.name:<14} {stage.state}"
        if ended and stage.seconds is not None:
            line += f" after {duration(stage.seconds)}"
        if stage.state == "FAILED" and stage.error:
            line += f": {_one_line(stage.error)}"
        print(line, file=out, flush=True)


def _outcome(run, run_id: str, mlflow_uri: Optional[str], out: TextIO, err: TextIO) -> int:
    name = run.display_name or run_id
    started, finished = kfp_runs.when(run.created_at), kfp_runs.when(run.finished_at)
    took = f" after {duration((finished - started).total_seconds())}" if started and finished else ""
    if run.state == "SUCCEEDED":
        print(f"kubetune: run {name} SUCCEEDED{took}{_result(run_id, mlflow_uri)}", file=out)
    elif run.state == "FAILED":
        print(f"kubetune: run {name} FAILED{took}{_failure(run, run_id, mlflow_uri)}", file=err)
    else:
        being = " (being stopped)" if run.state == "CANCELING" else ""
        print(f"kubetune: run {name} {run.state}{being}{took}", file=err)
    return EXIT_CODES[run.state]


def _result(run_id: str, mlflow_uri: Optional[str]) -> str:
    """': registered quotes-lora/3 (the new champion)' or ': skipped: data unchanged since version 2
    ...', from the run's MLflow run; '' where MLflow was not named or does not answer."""
    if not mlflow_uri:
        return ""
    facts = kfp_runs.mlflow_facts(mlflow_uri, [run_id])[0].get(run_id, {})
    if facts.get("skipped"):
        return f": {facts['skipped']}"
    if facts.get("registered"):
        return f": registered {facts['registered']}" + (" (the new champion)" if facts.get("champion") == "yes"
                                                        else " (not the champion)")
    return ""


def _failure(run, run_id: str, mlflow_uri: Optional[str]) -> str:
    """' in stage S: error line; ...' from the API (the task's error, else the run's), else from
    the MLflow run the exit handler marked FAILED (kubetune.failed_stage, kubetune.error)."""
    stage = kfp_runs.failed_stage(kfp_runs.stages(run))
    name, error = (stage.name if stage else ""), (stage.error if stage else "")
    error = error or (run.error.message if run.error and run.error.message else "")
    if (not error or not name) and mlflow_uri:
        facts = kfp_runs.mlflow_facts(mlflow_uri, [run_id])[0].get(run_id, {})
        name = name or facts.get("failed_stage", "").replace("_", "-")
        error = error or facts.get("error", "")
    where = f" in stage {name}" if name else ""
    what = f": {_one_line(error)}" if error else ": no error line recorded"
    hint = f"; its log: `kubetune logs {run_id} --stage {name}`" if name else ""
    return where + what + hint


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bounded(redacted(lines[-1] if lines else ""), 500)


def _again(connection: Connection, run_id: str) -> str:
    namespace = f" --namespace {connection.namespace}" if connection.namespace else ""
    return f"`kubetune wait {run_id} --host {connection.host}{namespace}`"


def _give_up(connection: Connection, run_id: str, why: str, err: TextIO) -> int:
    print(f"kubetune: could not see run {run_id} finish: {why}; it may still be running: {_again(connection, run_id)} "
          f"follows it again, or see {connection.ui}/#/runs/details/{run_id}", file=err)
    return EXIT_UNSEEN
