"""`kubetune runs | logs | cancel`, and what `--wait` reads: runs of the kubetune pipeline on KFP.

Everything goes through kfp.Client and its generated v2beta1 client (kfp_server_api 2.17). The
fields read, as kfp_server_api's models parse them and kubeflow/pipelines defines them in
backend/api/v2beta1/run.proto:

- Run: run_id, display_name, state (RuntimeState: PENDING, RUNNING, SUCCEEDED, SKIPPED, FAILED,
  CANCELING, CANCELED, PAUSED), created_at, finished_at (the server sends 1970-01-01 while unset:
  toApiRun in backend/src/apiserver/server/api_converter.go), error.message,
  pipeline_version_reference.pipeline_id, run_details.task_details.
- PipelineTaskDetail: one per Argo node (toModelTasks over NodeStatuses, same file and
  backend/src/common/util/workflow.go), so besides the pipeline's tasks (display_name `train`,
  `prepare-data`, ...) there are system nodes (the root DAG, exit-handler-1, condition-N,
  <task>-driver, executor): stages are the task names of pipelines/pipeline.py's STAGES. Read:
  display_name, state, create_time, start_time, end_time, error.message, pod_name and
  child_tasks[].pod_name. Today's server fills neither error nor pod_name of a task
  (toApiPipelineTaskDetail); child_tasks[].pod_name holds the Argo node ids of the task's children,
  which is how a stage's pod is found here.
- Logs: the API server has no v2beta1 log route. The KFP UI's server (ml-pipeline-ui) serves
  `GET /k8s/pod/logs?podname=&runid=&podnamespace=&createdat=` (frontend/server/app.ts, handler
  frontend/server/handlers/pod-logs.ts; the UI calls it in frontend/src/lib/Apis.ts getPodLogs),
  also under its base path /pipeline; it reads the pod's `main` container, else the archived log,
  and answers 404 `pod not found` when neither exists. With Argo's pod names v2 a pod is named
  <workflow>-<template>-<hash> while its node id is <workflow>-<hash> (RetrievePodName in
  backend/src/common/util/workflow.go; the executor templates system-container-impl and
  retry-system-container-impl in backend/src/v2/compiler/argocompiler/container.go): both are tried.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO

from kubetune.errors import ConfigError, ServiceError, UserError
from kubetune.launch.cluster import PAGE_SIZE, Connection, api_errors, name_filter, response_body
from kubetune.pipelines import pipeline
from kubetune.tracking.lifecycle import pipeline_run_facts

#: The pipeline's task names as KFP shows them (kfp turns a component's `_` into `-`), in run order.
STAGE_NAMES = [name.replace("_", "-") for name in pipeline.STAGES]
FINAL = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}
REQUEST_TIMEOUT = 30  # seconds per request: kfp.Client sets none, and a hung connection would hang --wait
MAX_PAGES = 20  # `runs` reads at most this many pages of PAGE_SIZE runs looking for the pipeline's
EXECUTOR_TEMPLATES = ["system-container-impl", "retry-system-container-impl"]


def _run_service(kfp_client):
    """The one place kubetune reaches inside kfp.Client: its generated RunServiceApi, for a request
    timeout on get_run and, through its api_client (auth and token refresh included), the UI's
    logs route, which kfp.Client has no method for."""
    return kfp_client._run_api


@contextlib.contextmanager
def about_run(connection: Connection, run_id: str, doing: str) -> Iterator[None]:
    """api_errors, plus: a 404 the KFP API itself gave (gRPC NOT_FOUND, code 5, in its JSON) is a
    wrong run id; any other 404 means --host is not the KFP API."""
    import kfp_server_api

    with api_errors(connection, doing):
        try:
            yield
        except kfp_server_api.ApiException as exc:
            if exc.status == 404 and _grpc_code(exc) == 5:
                raise ConfigError("RUN_ID", run_id, f"Kubeflow Pipelines at {connection.host} has no such run; "
                                  "`kubetune runs` lists recent ones" +
                                  ("" if connection.namespace else " (--namespace on a multi-user cluster)")) from None
            if exc.status == 404:
                raise ServiceError("--host", connection.host, f"answered HTTP 404 to {doing}: give the URL of the KFP "
                                   "API or UI (e.g. http://localhost:8080 for a port-forward to ml-pipeline-ui)") from None
            raise


def _grpc_code(exc) -> Optional[int]:
    try:
        body = json.loads(exc.body)
    except (TypeError, ValueError):
        return None
    return body.get("code") if isinstance(body, dict) else None


def read_run(kfp_client, run_id: str):
    """GET /apis/v2beta1/runs/{id}, as kfp.Client.get_run, with a request timeout."""
    return _run_service(kfp_client).run_service_get_run(run_id=run_id, _request_timeout=REQUEST_TIMEOUT)


def get_run(kfp_client, connection: Connection, run_id: str):
    with about_run(connection, run_id, f"read run {run_id}"):
        return read_run(kfp_client, run_id)


# ---------------------------------------------------------------------------------------------
# A run's stages.


@dataclass
class Stage:
    name: str
    state: str
    created: Optional[datetime.datetime]
    started: Optional[datetime.datetime]
    ended: Optional[datetime.datetime]
    error: str
    pods: list[str]  # candidate pod names, most likely first

    @property
    def seconds(self) -> Optional[float]:
        return (self.ended - self.started).total_seconds() if self.started and self.ended else None


def when(value: Optional[datetime.datetime]) -> Optional[datetime.datetime]:
    """A timestamp of the API, None where unset (the server sends the Unix epoch)."""
    if value is None or value.year < 1971:
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def stages(run) -> list[Stage]:
    """The pipeline's stages this run has reached, in pipeline order (a name seen twice: the latest)."""
    found: dict[str, Stage] = {}
    details = run.run_details.task_details if run.run_details and run.run_details.task_details else []
    for task in details:
        if task.display_name not in STAGE_NAMES:
            continue  # a system node: root DAG, exit handler, condition, driver, executor
        nodes = ([task.pod_name] if task.pod_name else []) + [c.pod_name for c in task.child_tasks or [] if c.pod_name]
        stage = Stage(task.display_name, task.state or "RUNTIME_STATE_UNSPECIFIED", when(task.create_time),
                      when(task.start_time), when(task.end_time), (task.error.message or "") if task.error else "",
                      _pod_names(nodes))
        previous = found.get(stage.name)
        if previous is None or _began(stage) >= _began(previous):
            found[stage.name] = stage
    return [found[name] for name in STAGE_NAMES if name in found]


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _began(stage: Stage) -> datetime.datetime:
    return stage.started or stage.created or _EPOCH


