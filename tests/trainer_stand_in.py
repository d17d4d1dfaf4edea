"""`TrainerStandIn`: a loopback stand-in for the Kubernetes API with Kubeflow Trainer installed; NOT
Kubernetes. There is no cluster here (nothing but this can stand in for one); everything below it is
real: each node of a TrainJob is a real process started from the job's own image command, args and
env, and the nodes meet through exactly the PET_* variables Trainer's torch runtime sets.

What it answers (the calls kubernetes' Python client 30 makes for kubetune.trainjob):
- POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs (also ?dryRun=All): the body is
  validated as the API server would, against the TrainJob CRD's openAPIV3Schema in
  ../shared/k8s/kubeflow-trainer/ (types, required fields, formats' ranges, unknown fields
  refused as with strict field validation, and the CRD's CEL rules on the name), then the runtime
  it names must exist (runtime_torch_distributed.yaml: torch-distributed), as Trainer's admission
  webhook checks; 409 if the name is taken. A created job starts: numNodes processes.
- GET .../trainjobs/{name}: status.conditions (Complete or Failed, status "True", with a message,
  when every node exited 0 or when one failed, after which the others are stopped, as the
  JobSet's default failure policy does) and status.jobsStatus for the `node` job.
- spec.activeDeadlineSeconds: once past it (counted from creation), the nodes are stopped and the
  job is Failed with reason DeadlineExceeded (Trainer's reason; the message is the stand-in's).
- DELETE .../trainjobs/{name}: stops the nodes (SIGKILL to each process group), forgets the job.
- mode "absent": no Trainer (404 on trainjobs); "forbidden": RBAC refuses (403).

Each node process gets: the job's env with configMapKeyRef/secretKeyRef resolved from the
stand-in's `config_maps` and `secrets` (a missing optional Secret leaves the variable out), then
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR=127.0.0.1 and PET_MASTER_PORT,
plus `base_env`. A node is a process with a PATH on which `python` is the test's own interpreter, or
with `podman` set, a container of the job's image on the host network (`podman run --rm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import yaml

TRAINER_DIR = Path(__file__).resolve().parents[2] / "shared" / "k8s" / "kubeflow-trainer"
PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((TRAINER_DIR / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return version["schema"]["openAPIV3Schema"]


def runtime_names() -> set[str]:
    return {doc["metadata"]["name"] for doc in yaml.safe_load_all((TRAINER_DIR / "runtime_torch_distributed.yaml").read_text())
            if doc and doc.get("kind") == "ClusterTrainingRuntime"}


def _structural_problems(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Fields the structural schema does not declare (the API server drops or, strictly, refuses
    them), and numbers with a decimal point where it says integer (jsonschema takes 86400.0 as an
    integer; Trainer's Go types, int32 and int64, do not)."""
    found = []
    if schema.get("type") == "integer" and isinstance(value, float):
        found.append(f"{path.lstrip('.')}: {value!r} is not an integer")
    if isinstance(value, dict) and schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += _structural_problems(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += _structural_problems(item, extra, f"{path}.{key}")
            elif properties is not None:
                found.append("unknown field " + f"{path}.{key}".lstrip("."))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += _structural_problems(item, schema["items"], f"{path}[{index}]")
    return found


def validate_trainjob(body: dict[str, Any]) -> list[str]:
    """What the API server (and Trainer's webhook) would refuse in body; empty when it is valid."""
    import jsonschema

    schema = crd_schema()
    problems = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
                for error in jsonschema.Draft7Validator(schema).iter_errors(body)]
    problems += _structural_problems(body, schema, "")
    name = (body.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:  # the CRD's CEL rules
        problems.append(f"metadata.name {name!r} must be an RFC 1035 label of at most 63 characters")
    trainer = (body.get("spec") or {}).get("trainer") or {}
    if "numProcPerNode" in trainer and trainer["numProcPerNode"] < 1:
        problems.append("numProcPerNode must be greater than or equal to 1")
    runtime = ((body.get("spec") or {}).get("runtimeRef") or {}).get("name")
    if not problems and runtime not in runtime_names():
        problems.append(f"ClusterTrainingRuntime {runtime!r} not found")
    return problems


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    def __init__(self, body: dict[str, Any], processes: list[subprocess.Popen], logs: list[Path],
                 containers: list[str], podman=None):
        self.body, self.processes, self.logs = body, processes, logs
        self.containers, self.podman = containers, podman
        self.failed_node: Optional[int] = None
        self.stopped = False
        self.started = time.monotonic()
        self.past_deadline = False

    def status(self) -> dict[str, Any]:
        codes = [p.poll() for p in self.processes]
        deadline = self.body["spec"].get("activeDeadlineSeconds")
        finished = self.failed_node is not None or all(code == 0 for code in codes)
        if deadline and not finished and not self.past_deadline and time.monotonic() - self.started > deadline:
            self.past_deadline = True
            self.stop()
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None and self.failed_node is None and not self.past_deadline:
            self.failed_node = failed
            self.stop()  # the JobSet fails as a whole: the other nodes are stopped
        codes = [p.poll() for p in self.processes]
        running = sum(code is None for code in codes)
        conditions = []
        if self.past_deadline:  # Trainer's reason (its KEP-2899); the message is the stand-in's own
            conditions.append({"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                               "message": f"TrainJob ran past activeDeadlineSeconds {deadline}"})
        elif self.failed_node is not None:
            code = self.processes[self.failed_node].poll()
            conditions.append({"type": "Failed", "status": "True", "reason": "JobSetFailed",
                               "message": f"jobset failed: node-{self.failed_node} pod exited with {code}"})
        elif all(code == 0 for code in codes):
            conditions.append({"type": "Complete", "status": "True", "reason": "JobSetCompleted",
                               "message": "jobset completed"})
        job = {"name": "node", "active": 1 if running else 0, "ready": 1 if running else 0,
               "succeeded": 1 if conditions and conditions[0]["type"] == "Complete" else 0,
               "failed": 1 if self.failed_node is not None or self.past_deadline else 0, "suspended": 0}
        return {"conditions": conditions, "jobsStatus": [job]}

    def stop(self) -> None:
        for name in self.containers:  # the podman client is not the container: remove the container itself
            self.podman.run("rm", "--force", "--ignore", "--time", "0", name, check=False, timeout=120)
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()


class TrainerStandIn:
    def __init__(self, work: Path, mode: str = "installed"):
        self.work, self.mode = work, mode
        self.jobs: dict[str, Job] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.config_maps: dict[str, dict[str, str]] = {}
        self.secrets: dict[str, dict[str, str]] = {}
        self.base_env: dict[str, str] = {}
        self.podman = None  # a kubetune.containers.Podman: each node its own container of the job's image
        self.lock = threading.Lock()

    # ---- what a test does ----------------------------------------------------------------------
    def kubeconfig(self, path: Path, namespace: str = "kubetune") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "stand-in", "user": {"token": "stand-in-token"}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in",
                                                          "namespace": namespace}}]}))
        return path

    def kill_node(self, name: str, rank: int) -> None:
        """SIGKILL one node, as a lost machine or an OOM kill would end it."""
        job = self.jobs[name]
        if job.containers:
            self.podman.run("kill", "--signal", "KILL", job.containers[rank], check=False, timeout=60)
        else:
            os.killpg(job.processes[rank].pid, signal.SIGKILL)

    def node_log(self, name: str, rank: int) -> str:
        return self.jobs[name].logs[rank].read_text(errors="replace")

    @contextlib.contextmanager
    def serving(self):
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            for job in self.jobs.values():
                job.stop()

    # ---- the API -------------------------------------------------------------------------------
    def _env(self, body: dict[str, Any], rank: int, port: int) -> dict[str, str]:
        env = dict(self.base_env)
        for entry in body["spec"]["trainer"].get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            source = entry["valueFrom"]
            ref, store = ((source["configMapKeyRef"], self.config_maps) if "configMapKeyRef" in source
                          else (source["secretKeyRef"], self.secrets))
            value = store.get(ref["name"], {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise ValueError(f"{entry['name']}: {ref['name']}/{ref['key']} missing (the pod would not start)")
            if value is not None:
                env[entry["name"]] = value
        trainer = body["spec"]["trainer"]
        env.update({"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                    "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)})
        return env

    def _start(self, body: dict[str, Any]) -> Job:
        trainer = body["spec"]["trainer"]
        port = _free_port()
        folder = self.work / body["metadata"]["name"] / uuid.uuid4().hex[:6]
        folder.mkdir(parents=True)
        processes, logs, containers = [], [], []
        for rank in range(trainer["numNodes"]):
            log_path = folder / f"node-{rank}.log"
            env = self._env(body, rank, port)
            command = trainer["command"] + trainer.get("args", [])
            if self.podman is not None:
                containers.append(f"{body['metadata']['name']}-{folder.name}-node-{rank}")
                command = self.podman.argv("run", "--rm", "--name", containers[-1], "--network", "host",
                                           *self.podman.ulimit_args(), *[f"--env={k}={v}" for k, v in env.items()],
                                           trainer["image"], *command)
                env = dict(os.environ)  # the podman client's own
            else:  # the image's `python` is the one running the tests (in the images: /opt/venv/bin on PATH)
                env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
            with log_path.open("w") as log_file:
                processes.append(subprocess.Popen(command, cwd=folder, env=env, stdout=log_file,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            logs.append(log_path)
        return Job(body, processes, logs, containers, self.podman)

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                   "reason": reason, "code": code})

            def _route(self) -> Optional[tuple[str, Optional[str]]]:
                path = self.path.split("?")[0]
                if not path.startswith(PREFIX):
                    return None
                parts = path[len(PREFIX):].split("/")
                if len(parts) < 2 or parts[1] != "trainjobs":
                    return None
                return parts[0], (parts[2] if len(parts) > 2 else None)

            def _refused(self) -> bool:
                if stand_in.mode == "absent":
                    self._status(404, "NotFound", "the server could not find the requested resource")
                    return True
                if stand_in.mode == "forbidden":
                    self._status(403, "Forbidden", 'trainjobs.trainer.kubeflow.org is forbidden: User '
                                 '"system:serviceaccount:kubetune:kubetune-pipeline" cannot create resource '
                                 '"trainjobs" in API group "trainer.kubeflow.org" in the namespace "kubetune"')
                    return True
                return False

            def do_POST(self):
                route = self._route()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                stand_in.requests.append(("POST", self.path, body))
                if route is None:
                    return self._status(404, "NotFound", "not found")
                if self._refused():
                    return
                problems = validate_trainjob(body)
                if problems:
                    return self._status(422, "Invalid", f"TrainJob.trainer.kubeflow.org \"{body.get('metadata', {}).get('name')}\" "
                                        f"is invalid: {'; '.join(problems)}")
                name = body["metadata"]["name"]
                with stand_in.lock:
                    if name in stand_in.jobs:
                        return self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
                    created = {**body, "metadata": {**body["metadata"], "namespace": route[0], "uid": str(uuid.uuid4())}}
                    if "dryRun=All" not in self.path:
                        stand_in.jobs[name] = stand_in._start(created)
                self._reply(201, created)

            def do_GET(self):
                route = self._route()
                stand_in.requests.append(("GET", self.path, None))
                if route is None or route[1] is None:
                    return self._status(404, "NotFound", "not found")
                if self._refused():
                    return
                job = stand_in.jobs.get(route[1])
                if job is None:
                    return self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{route[1]}" not found')
                self._reply(200, {**job.body, "status": job.status()})

            def do_DELETE(self):
                route = self._route()
                stand_in.requests.append(("DELETE", self.path, None))
                if route is None or route[1] is None:
                    return self._status(404, "NotFound", "not found")
                if self._refused():
                    return
                with stand_in.lock:
                    job = stand_in.jobs.pop(route[1], None)
                if job is None:
                    return self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{route[1]}" not found')
                job.stop()
                self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        return Handler
