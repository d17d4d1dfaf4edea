"""MLflow's runs: one per pipeline run. preflight creates it; every later stage logs into it by id.

Only this package imports mlflow (the architecture test checks it): runs here, logged and
registered models in kubetune.tracking.models."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from kubetune import console, errors
from kubetune.errors import ServiceError
from kubetune.config_outputs import SECRET_KEYS
from kubetune.paths import state_dir

# There is no outside network on the machines this runs on; telemetry would only time out.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow draws a download bar when register checks the logged model: no stage's progress of ours.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

log = logging.getLogger(__name__)

#: Tag on the MLflow run with the id of the KFP pipeline run it belongs to.
PIPELINE_RUN_TAG = "kubetune.pipeline_run"
SKIPPED_TAG = "kubetune.skipped"  # why a run trained nothing (when_data_changes on data the champion has seen)

#: Set by `kubetune run` for its stages: an id of its own (time, pid, random), which preflight tags
#: the MLflow run with (LAUNCH_TAG), so the launcher finds its own run among any number started at once.
LAUNCH_ENV = "KUBETUNE_LAUNCH"
LAUNCH_TAG = "kubetune.launch"

#: Seconds between system-metric samples during train and evaluate: about 15 points on the demo's
#: 75 s of training, one extra MLflow request per sample.
SYSTEM_METRICS_SECONDS = 5.0


def metric_key(name: str) -> str:
    """A name (a label, a task) as one part of a metric key: characters other than letters, digits,
    `_` and `-` become `_`, so the part never adds a level to the key (`.`, `/`) or is refused."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:100] or "_"


def stage_seconds(metrics: dict[str, float]) -> dict[str, float]:
    """{stage: seconds} from a run's metrics (timing/<stage>_seconds, every attempt together)."""
    return {key[len("timing/"):-len("_seconds")]: value for key, value in metrics.items()
            if key.startswith("timing/") and key.endswith("_seconds") and not key.endswith("_attempt_seconds")}


def embedded_uri() -> str:
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def embedded_artifact_root() -> Path:
    return state_dir() / "mlartifacts"  # = artifact_root(embedded_uri())


def resolve_uri(configured: Optional[str]) -> str:
    """tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else the embedded sqlite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()


def local_path(uri: str) -> Optional[Path]:
    """The file or folder a tracking or artifact URI keeps its data in on this machine, if any:
    `sqlite:///path` (the database file), `file:` URIs and plain paths; None for servers and buckets."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


@contextlib.contextmanager
def process_uris(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model) only takes the process-wide URIs: set them for the call,
    then put them back. The caller's active experiment (mlflow.set_experiment, e.g. in a notebook)
    is set aside too: with one set, fluent start_run(run_id=...) refuses a run of another experiment."""
    import mlflow
    from mlflow.tracking import fluent

    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), fluent._active_experiment_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        fluent._active_experiment_id = previous[2]


def mlflow_log_handlers() -> list[logging.Handler]:
    """The handlers MLflow logs through: it makes one of its own on import (INFO lines such as its
    schema set-up), which the quiet console filters like the root's. Importing mlflow here costs
    nothing extra: preflight imports it anyway."""
    import mlflow  # noqa: F401

    return list(logging.getLogger("mlflow").handlers)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An http(s) server must answer /health; a local store must be writable."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise ServiceError("tracking.mlflow_uri", uri, f"/health answered {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError("tracking.mlflow_uri", uri,
                               f"MLflow does not answer ({reason}); start it (kubetune services up) or fix the "
                               "URI, or set it to null for the embedded store") from None
    elif uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError("tracking.mlflow_uri", uri, f"cannot create the folder {database.parent} "
                               f"({exc.strerror}); choose a writable place, or null for the embedded store") from None
        if database.is_dir() or not os.access(database.parent, os.W_OK) or \
                (database.exists() and not os.access(database, os.W_OK)):
            raise ServiceError("tracking.mlflow_uri", uri, f"{database} cannot be written as a database file; "
                               "choose a writable file path, or null for the embedded store")
        initialise_sqlite(uri, database)


def initialise_sqlite(uri: str, database: Path) -> None:
    """Create (or migrate) a sqlite store's schema under a file lock. Two first runs on a fresh store
    raced in MLflow's migration (`table _alembic_tmp_experiments already exists`) without it."""
    import fcntl

    # Read-only is enough for flock, and a lock file another user made (the host's, seen from a
    # container) can be opened that way.
    with open(os.open(database.with_name(database.name + ".lock"), os.O_RDONLY | os.O_CREAT, 0o644)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as exc:  # a file that is not a database, a newer schema, a locked file
            raise ServiceError("tracking.mlflow_uri", uri, f"the store cannot be opened ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]}); point at another file") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(uri: str, name: str) -> str:
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri, name))


