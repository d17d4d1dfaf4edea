"""`KfpApiStandIn`: a loopback stand-in for the Kubeflow Pipelines v2beta1 REST API; NOT Kubeflow.

It answers the endpoints kfp.Client 2.17.3 calls for kubetune's cluster commands (read from
kfp/client/client.py and kfp_server_api/api/*.py), records every request, and keeps just enough
state to answer them, in the JSON shapes kfp_server_api 2.17's models parse and kubeflow/pipelines
defines (backend/api/v2beta1/{run,pipeline,experiment,recurring_run}.proto):

- healthz, pipelines (list, upload, upload_version, list versions), experiments (list, create),
  recurring runs (list as `recurringRuns`, the one camelCase key; create; delete).
- runs: POST /runs; GET /runs (experiment_id, namespace, page_size, page_token, sort_by
  `created_at desc`, filter on display_name, as kfp.Client.list_runs sends them; `runs`,
  `total_size`, `next_page_token`); GET /runs/{id}; POST /runs/{id}:terminate (only a PENDING,
  RUNNING or PAUSED run, else HTTP 400, as TerminateRun in backend/src/apiserver/storage/run_store.go).
- a run (V2beta1Run): run_id, display_name, experiment_id, pipeline_version_reference,
  runtime_config, service_account, storage_state, created_at, scheduled_at, finished_at (the Unix
  epoch while unset, as toApiRun in backend/src/apiserver/server/api_converter.go sends it), state
  (V2beta1RuntimeState: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELING, CANCELED), error {code,
  message}, run_details.task_details.
- task_details (V2beta1PipelineTaskDetail): one per Argo node, as the server converts a workflow
  (toModelTasks, NodeStatuses in backend/src/common/util/workflow.go): the root DAG (named after
  the workflow), exit-handler-1, condition-2, and per pipeline task `<task>-driver`, `<task>` (the
  executor DAG; its child_tasks[].pod_name is its child's node id) and `executor` (the pod). Each
  with run_id, task_id, display_name, create_time, start_time, end_time, state, and error
  {message} where a test gives one. The real server fills neither error nor pod_name of a task
  today (toApiPipelineTaskDetail); the stand-in sets error only where a test asks, to check both.
- GET /k8s/pod/logs?podname=&runid=&podnamespace=&createdat= of the KFP UI's server
  (frontend/server/app.ts, frontend/server/handlers/pod-logs.ts): the pod's log as text, 400
  without podname, 422 without podnamespace when multi-user, 404 `pod not found` for a pod it
  has no log of. Pods are named as Argo's pod names v2 do (<workflow>-<template>-<hash>, node id
  <workflow>-<hash>), or v1 (the node id) with `pod_names = "v1"`.

A test scripts a run's life as a list of `Snapshot`s: each GET of the run moves it to the next one
(the last one stays). It checks no pipeline spec, cron expression or permission as a real server
would.
"""

from __future__ import annotations

import contextlib
import datetime
import email.parser
import email.policy
import itertools
import json
import re
import threading
import urllib.parse
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional, Union

API = "/apis/v2beta1"
# A scripted run's clock starts an hour ago, so the server's times and this machine's read alike.
T0 = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - datetime.timedelta(hours=1)
UNSET = "1970-01-01T00:00:00Z"
FINAL = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}
RETRIED = {"train"}  # tasks with set_retry: Argo runs them with the retry-system-container-* templates