def _pod_names(nodes: list[str]) -> list[str]:
    """Each node's name as given (Argo pod names v1: the node id), then as pod names v2 would name it."""
    names = list(nodes)
    for node in nodes:
        workflow, dash, suffix = node.rpartition("-")
        if dash and suffix.isdigit():
            names += [f"{workflow}-{template}-{suffix}" for template in EXECUTOR_TEMPLATES]
    return list(dict.fromkeys(names))


def stage_named(run, run_id: str, name: str) -> Stage:
    """The stage --stage names (`prepare_data` or `prepare-data`); a wrong name gets the list."""
    found = stages(run)
    for stage in found:
        if stage.name == name.replace("_", "-"):
            return stage
    if name.replace("_", "-") in STAGE_NAMES:
        raise ConfigError("--stage", name, f"run {run_id} has not reached that stage (state {run.state}); "
                                           f"it has: {', '.join(s.name for s in found) or 'no stage yet'}")
    names = [s.name for s in found] or STAGE_NAMES
    raise ConfigError("--stage", name, f"no such stage; give one of {', '.join(names)}")


def failed_stage(found: list[Stage]) -> Optional[Stage]:
    """The stage that failed first; finish-run (the exit handler) only if nothing else did."""
    failed = sorted((s for s in found if s.state == "FAILED"),
                    key=lambda s: (s.name == "finish-run", s.ended or s.started or _EPOCH))
    return failed[0] if failed else None


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def local_time(value: Optional[datetime.datetime], fmt: str = "%H:%M:%S") -> str:
    return value.astimezone().strftime(fmt) if value else "-"


# ---------------------------------------------------------------------------------------------
# runs, logs, cancel.