def artifact_root(uri: str) -> Optional[Path]:
    """Where a sqlite store keeps its artifacts: `mlartifacts/` beside the database file, whatever
    the current directory (MLflow's own default is ./mlruns of the process), so the store and its
    artifacts move together and `kubetune services up` serves both. None for other stores."""
    database = local_path(uri) if uri.startswith("sqlite:///") else None
    return database.parent / "mlartifacts" if database is not None else None


def artifact_location(uri: str, experiment: str) -> Optional[str]:
    root = artifact_root(uri)
    return (root / experiment).as_uri() if root is not None else None


def param_value(value: Any) -> str:
    """A param as the config file would spell it: null, true/false and lists as JSON (so they read
    back exactly and null is never also written None), other values as they print; the credentials
    of a URI in it masked (errors.redacted), so no run records a secret."""
    return errors.redacted(json.dumps(value) if isinstance(value, (list, dict, bool, type(None))) else str(value))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.lora.r": "16", ...}: the run's params, and nothing else is one."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        elif value is not None:  # a null is the default's absence: no param, so compare views show what was set
            out[name] = param_value(SECRET_KEYS[name](value) if name in SECRET_KEYS else value)
    return out


def start_run(uri: str, experiment: str, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> str:
    from mlflow.entities import Param, RunTag

    mlflow_client = client(uri)
    tags = {key: errors.redacted(str(value)) for key, value in tags.items()}
    run_name = errors.redacted(run_name)
    run = mlflow_client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
    params = [Param(k, v) for k, v in flatten(config).items()]
    for start in range(0, len(params), 100):  # the REST API takes at most 100 params per batch
        mlflow_client.log_batch(run.info.run_id, params=params[start:start + 100])
    mlflow_client.log_batch(run.info.run_id, tags=[RunTag("mlflow.runName", run_name)])
    return run.info.run_id


#: kubetune.error of a run stopped by Ctrl-C or SIGTERM.
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); continue it with kubetune run --resume"

#: MLflow's tag for a run's description (the UI's "Description" box, Markdown).
DESCRIPTION_TAG = "mlflow.note.content"

