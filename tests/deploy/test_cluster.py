"""`kubetune submit | retrain | schedule` against a local stand-in for the KFP REST API.

`KfpApiStandIn` below is NOT Kubeflow Pipelines: it answers the v2beta1 endpoints that kfp.Client
2.17.3 calls for these commands (read from kfp/client/client.py and kfp_server_api), records every
request, and keeps just enough state (pipelines, versions, experiments, runs, recurring runs) to
answer lists with minimal valid responses. It checks no pipeline spec, cron expression or
permission the way a real server would; what only a real cluster can show is listed in the report
of the change that added these tests.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import itertools
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

import pytest
import yaml

from kubetune import __version__
from kubetune.cli import main
from kubetune.run_config import load_config
from kubetune.pipelines.pipeline import PIPELINE_NAME, compile_pipeline

API = "/apis/v2beta1"


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
    """A stand-in for the Kubeflow Pipelines v2beta1 REST API on loopback; not Kubeflow.

    Records every request in `requests` and answers with minimal valid JSON, shaped as
    kfp_server_api's models parse it (note `recurringRuns`, the one camelCase list key).
    `require_token`, when set, makes every endpoint answer 401 without that bearer token.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}  # pipeline id -> versions, oldest first
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.require_token: Optional[str] = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urllib.parse.urlsplit(self.path)
                request = Request(self.command, url.path, dict(urllib.parse.parse_qsl(url.query)),
                                  {k.lower(): v for k, v in self.headers.items()}, body, _multipart_files(self.headers, body))
                with stand_in._lock:
                    stand_in.requests.append(request)
                    status, answer = stand_in.answer(request)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- what the stand-in answers ---------------------------------------------------------------

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

    def answer(self, r: Request) -> tuple[int, dict]:
        if self.require_token and r.headers.get("authorization") != f"Bearer {self.require_token}":
            return 401, {"error": "Unauthenticated", "code": 16, "message": "Unauthenticated"}
        route = (r.method, r.path)
        if route == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if route == ("GET", f"{API}/pipelines"):
            return 200, _page("pipelines", _matching(self.pipelines.values(), r.query.get("filter")))
        if route == ("POST", f"{API}/pipelines/upload"):
            pipeline_id = self._id("pipeline")
            name = r.query["name"]
            self.pipelines[pipeline_id] = {"pipeline_id": pipeline_id, "display_name": name, "name": name,
                                           "namespace": r.query.get("namespace", "")}
            # Like the real server: the uploaded file becomes the pipeline's first version, named after it.
            self.versions[pipeline_id] = [self._version(pipeline_id, name, r.files["uploadfile"])]
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
            run = {**r.json, "run_id": self._id("run"), "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
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
        return 404, {"error": f"the stand-in has no {r.method} {r.path}", "code": 5}

    def _version(self, pipeline_id: str, name: str, package: bytes) -> dict:
        return {"pipeline_id": pipeline_id, "pipeline_version_id": self._id("version"), "display_name": name,
                "name": name, "package": package.decode()}  # `package` is the stand-in's own bookkeeping

    # -- helpers for the tests -------------------------------------------------------------------

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


@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    """A started KfpApiStandIn on a free loopback port; kfp.Client sees no developer context or env."""
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH",
                 "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
                 "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("kfp.client.client.Client._LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setattr("kubetune.launch.cluster.TOKEN_FILE", str(tmp_path / "no-service-account-token"))
    with KfpApiStandIn().serving() as stand_in:
        yield stand_in


@pytest.fixture
def cluster_config(tmp_path):
    """A config a pod can run: every location remote."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": "facebook/opt-125m"},
        "data": {"path": "s3://kubetune-data/quotes.jsonl"},
        "evaluate": {"retention_path": None},
        "register": {"model_name": "quotes-lora"},
        "tracking": {"experiment": "quotes-cluster"},
        "storage": {"uri": "s3://kubetune-artifacts/runs"},
    }))
    return path


def kubetune(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def parameters(run_body: dict) -> dict:
    return run_body["runtime_config"]["parameters"]


def test_submit_uploads_the_compiled_pipeline_and_creates_a_run(kfp_api, cluster_config, capsys, tmp_path):
    code, out, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config))
    assert code == 0, err

    (upload,) = kfp_api.sent("POST", "/pipelines/upload")
    assert upload.query["name"] == PIPELINE_NAME
    compiled = compile_pipeline(tmp_path / "fresh.yaml").read_bytes()
    assert upload.files["uploadfile"] == compiled
    assert list(yaml.safe_load_all(upload.files["uploadfile"])) == list(yaml.safe_load_all(compiled))

    (run,) = [r.json for r in kfp_api.sent("POST", "/runs")]
    (pipeline_id,) = kfp_api.pipelines
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline_id,
                                                 "pipeline_version_id": kfp_api.versions[pipeline_id][0]["pipeline_version_id"]}
    assert "pipeline_spec" not in run  # the run points at the uploaded version, not at an inline copy
    sent = parameters(run)
    assert json.loads(sent["config_json"]) == load_config(cluster_config).to_dict()
    assert {k: v for k, v in sent.items() if k != "config_json"} == {
        "accelerator_type": "nvidia.com/gpu", "accelerator_count": 1,
        "gpu_node_selector": {"nvidia.com/gpu.present": "true"}}
    assert re.fullmatch(r"quotes-lora-\d{8}-\d{6}", run["display_name"])

    (experiment,) = kfp_api.experiments.values()
    assert experiment["display_name"] == "quotes-cluster" and run["experiment_id"] == experiment["experiment_id"]
    (run_id,) = kfp_api.runs
    assert out[-1] == f"{kfp_api.url}/#/runs/details/{run_id}"
    assert out[0] == f"kubetune: pipeline version {PIPELINE_NAME} uploaded"


def test_later_submits_reuse_the_pipeline_experiment_and_unchanged_version(kfp_api, cluster_config, capsys):
    for _ in range(3):
        code, out, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config))
        assert code == 0, err

    assert len(kfp_api.sent("POST", "/pipelines/upload")) == 1
    # The server names the first version after the pipeline; the next submit adds the version named
    # after this code (package version + YAML hash), and the one after that finds and reuses it.
    (version_upload,) = kfp_api.sent("POST", "/pipelines/upload_version")
    assert re.fullmatch(rf"{PIPELINE_NAME}-{re.escape(__version__)}-[0-9a-f]{{12}}", version_upload.query["name"])
    assert out[0] == f"kubetune: pipeline version {version_upload.query['name']} already there"
    assert len(kfp_api.sent("POST", "/experiments")) == 1
    runs = [r.json for r in kfp_api.sent("POST", "/runs")]
    assert len(runs) == 3 and len({run["experiment_id"] for run in runs}) == 1
    versions = [run["pipeline_version_reference"]["pipeline_version_id"] for run in runs]
    assert versions[0] != versions[1] == versions[2]

    code, _, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--experiment", "other")
    assert code == 0, err
    assert sorted(e["display_name"] for e in kfp_api.experiments.values()) == ["other", "quotes-cluster"]


def test_accelerator_parameters_and_auth_reach_the_run(kfp_api, cluster_config, capsys):
    code, _, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--token", "s3cret", "--namespace", "team-a", "--accelerator-type", "amd.com/gpu",
                            "--accelerator-count", "0",
                            "--gpu-node-selector", "pool=a100", "--run-name", "my-run",
                            "--service-account", "kubetune-pipeline")
    assert code == 0, err
    assert all(r.headers.get("authorization") == "Bearer s3cret" for r in kfp_api.requests)
    assert not kfp_api.sent("GET", "/healthz")  # with a namespace kfp.Client does not ask whether KFP is multi-user
    assert kfp_api.sent("POST", "/pipelines/upload")[0].query["namespace"] == "team-a"
    assert kfp_api.sent("POST", "/experiments")[0].json["namespace"] == "team-a"
    (run,) = [r.json for r in kfp_api.sent("POST", "/runs")]
    assert run["display_name"] == "my-run" and run["service_account"] == "kubetune-pipeline"
    assert {k: v for k, v in parameters(run).items() if k != "config_json"} == {
        "accelerator_type": "amd.com/gpu", "accelerator_count": 0,
        "gpu_node_selector": {"pool": "a100"}}


def test_in_a_pod_the_projected_service_account_token_is_the_credential(kfp_api, cluster_config, capsys,
                                                                         monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-1")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    kfp_api.require_token = "sa-token-1"
    code, _, err = kubetune(capsys, "retrain", "--host", kfp_api.url, "--config", str(cluster_config))
    assert code == 0, err
    assert {r.headers["authorization"] for r in kfp_api.requests} == {"Bearer sa-token-1"}

    token_file.write_text("sa-token-2")  # the kubelet rotated it: read again on every request
    kfp_api.require_token = "sa-token-2"
    code, _, err = kubetune(capsys, "retrain", "--host", kfp_api.url, "--config", str(cluster_config))
    assert code == 0, err


def test_retrain_sends_the_overrides_in_config_json(kfp_api, cluster_config, capsys):
    code, out, err = kubetune(capsys, "retrain", "--host", kfp_api.url, "--config", str(cluster_config),
                              "--set", "data.path=s3://kubetune-data/quotes-2.jsonl", "--set", "train.max_steps=7")
    assert code == 0, err
    (run,) = [r.json for r in kfp_api.sent("POST", "/runs")]
    assert run["display_name"].startswith("retrain-quotes-lora-")
    config = json.loads(parameters(run)["config_json"])
    assert config["data"]["path"] == "s3://kubetune-data/quotes-2.jsonl" and config["train"]["max_steps"] == 7
    assert config == load_config(cluster_config, ["data.path=s3://kubetune-data/quotes-2.jsonl",
                                                  "train.max_steps=7"]).to_dict()
    (run_id,) = kfp_api.runs
    assert out[-1] == f"{kfp_api.url}/#/runs/details/{run_id}"


def test_schedule_creates_then_replaces_by_name(kfp_api, cluster_config, capsys):
    base = ["schedule", "--host", kfp_api.url, "--config", str(cluster_config), "--name", "nightly"]
    code, out, err = kubetune(capsys, *base, "--cron", "0 0 3 * * *")
    assert code == 0, err
    (first,) = kfp_api.recurring_runs.values()
    assert first["display_name"] == "nightly" and first["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert first["mode"] == "ENABLE" and first["max_concurrency"] == 1 and first["no_catchup"] is True
    assert first["pipeline_version_reference"]["pipeline_id"] in kfp_api.pipelines
    assert json.loads(parameters(first)["config_json"]) == load_config(cluster_config).to_dict()
    assert out[-1] == f"{kfp_api.url}/#/recurringrun/details/{first['recurring_run_id']}"

    code, _, err = kubetune(capsys, "schedule", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--name", "weekly", "--cron", "@weekly")
    assert code == 0, err
    code, out, err = kubetune(capsys, *base, "--cron", "0 30 4 * * *", "--set", "train.max_steps=9")
    assert code == 0, err

    by_name = {r["display_name"]: r for r in kfp_api.recurring_runs.values()}
    assert sorted(r["display_name"] for r in kfp_api.recurring_runs.values()) == ["nightly", "weekly"]
    assert by_name["nightly"]["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"
    assert json.loads(parameters(by_name["nightly"])["config_json"])["train"]["max_steps"] == 9
    (deleted,) = kfp_api.sent("DELETE", f"/recurringruns/{first['recurring_run_id']}")
    created_last = kfp_api.sent("POST", "/recurringruns")[-1]
    assert kfp_api.requests.index(created_last) < kfp_api.requests.index(deleted)  # never without a schedule
    assert f"replacing {first['recurring_run_id']}" in out[1]


@pytest.mark.parametrize("argv", [
    ["submit", "--set", "train.nope=1"],  # unknown key
    ["submit", "--set", "train.max_steps=many"],  # wrong type
    ["submit"],  # the embedded config reads this machine's files
    ["submit", "--set", "storage.uri=null"],  # checkpoints would die with the pod
    ["submit", "--accelerator-count", "-1"],
    ["submit", "--gpu-node-selector", "pool"],
    ["retrain", "--set", "model.name_or_path=./my-model"],
    ["schedule", "--name", "nightly", "--cron", "0 3 * * *"],  # 5 fields: KFP wants seconds first
    ["schedule", "--name", " ", "--cron", "@daily"],
], ids=lambda argv: " ".join(argv))
def test_bad_input_exits_2_and_sends_nothing(kfp_api, cluster_config, capsys, argv):
    config = [] if argv == ["submit"] else ["--config", str(cluster_config)]
    code, out, err = kubetune(capsys, *argv, *config, "--host", kfp_api.url)
    assert code == 2
    assert err.startswith("kubetune: error: ") and err.count("\n") == 1, err
    assert kfp_api.requests == []


def test_missing_host_exits_2(kfp_api, cluster_config, capsys):
    code, _, err = kubetune(capsys, "submit", "--config", str(cluster_config))
    assert code == 2 and err.startswith("kubetune: error: --host = None: give the Kubeflow Pipelines URL")
    code, _, err = kubetune(capsys, "submit", "--config", str(cluster_config), "--host", "kfp.example.com")
    assert code == 2 and "https://kfp.example.com" in err


@pytest.mark.parametrize("namespace", [[], ["--namespace", "team-a"]], ids=["healthz first", "namespace given"])
def test_refused_token_is_one_line_that_says_what_to_do(kfp_api, cluster_config, capsys, namespace):
    kfp_api.require_token = "right"
    code, _, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--token", "wrong", *namespace)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("kubetune: error: --token = '<hidden>': ") and "HTTP 401" in err and "wrong" not in err
    assert len(kfp_api.requests) == 1  # the first refusal ends it: no retries, nothing uploaded
