"""`kubetune run`: the pipeline's own function on this machine, under kfp.local.

Preflight runs first in this process, so bad input stops here with one message; then every task
runs as a subprocess in this virtualenv, or in its component's image (kubetune.launch.container_runner).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from kubetune import tracking
from kubetune.tracking import lifecycle
from kubetune.config import INPUT, RunConfig
from kubetune.overrides import locations, with_value
from kubetune.console import (LOCAL_RUN_ENV, LOG_FORMAT, PROGRESS_ENV, OursAndProblems, StageLines, WithoutTracebacks,
                              die_with_parent)
from kubetune.errors import ConfigError, Interrupted, StageFailed, redacted
from kubetune.launch import container_runner, kfp_local
from kubetune.launch import warm as warm_start
from kubetune.paths import STATE_ENV, checkout_root, state_dir
from kubetune.pipelines.pipeline import kubetune_pipeline
from kubetune.preflight import PASSED_ENV, passed_record, preflight

log = logging.getLogger(__name__)


RUNNERS = ("process", "container")


def anchor_defaults(cfg: RunConfig) -> RunConfig:
    """Input paths left at their defaults (the repository's shared data, `../shared/data/...`) are
    resolved against the kubetune checkout, so the embedded config runs from any directory. Where the
    default retention text is not there (an installed wheel, an image), forgetting is not measured
    and the log says how to measure it; a missing default data path is preflight's to report."""
    root = checkout_root()
    current = {key: value for key, value, _ in locations(cfg)}
    for key, default, kind in locations(RunConfig()):
        if kind != INPUT or current.get(key) != default or Path(default).is_absolute() or "://" in default \
                or default.startswith("package:"):
            continue
        anchored = (root / default).resolve() if root is not None else None
        if anchored is not None and anchored.exists():
            cfg = with_value(cfg, key, str(anchored))
        elif key == "evaluate.retention_path":
            log.warning("evaluate.retention_path: the default retention text (%s, beside a kubetune checkout) is not "
                        "here, so forgetting is not measured; set evaluate.retention_path to general text to measure "
                        "it, or to null to silence this", default)
            cfg = with_value(cfg, key, None)
    return cfg


def pin_locations(cfg: RunConfig) -> RunConfig:
    """Make every place the config names absolute and explicit, so that each stage (a subprocess or a
    container, started in another directory) and the MLflow params agree on where things are."""
    cfg = anchor_defaults(cfg)
    cfg = with_value(cfg, "storage.uri", cfg.storage.uri or str(state_dir() / "storage"))
    cfg = with_value(cfg, "tracking.mlflow_uri", tracking.resolve_uri(cfg.tracking.mlflow_uri))
    for key, value, kind in locations(cfg):
        if value.startswith("sqlite:///"):  # sqlite:///relative.db would move with the directory
            database = Path(value[len("sqlite:///"):])
            if not database.is_absolute():
                cfg = with_value(cfg, key, f"sqlite:///{database.resolve()}")
            continue
        if "://" in value or value.startswith("package:"):
            continue
        path = Path(value).expanduser()
        if kind == INPUT and not path.exists():
            continue  # a hub id, or a missing file that preflight reports
        cfg = with_value(cfg, key, str(path.resolve()))
    return cfg


class ProcessTasks:
    """Runs kfp.local's subprocess tasks (in place of its own runner, through kfp_local) so that:

    - the executor input reaches the task as written (kfp_local.subprocess_tasks);
    - each task's output goes to the console and to logs/<launch>-<task>.log under the state folder,
      and a failed task's last error line is kept (kubetune.errors.StageFailed), so the CLI prints one
      `kubetune: error:` line instead of kfp's RuntimeError traceback;
    - the temporary folders a task makes (kfp's component script, about 8 per run) go to one folder
      that is removed when the run ends (or, after a kill, when the next run starts);
    - a task starts warm, forked from a process that has imported the stages' libraries once
      (kubetune.launch.warm), where that process can serve it; otherwise as a plain subprocess;
    - unless verbose, the console shows a line as each task starts and ends, its progress bar and
      its warnings (console.StageLines); every line also goes to the run's log (run_log).
    """

    def __init__(self, home: Path, launch: str, warm: Optional[warm_start.WarmStarter] = None,
                 verbose: bool = True, run_log=None, progress: bool = True):
        self.launch = launch  # names the task logs: <launch>-<task>.log
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.lines = None if verbose else StageLines(progress=progress)
        self.run_log = run_log
        for stale in home.glob("run-*-*"):  # left by a `kubetune run` that was killed
            owner = stale.name.split("-")[1]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=home))
        self.failures: list[StageFailed] = []
        self.warm = warm
        self.started_warm: list[str] = []

    def __call__(self, full_command: list[str], env_vars: Optional[dict[str, str]] = None) -> int:
        task = kfp_local.task_name(full_command)
        log_path = self.logs / f"{self.launch}-{task}.log"  # a retried task's attempts follow each other
        env = {**os.environ, **(env_vars or {}), "TMPDIR": str(self.tmp), LOCAL_RUN_ENV: "1"}
        tail: collections.deque[str] = collections.deque(maxlen=80)
        started = time.monotonic()
        if self.lines is not None:
            self.lines.started(task)
        with log_path.open("a") as log_file:
            def show(line: str) -> None:
                line = redacted(line)  # what a stage prints itself (a traceback's values) is masked too
                if self.lines is None:
                    print(line, end="", flush=True)
                else:
                    self.lines.line(task, line)
                log_file.write(line)
                if self.run_log is not None:
                    self.run_log.write(f"{task}| {line}")
                tail.append(line.rstrip("\n"))

            if self.warm is not None and self.warm.can_run(full_command):
                self.started_warm.append(task)
                exit_code = self.warm.run(full_command, env, show)
            else:
                with subprocess.Popen(full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      bufsize=1, env=env, preexec_fn=die_with_parent) as process:
                    try:
                        for line in iter(process.stdout.readline, ""):
                            show(line)
                    except KeyboardInterrupt:  # the task stops before its MLflow run is marked KILLED
                        process.kill()
                        process.wait()
                        raise
                    exit_code = process.wait()
        if self.lines is not None:
            self.lines.finished(task, time.monotonic() - started, exit_code == 0)
        if exit_code != 0:
            failure = StageFailed(task, "a subprocess", exit_code, container_runner.error_line(list(tail)),
                                  log=str(log_path))
            self.failures.append(failure)
            if failure.deterministic:
                raise failure  # kfp.local would retry it after its backoff: bad input fails the same way again
        return exit_code

    def first_failure(self) -> StageFailed:
        """The stage that failed first: the exit handler (finish_run) runs after it and may fail for the
        same reason (an unwritable store), but it is not what the user has to fix."""
        return next((failure for failure in self.failures if failure.stage != "finish_run"), self.failures[-1])

    @contextlib.contextmanager
    def installed(self) -> Iterator["ProcessTasks"]:
        try:
            with kfp_local.subprocess_tasks(self), quiet_kfp(self.lines is not None, self.run_log):
                yield self
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet_kfp(quiet: bool, run_log=None) -> Iterator[None]:
    """When quiet, kfp.local's own lines (task input dumps, statuses, rules) go to the run log only,
    its warnings to the console too."""
    @contextlib.contextmanager
    def to_run_log() -> Iterator[None]:
        root = logging.getLogger()
        saved = root.level, root.handlers[:]
        to_console = logging.StreamHandler(sys.stdout)
        to_console.setLevel(logging.WARNING)
        root.handlers = [to_console, *([logging.StreamHandler(run_log)] if run_log is not None else [])]
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.setLevel(saved[0])
            root.handlers = saved[1]

    with kfp_local.task_logging(to_run_log if quiet else None):
        yield