class RunLogger:
    """Logs into an existing run by id, without making it the process's active run."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = client(uri)

    def metrics(self, values: dict[str, float], step: Optional[int] = None) -> None:
        """Logs values at step (0 for summary figures). A summary figure the run already holds with
        the same value is not logged again, so a resumed run's redone stages add no duplicates."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        held = self.client.get_run(self.run_id).data.metrics if not step else {}
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items()
                 if v is not None and held.get(k) != float(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, errors.redacted(str(v))) for k, v in values.items()])

    def describe(self, markdown: str) -> None:
        """The run's description: MLflow shows it (Markdown) at the top of the run page."""
        self.tags({DESCRIPTION_TAG: markdown})

    def run_link(self) -> str:
        """A Markdown link to this run's page, relative to the MLflow UI (it works in descriptions)."""
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return f"[run {self.run_id[:8]}](#/experiments/{experiment}/runs/{self.run_id})"

    @staticmethod
    def version_link(model_name: str, version: str) -> str:
        from urllib.parse import quote

        return f"[{model_name}/{version}](#/models/{quote(model_name, safe='')}/versions/{version})"

    def artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def json(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def dataset(self, source: str, context: str, rows: Iterable[Any]) -> None:
        """Records rows as one of the run's dataset inputs (MLflow's Datasets column and run page):
        named after the source and the context (train, validation, test, retention), with a digest
        of the rows as used (sha256 of their JSON list, computed a row at a time: rows may be a
        stream), so two runs on the same data show the same digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        sha, count = hashlib.sha256(b"["), 0
        for row in rows:
            sha.update((", " if count else "").encode() + json.dumps(row, sort_keys=True, default=str).encode())
            count += 1
        sha.update(b"]")
        digest = sha.hexdigest()[:16]
        name = f"{Path(source.rstrip('/')).stem or source}-{context}"
        source_type = source.split("://", 1)[0] if "://" in source else "local"
        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps({"uri": source}),
                          profile=json.dumps({"num_rows": count}))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[
            InputTag("mlflow.data.context", context)])])

    @contextlib.contextmanager
    def system_metrics(self, interval: float = SYSTEM_METRICS_SECONDS) -> Iterator[None]:
        """CPU, memory, disk and network (GPU too where NVML sees one) sampled into system/... while
        the block runs, continuing the step count of an earlier stage's samples, plus one sample as
        the block ends (MLflow's monitor logs only whole intervals: a short stage would leave none)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=True,
                                       tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            try:
                monitor.finish()
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as exc:  # a lost sample must not fail the stage
                log.warning("system metrics: the last sample was not logged (%s)", exc)

    def run_tags(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.tags

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def metric_values(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every value logged for key in this run, oldest first."""
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator["RunLogger"]:
        """Times a stage from its start (console.stage_started: in a KFP task, the process's start);
        on failure marks the run FAILED and names the stage, then re-raises.

        A retried attempt of a stage (KFP's retry of train) first clears the failed attempt's
        tags and sets the run RUNNING again; stage_seconds.<name> then covers every attempt. An
        attempt that failed on bad input is not redone: the retry stops at once with the same error.
        """
        started = console.stage_started()
        earlier = [value for _, value in self.metric_values(f"timing/{name}_attempt_seconds")]
        run_tags = self.client.get_run(self.run_id).data.tags
        if run_tags.get("kubetune.failed_stage") == name:
            refused = run_tags.get("kubetune.user_error")
            if refused:
                kind, field, value, fix = json.loads(refused)
                raise getattr(errors, kind, errors.UserError)(field, value, f"{fix} (an earlier attempt of {name} "
                                                                          "failed on this; a retry cannot fix it)")
            for key in ("kubetune.failed_stage", "kubetune.error"):
                self.client.delete_tag(self.run_id, key)
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("%s: attempt %d, after %d failed (%.0f s)", name, len(earlier) + 1, len(earlier), sum(earlier))
        self.tags({"kubetune.stage": name})
        try:
            yield self
        except BaseException as exc:
            seconds = round(time.monotonic() - started, 2)
            interrupted = isinstance(exc, KeyboardInterrupt)
            failure = {"kubetune.failed_stage": name, "kubetune.error": INTERRUPTED if interrupted else str(exc)[:500]}
            if isinstance(exc, errors.UserError) and not isinstance(exc, errors.ServiceError):
                failure["kubetune.user_error"] = json.dumps([type(exc).__name__, exc.field, exc.value, exc.fix],
                                                            default=str)[:5000]
            try:
                self.metrics({f"timing/{name}_attempt_seconds": seconds}, step=len(earlier) + 1)
                self.tags(failure)
                self.finish("KILLED" if interrupted else "FAILED")
            except Exception as recording:  # the store may be what failed: its error is not the stage's
                log.error("%s failed and the failure could not be recorded in MLflow (%s: %s)", name,
                          type(recording).__name__, str(recording).splitlines()[0][:200] if str(recording) else "")
            raise
        seconds = round(time.monotonic() - started, 2)
        self.metrics({f"timing/{name}_seconds": round(sum(earlier) + seconds, 2),
                      **({f"timing/{name}_attempts": len(earlier) + 1} if earlier else {})})