def stamp(seconds: Optional[float]) -> str:
    return UNSET if seconds is None else (T0 + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Task:
    """One pipeline task in a snapshot: its state, start and end (seconds after T0) and error."""

    name: str
    state: str
    start: Optional[float] = None
    end: Optional[float] = None
    error: Optional[str] = None


@dataclass
class Snapshot:
    """The run as one GET shows it."""

    state: str
    tasks: list[Task] = field(default_factory=list)
    error: Optional[str] = None  # the run's error.message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    files: dict[str, bytes] = field(default_factory=dict)  # multipart parts that carry a filename

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body and not self.files else None


class KfpApiStandIn:
    """See the module's docstring. `require_token`, when set, makes every route answer 401 without
    that bearer token; `serves_ui = False` makes it the API server alone (no /k8s/pod/logs)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}  # pipeline id -> versions, oldest first
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}  # as POSTed, plus run_id, workflow and created
        self.snapshots: dict[str, Snapshot] = {}  # each run's current snapshot
        self.timelines: dict[str, list[Snapshot]] = {}  # snapshots still to come
        self.next_timeline: list[Snapshot] = []  # what the next POSTed run goes through
        self.recurring_runs: dict[str, dict] = {}
        self.logs: dict[str, str] = {}  # pod name -> its log
        self.require_token: Optional[str] = None
        self.serves_ui = True
        self.multi_user = False
        self.pod_names = "v2"
        self.hooks: dict[tuple[str, int], Any] = {}  # (run id, nth GET of it) -> called just after answering
        self._gets: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server: an outage cuts pooled connections

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urllib.parse.urlsplit(self.path)
                request = Request(self.command, url.path, dict(urllib.parse.parse_qsl(url.query)),
                                  {k.lower(): v for k, v in self.headers.items()}, body, _multipart_files(self.headers, body))
                with stand_in._lock:
                    stand_in.requests.append(request)
                    status, answer = stand_in.answer(request)
                text = isinstance(answer, str)
                payload = answer.encode() if text else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    @contextlib.contextmanager
    def serving(self) -> Iterator["KfpApiStandIn"]:
        """Answer requests in a background thread for as long as the block runs."""
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(timeout=5)

    # -- what the stand-in answers ---------------------------------------------------------------

    def answer(self, r: Request) -> tuple[int, Union[dict, str]]:
        if self.require_token and r.headers.get("authorization") != f"Bearer {self.require_token}":
            return 401, {"error": "Unauthenticated", "code": 16, "message": "Unauthenticated"}
        route = (r.method, r.path)
        if r.path in ("/k8s/pod/logs", "/pipeline/k8s/pod/logs") and r.method == "GET":
            return self._pod_logs(r)
        if route == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
        if route == ("GET", f"{API}/pipelines"):
            return 200, _page("pipelines", _matching(self.pipelines.values(), r.query.get("filter")))
        if route == ("POST", f"{API}/pipelines/upload"):
            pipeline_id = self.add_pipeline(r.query["name"], r.query.get("namespace", ""))
            # Like the real server: the uploaded file becomes the pipeline's first version, named after it.
            self.versions[pipeline_id] = [self._version(pipeline_id, r.query["name"], r.files["uploadfile"])]
            return 200, self.pipelines[pipeline_id]
        if route == ("POST", f"{API}/pipelines/upload_version"):
            version = self._version(r.query["pipelineid"], r.query["name"], r.files["uploadfile"])
            self.versions[r.query["pipelineid"]].append(version)
            return 200, version
        versions = re.fullmatch(f"{API}/pipelines/([^/]+)/versions", r.path)
        if r.method == "GET" and versions:
            found = _matching(self.versions.get(versions.group(1), []), r.query.get("filter"))
            if r.query.get("sort_by") == "created_at desc":
                found = found[::-1]
            return 200, _page("pipeline_versions", found[: int(r.query.get("page_size", 100))])
        if route == ("GET", f"{API}/experiments"):
            found = [e for e in self.experiments.values() if e["namespace"] == r.query.get("namespace", "")]
            return 200, _page("experiments", _matching(found, r.query.get("filter")))
        if route == ("POST", f"{API}/experiments"):
            experiment = {**r.json, "experiment_id": self._id("experiment")}
            experiment.setdefault("namespace", "")
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if route == ("POST", f"{API}/runs"):
            run_id = self.add_run(r.json, self.next_timeline)
            return 200, self._render(run_id)
        if route == ("GET", f"{API}/runs"):
            return 200, self._list_runs(r.query)
        run = re.fullmatch(f"{API}/runs/([^/:]+)(:terminate)?", r.path)
        if run and (r.method, bool(run.group(2))) in (("GET", False), ("POST", True)):
            run_id = run.group(1)
            if run_id not in self.runs:
                message = f"Failed to get run: ResourceNotFoundError: Run {run_id} not found"
                return 404, {"error": message, "code": 5, "message": message, "details": []}
            if r.method == "POST":
                return self._terminate(run_id)
            if self.timelines[run_id]:
                self.snapshots[run_id] = self.timelines[run_id].pop(0)
            self._gets[run_id] = self._gets.get(run_id, 0) + 1
            if (run_id, self._gets[run_id]) in self.hooks:  # after this answer has gone out
                threading.Timer(0.05, self.hooks.pop((run_id, self._gets[run_id]))).start()
            return 200, self._render(run_id)
        if route == ("GET", f"{API}/recurringruns"):
            return 200, _page("recurringRuns", list(self.recurring_runs.values()))
        if route == ("POST", f"{API}/recurringruns"):
            recurring = {**r.json, "recurring_run_id": self._id("recurring"), "status": "ENABLED"}
            self.recurring_runs[recurring["recurring_run_id"]] = recurring
            return 200, recurring
        recurring = re.fullmatch(f"{API}/recurringruns/([^/:]+)", r.path)
        if r.method == "DELETE" and recurring and recurring.group(1) in self.recurring_runs:
            del self.recurring_runs[recurring.group(1)]
            return 200, {}
        return 404, "404 page not found"  # what the API server's mux says to a path it has no route for

    def _version(self, pipeline_id: str, name: str, package: bytes) -> dict:
        return {"pipeline_id": pipeline_id, "pipeline_version_id": self._id("version"), "display_name": name,
                "name": name, "package": package.decode()}  # `package` is the stand-in's own bookkeeping

    def _list_runs(self, query: dict[str, str]) -> dict:
        runs = [r for r in self.runs.values() if r.get("experiment_id") == query["experiment_id"]] \
            if query.get("experiment_id") else list(self.runs.values())
        runs = _matching(runs, query.get("filter"))
        sort_by = query.get("sort_by", "")
        assert sort_by in ("", "created_at desc", "created_at"), f"the stand-in does not sort by {sort_by!r}"
        runs.sort(key=lambda run: run["created"], reverse=sort_by == "created_at desc")
        start, size = int(query.get("page_token") or 0), int(query.get("page_size") or 10)
        page = {"runs": [self._render(r["run_id"]) for r in runs[start:start + size]], "total_size": len(runs)}
        if start + size < len(runs):
            page["next_page_token"] = str(start + size)  # opaque to the client, as the server's tokens are
        return page if page["runs"] else {"total_size": len(runs)}

    def _terminate(self, run_id: str) -> tuple[int, dict]:
        snapshot = self.snapshots[run_id]
        if snapshot.state not in ("PENDING", "RUNNING", "PAUSED", "RUNTIME_STATE_UNSPECIFIED"):
            message = f"Failed to terminate a run {run_id}. Row not found"
            return 400, {"error": message, "code": 3, "message": message, "details": []}
        # Argo stops the workflow's pods: their nodes fail, and the persistence agent reports CANCELED.
        stopped = [Task(t.name, "FAILED" if t.state not in FINAL else t.state, t.start,
                        t.end if t.state in FINAL else t.start, t.error) for t in snapshot.tasks]
        self.snapshots[run_id] = Snapshot("CANCELING", snapshot.tasks)
        self.timelines[run_id] = [Snapshot("CANCELING", snapshot.tasks), Snapshot("CANCELED", stopped)]
        return 200, {}

    def _render(self, run_id: str) -> dict:
        run, snapshot = self.runs[run_id], self.snapshots[run_id]
        ends = [t.end for t in snapshot.tasks if t.end is not None]
        rendered = {key: value for key, value in run.items() if key not in ("workflow", "created")}
        rendered.update({
            "storage_state": "AVAILABLE", "state": snapshot.state,
            "created_at": stamp(run["created"]), "scheduled_at": stamp(run["created"]),
            "finished_at": stamp(run["created"] + max(ends, default=0) if snapshot.state in FINAL else None),
            "run_details": {"task_details": self._task_details(run_id, snapshot)},
        })
        if snapshot.error:
            rendered["error"] = {"code": 2, "message": snapshot.error, "details": []}
        return rendered

    def _task_details(self, run_id: str, snapshot: Snapshot) -> list[dict]:
        workflow, at = self.runs[run_id]["workflow"], self.runs[run_id]["created"]  # task times count from here

        def node(name: str, state: str, start: Optional[float], end: Optional[float], error: Optional[str] = None):
            task_id = f"{zlib.crc32(f'{run_id}/{name}'.encode()):08x}-task"  # the same node keeps its id
            found = {"run_id": run_id, "task_id": task_id, "display_name": name,
                     "create_time": stamp(None if start is None else at + start),
                     "start_time": stamp(None if start is None else at + start),
                     "end_time": stamp(None if end is None else at + end), "state": state, "execution_id": "0"}
            if error:
                found["error"] = {"code": 2, "message": error, "details": []}
            return found

        system = "RUNNING" if snapshot.state not in FINAL else snapshot.state
        nodes = [node(workflow, system, 0, None), node("exit-handler-1", system, 0, None),
                 node("condition-2", system, 1, None)]
        for task in snapshot.tasks:
            end = task.end if task.state in FINAL else None
            driver = node(f"{task.name}-driver", "SUCCEEDED" if task.start is not None else "RUNNING",
                          task.start, task.start)
            dag = node(task.name, task.state, task.start, end, task.error)
            dag["child_tasks"] = [{"pod_name": self.node_id(run_id, task.name)}]
            nodes += [driver, dag, node("executor", task.state, task.start, end)]
        return nodes

    def _pod_logs(self, r: Request) -> tuple[int, str]:
        if not self.serves_ui:
            return 404, "404 page not found"
        if not r.query.get("podname"):
            return 400, "podname argument is required"
        if self.multi_user and not r.query.get("podnamespace"):
            return 422, "podnamespace argument is required"
        if r.query["podname"] not in self.logs:
            return 404, "pod not found"
        return 200, self.logs[r.query["podname"]]

    # -- helpers for the tests -------------------------------------------------------------------

    def add_pipeline(self, name: str, namespace: str = "") -> str:
        pipeline_id = self._id("pipeline")
        self.pipelines[pipeline_id] = {"pipeline_id": pipeline_id, "display_name": name, "name": name,
                                       "namespace": namespace}
        return pipeline_id

    def add_run(self, body: dict, timeline: list[Snapshot]) -> str:
        """A run as POST /runs makes it, going through `timeline` (PENDING until the first GET)."""
        run_id = self._id("run")
        created = 60.0 * len(self.runs)  # a minute apart, in the order they are made
        self.runs[run_id] = {**body, "run_id": run_id, "created": created,
                             "workflow": f"kubetune-{zlib.crc32(run_id.encode()) % 100000:05d}"}
        self.snapshots[run_id] = Snapshot("PENDING")
        self.timelines[run_id] = list(timeline)
        return run_id

    def node_id(self, run_id: str, task: str) -> str:
        """The Argo node id of a task's executor pod: <workflow>-<hash>."""
        return f"{self.runs[run_id]['workflow']}-{zlib.crc32(f'{run_id}/{task}'.encode()):010d}"

    def pod_name(self, run_id: str, task: str) -> str:
        """The pod's name: the node id with pod names v1, <workflow>-<template>-<hash> with v2."""
        node = self.node_id(run_id, task)
        if self.pod_names == "v1":
            return node
        workflow, _, hash_ = node.rpartition("-")
        template = "retry-system-container-impl" if task in RETRIED else "system-container-impl"
        return f"{workflow}-{template}-{hash_}"

    def sent(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == f"{API}{path}"]


def _multipart_files(headers: Any, body: bytes) -> dict[str, bytes]:
    content_type = headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data"):
        return {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts() if part.get_filename()}


def _matching(items: Any, filter_json: Optional[str]) -> list[dict]:
    """The one filter kfp.Client sends here: display_name EQUALS <name>."""
    items = list(items)
    if not filter_json:
        return items
    (predicate,) = json.loads(filter_json)["predicates"]
    assert predicate["key"] == "display_name" and predicate["operation"] in ("EQUALS", 1), predicate
    return [item for item in items if item["display_name"] == predicate["stringValue"]]


def _page(key: str, items: list[dict]) -> dict:
    return {key: items, "total_size": len(items)} if items else {"total_size": 0}