def mlflow_facts(uri: str, run_ids: list[str]) -> tuple[dict[str, dict[str, str]], str]:
    """(facts by KFP run id, '' or why MLflow could not be asked): listing and following never fail
    because MLflow is away, so any error of the store or its client is turned into the reason."""
    try:
        return pipeline_run_facts(uri, run_ids), ""
    except UserError as exc:
        return {}, exc.fix
    except Exception as exc:  # an MLflow client error of any kind only empties the columns
        return {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def recent_runs(kfp_client, connection: Connection, limit: int, experiment: Optional[str] = None) -> list:
    """The newest `limit` runs of the kubetune pipeline (any version), newest first. The v2beta1
    API cannot filter runs by pipeline (runAPIToModelFieldMap in backend/src/apiserver/model/run.go),
    so pages sorted by created_at desc are read and kept where pipeline_version_reference points at
    the pipeline named kubetune."""
    if limit < 1:
        raise ConfigError("--limit", limit, "list at least 1 run")
    with api_errors(connection, "list the pipelines"):
        found = kfp_client.list_pipelines(filter=name_filter(pipeline.PIPELINE_NAME), namespace=connection.namespace)
    if not found.pipelines:
        return []
    pipeline_id = found.pipelines[0].pipeline_id
    experiment_id = None
    if experiment:
        with api_errors(connection, f"find the experiment {experiment!r}"):
            experiments = kfp_client.list_experiments(filter=name_filter(experiment), namespace=connection.namespace)
        if not experiments.experiments:
            raise ConfigError("--experiment", experiment, f"Kubeflow Pipelines at {connection.host} has no experiment "
                                                          "of that name; leave it out to list every experiment's runs")
        experiment_id = experiments.experiments[0].experiment_id
    runs, token = [], ""
    with api_errors(connection, "list the runs"):
        for _ in range(MAX_PAGES):
            page = kfp_client.list_runs(page_token=token, page_size=PAGE_SIZE, sort_by="created_at desc",
                                        experiment_id=experiment_id, namespace=connection.namespace)
            runs += [r for r in page.runs or [] if r.pipeline_version_reference
                     and r.pipeline_version_reference.pipeline_id == pipeline_id]
            token = page.next_page_token
            if len(runs) >= limit or not token:
                break
    return runs[:limit]


def print_runs(runs: list, facts: dict[str, dict[str, str]], out: Optional[TextIO] = None) -> None:
    out = out or sys.stdout
    now = datetime.datetime.now(datetime.timezone.utc)
    row = "{:<36}  {:<10}  {:<16}  {:>9}  {:<32}  {:<22}  {:<8}  {}"
    print(row.format("RUN ID", "STATE", "STARTED", "DURATION", "MLFLOW RUN", "REGISTERED", "CHAMPION", "NAME"), file=out)
    for run in runs:
        started, finished = when(run.created_at), when(run.finished_at)
        took = duration((finished - started).total_seconds()) if started and finished else (
            f"{duration((now - started).total_seconds())}+" if started else "-")
        mlflow = facts.get(run.run_id, {})
        print(row.format(run.run_id, run.state or "-", local_time(started, "%Y-%m-%d %H:%M"), took,
                         mlflow.get("run_id") or "-",
                         mlflow.get("registered") or ("skipped: same data" if mlflow.get("skipped") else "-"),
                         mlflow.get("champion") or "-",
                         run.display_name or ""), file=out)


def print_stages(run, run_id: str, out: Optional[TextIO] = None) -> None:
    out = out or sys.stdout
    found = stages(run)
    print(f"run {run_id} ({run.display_name}): {run.state}", file=out)
    for stage in found:
        print(f"  {stage.name:<14} {stage.state:<10} {local_time(stage.started, '%Y-%m-%d %H:%M:%S'):<19} "
              f"{duration(stage.seconds):>9}", file=out)
    names = ", ".join(s.name for s in found) or "none yet"
    print(f"kubetune: `kubetune logs {run_id} --stage NAME` prints a stage's log; NAME is one of: {names}", file=out)


def print_log(kfp_client, connection: Connection, run_id: str, stage: Stage, out: Optional[TextIO] = None) -> str:
    """Streams the stage's log (the UI's /k8s/pod/logs) to `out`; returns the pod it came from."""
    import kfp_server_api

    out = out or sys.stdout
    if not stage.pods:
        raise ConfigError("--stage", stage.name, f"the stage is {stage.state} and has no pod yet; try again once it runs")
    api_client = _run_service(kfp_client).api_client
    date = (stage.created or stage.started).date().isoformat() if (stage.created or stage.started) else ""
    missing = []
    for pod in stage.pods:
        query = [("podname", pod), ("runid", run_id)]
        query += [("podnamespace", connection.namespace)] if connection.namespace else []
        query += [("createdat", date)] if date else []
        with api_errors(connection, f"read the log of pod {pod}"):
            try:
                response = api_client.call_api("/k8s/pod/logs", "GET", query_params=query,
                                               header_params={"Accept": "text/plain"}, auth_settings=["Bearer"],
                                               _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            except kfp_server_api.ApiException as exc:
                text = response_body(exc)
                if exc.status == 404 and text != "pod not found":
                    raise ServiceError("--host", connection.host, "serves no /k8s/pod/logs: stage logs come from the "
                                       "KFP UI's server, not the API server; point --host at the UI (e.g. `kubectl -n "
                                       "kubeflow port-forward svc/ml-pipeline-ui 8080:80`, --host http://localhost:8080)"
                                       ) from None
                if exc.status == 422:
                    raise ConfigError("--namespace", None, "the KFP UI is multi-user: give the profile namespace "
                                                           "the run belongs to") from None
                if exc.status in (404, 500):
                    missing.append(f"{pod}: {text[:200]}")
                    continue
                raise
            for chunk in response.stream(65536):
                out.write(chunk.decode(errors="replace"))
            out.flush()
            return pod
    raise ServiceError("--stage", stage.name, f"KFP has no log of the stage's pod ({'; '.join(missing)}): the pod is "
                       "gone and no log archive was found (ARGO_ARCHIVE_LOGS of ml-pipeline-ui); a failed stage's "
                       "error line is its MLflow run's kubetune.error tag (`kubetune wait` shows it)")


def cancel(kfp_client, connection: Connection, run_id: str) -> tuple[str, bool]:
    """(the run's state, whether a terminate request was sent): a run that has ended is left as it is
    (the server would refuse: TerminateRun in backend/src/apiserver/storage/run_store.go only
    changes PENDING, RUNNING, PAUSED or unspecified runs)."""
    run = get_run(kfp_client, connection, run_id)
    if run.state in FINAL or run.state == "CANCELING":
        return run.state, False
    with about_run(connection, run_id, f"terminate run {run_id}"):
        kfp_client.terminate_run(run_id)
    return "CANCELING", True