def new_launch_id() -> str:
    """This `kubetune run`'s own id: its start time, its pid and 4 random hex digits. It names the
    run's log files and tags its MLflow run (tracking.LAUNCH_TAG), so any number of runs started at
    once in one folder, on one store, each find and keep only their own."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{os.urandom(2).hex()}"


def run_pipeline(cfg: RunConfig, progress: bool = True, runner: str = "process", resume: str = "",
                 verbose: bool = False, when_data_changes: bool = False) -> dict[str, Any]:
    """Preflight in this process (so bad input fails fast with one message), then the whole DAG
    under kfp.local: each task a subprocess in this virtualenv (runner "process") or a container
    of its component's image (runner "container", kubetune.launch.container_runner). Returns what the run
    produced. resume: the id of an MLflow run whose `kubetune run` died, to continue with its
    stored checkpoints (same config). Unless verbose, the console shows one line per stage start
    and end, progress bars and warnings; the whole log goes to logs/<launch>-run.log under the state
    folder and, as logs/run.log, to the MLflow run. Interrupted (Ctrl-C, SIGTERM), its stage is
    stopped and its MLflow run marked KILLED (errors.Interrupted). when_data_changes: the pipeline's
    parameter; on data the champion was trained on only preflight runs, and the result says
    "skipped" instead of what was registered."""
    if runner not in RUNNERS:
        raise ConfigError("--runner", runner, f"use one of {', '.join(RUNNERS)}")
    kfp_local.check_version()  # before anything runs: kfp.local's private parts are replaced below
    started = time.monotonic()
    cfg = pin_locations(cfg)
    if runner == "container":  # before anything is loaded: containers must be able to run here
        podman, gpu = container_runner.ready()
    home = state_dir()
    launch = new_launch_id()
    os.environ[STATE_ENV] = str(home)  # the stage processes inherit it
    os.environ[PROGRESS_ENV] = "1" if progress else "0"
    os.environ[tracking.LAUNCH_ENV] = launch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The zygote imports while this process runs preflight (both mostly import time).
    warm = warm_start.WarmStarter(warm_start.modules_for(), home / "logs" / f"{launch}-warm-start.log") \
        if runner == "process" else None
    run_log_path = home / "logs" / f"{launch}-run.log"
    report = None
    with _run_log(run_log_path, verbose) as run_log, _terminate_as_interrupt():
        try:
            report = preflight(cfg, when_data_changes=when_data_changes and not resume)
            if resume:
                lifecycle.check_resumable(report.tracking_uri, cfg.tracking.experiment, resume, cfg.to_dict())
            os.environ[PASSED_ENV] = passed_record(cfg, report)  # the preflight task need not check it all again
            if warm is not None and not report.skipped:
                warm.preload(warm_start.model_modules(Path(report.model["path"])))
            started_warm = _run_dag(cfg, home, runner, resume, warm, *(
                (podman, gpu) if runner == "container" else (None, False)), launch, verbose=verbose, run_log=run_log,
                progress=progress, when_data_changes=when_data_changes)
        except KeyboardInterrupt:
            if warm is not None:
                warm.close()  # its task (a child of the zygote) dies with it
                warm = None
            raise _interrupted(cfg, launch, resume, report is not None) from None
        finally:
            os.environ.pop(PASSED_ENV, None)
            os.environ.pop(tracking.LAUNCH_ENV, None)
            if warm is not None:
                warm.close()
            if report is not None:  # a run exists only past preflight
                _keep_log(cfg, run_log_path, run_log, launch, resume)
    wall = time.monotonic() - started
    run = lifecycle.run_of_launch(cfg.tracking.mlflow_uri, cfg.tracking.experiment, launch, resume)
    if report.skipped:
        return {"skipped": run.data.tags.get(tracking.SKIPPED_TAG, report.skipped), "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id, "tracking_uri": cfg.tracking.mlflow_uri,
                "wall_seconds": round(wall, 1), "log": str(run_log_path)}
    return {**summarize(cfg, lifecycle.registered_by(cfg.tracking.mlflow_uri, run), wall),
            "started_warm": started_warm, "log": str(run_log_path)}

@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a `kill`, a CI job's time limit) ends a run as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(cfg: RunConfig, launch: str, resume: str, started: bool) -> Interrupted:
    """After Ctrl-C or SIGTERM, once the running stage has been stopped: the run's MLflow run
    marked KILLED (with the stage it was in), and what to do next."""
    if not started:
        return Interrupted("", "", "")
    try:
        run = lifecycle.run_of_launch(cfg.tracking.mlflow_uri, cfg.tracking.experiment, launch, resume)
        if run is None:
            return Interrupted("", "", "")
        stage = lifecycle.mark_interrupted(cfg.tracking.mlflow_uri, run.info.run_id)
        return Interrupted(run.info.run_id, stage, "")
    except Exception as exc:  # the store itself may be what failed
        return Interrupted("", "", f"its MLflow run could not be marked KILLED ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")


@contextlib.contextmanager
def _run_log(path: Path, verbose: bool) -> Iterator[Any]:
    """The run's whole log: this process's log records and every stage's lines. Unless verbose,
    the console keeps kubetune's own records and others' warnings (console.OursAndProblems), without
    tracebacks (console.WithoutTracebacks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with path.open("w", buffering=1) as log_file:
        handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        if not verbose:
            from transformers.utils import logging as transformers_logging

            # preflight loads tokenizers and the retrieval model here: their load bars are no stage's progress
            transformers_logging.disable_progress_bar()
        quiet = [] if verbose else [h for h in (*root.handlers, *tracking.mlflow_log_handlers()) if h is not handler]
        formats = {console_handler: console_handler.formatter for console_handler in quiet}
        for console_handler in quiet:
            console_handler.addFilter(OursAndProblems())
            console_handler.setFormatter(WithoutTracebacks(console_handler.formatter))
        try:
            yield log_file
        finally:
            root.removeHandler(handler)
            if not verbose:
                transformers_logging.enable_progress_bar()
            for console_handler, own_format in formats.items():
                console_handler.filters = [f for f in console_handler.filters if not isinstance(f, OursAndProblems)]
                console_handler.setFormatter(own_format)


def _keep_log(cfg: RunConfig, path: Path, log_file, launch: str, resume: str) -> None:
    """The run's log as an artifact of its MLflow run (logs/run.log), finished or failed."""
    log_file.flush()
    try:
        run = lifecycle.run_of_launch(cfg.tracking.mlflow_uri, cfg.tracking.experiment, launch, resume)
        if run is not None:
            with tempfile.TemporaryDirectory(prefix="kubetune-log-") as folder:
                shutil.copyfile(path, Path(folder) / "run.log")
                tracking.client(cfg.tracking.mlflow_uri).log_artifact(run.info.run_id, str(Path(folder) / "run.log"),
                                                                      "logs")
    except Exception as exc:  # the log stays on disk; losing its copy must not fail the run
        log.warning("the run's log was not copied to MLflow (%s); it is at %s", exc, path)


def _run_dag(cfg: RunConfig, home: Path, runner: str, resume: str, warm: Optional[warm_start.WarmStarter],
             podman: Any, gpu: bool, launch: str, verbose: bool = True, run_log=None,
             progress: bool = True, when_data_changes: bool = False) -> list[str]:
    """The DAG under kfp.local; returns the tasks that started warm."""
    from kfp import local

    # Resource, accelerator and Kubernetes settings belong to the cluster; kfp.local ignores them.
    warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=r".*custom or non-Python base image.*")
    if runner == "container":
        lines = None if verbose else StageLines(progress=progress)
        with quiet_kfp(lines is not None, run_log):
            container_runner.run(cfg, podman, gpu, home, os.environ[PROGRESS_ENV] == "1",
                                 pipeline_root=home / "kfp", workspace_root=home / "kfp-workspace",
                                 resume=resume, lines=lines, run_log=run_log, when_data_changes=when_data_changes)
        return []
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(home / "kfp"),
               workspace_root=str(home / "kfp-workspace"), raise_on_error=True)
    with ProcessTasks(home, launch, warm, verbose=verbose, run_log=run_log, progress=progress).installed() as tasks:
        try:
            kubetune_pipeline(config_json=json.dumps(cfg.to_dict()), resume_run_id=resume,
                              when_data_changes=when_data_changes)
            return tasks.started_warm
        except RuntimeError:
            if tasks.failures:
                raise tasks.first_failure() from None
            raise


def browse_hint(tracking_uri: str, experiment_id: str, run_id: str, port: int = 5000) -> str:
    """Where a person opens the run: the server's page, or for a local store the `services up`
    command that serves that very store (with --store unless it is the state folder's) and the link."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    store = "" if tracking_uri == tracking.embedded_uri() else f" --store {shlex.quote(tracking_uri)}"
    serve = f"kubetune services up{store}" + (f" --port {port}" if port != 5000 else "")
    return f"to browse it: {serve}, then open http://127.0.0.1:{port}/{page}"


def summarize(cfg: RunConfig, registered: str, wall_seconds: float) -> dict[str, Any]:
    mlflow_client = tracking.client(cfg.tracking.mlflow_uri)
    name, version = registered.split("/")
    model_version = mlflow_client.get_model_version(name, version)
    run = mlflow_client.get_run(model_version.run_id)
    metrics = run.data.metrics
    return {
        "registered": registered,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": cfg.tracking.mlflow_uri,
        "decision": run.data.tags.get("kubetune.champion_decision", ""),
        "wall_seconds": round(wall_seconds, 1),
        "stage_seconds": tracking.stage_seconds(metrics),
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval/")},
        "trainable_line": run.data.tags.get("kubetune.trainable_line", ""),
        "storage": run.data.tags.get("kubetune.storage_run_prefix"),
    }
