"""Training on several nodes through Kubeflow Trainer: the TrainJob the train task submits, and the
Kubernetes API calls to create, follow and delete it. The only module that imports `kubernetes`.

Kubeflow Trainer (v2, trainer.kubeflow.org/v1alpha1) runs a TrainJob on a ClusterTrainingRuntime;
its `torch-distributed` runtime starts numNodes pods and gives each the rendezvous variables
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun
reads as its own flags (../shared/k8s/kubeflow-trainer/README.md). So kubetune's node command is
plain torchrun underneath (kubetune.train_node) and nothing of kubetune's own schedules processes.

Fields relied on, all in the TrainJob CRD's openAPIV3Schema (tests validate the manifest against it):
spec.runtimeRef.name, spec.trainer.{image, command, args, env, numNodes, numProcPerNode,
resourcesPerNode}, spec.runtimePatches[].trainingRuntimeSpec...podSpec {serviceAccountName,
nodeSelector, tolerations}; status.conditions (types Complete and Failed, as the CRD's State column
shows) and status.jobsStatus (active, ready, succeeded, failed per replicated job).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kubetune.errors import ConfigError, ServiceError, UserError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs for PyTorch
NODE_JOB = "node"  # the runtime's replicated job (and container) that runs the training nodes
PATCH_MANAGER = "kubetune.io/train"
DEADLINE_REASON = "DeadlineExceeded"  # a Failed condition's reason past activeDeadlineSeconds (Trainer's KEP-2899)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_REFUSED = object()  # Cluster._call's default: a 404 is a refusal like any other


class TrainJobFailed(Exception):
    """The TrainJob ended Failed (or vanished); the message says which node and why."""


@dataclass
class NodeSettings:
    """How each training node's pod looks on the cluster; pipelines/ fills it (the only place that
    knows the cluster), the train task hands it on."""

    image: str
    accelerator_type: str = ""  # the GPU resource name; "" = no GPU limit (CPU nodes)
    cpu: str = ""
    memory: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    config_maps: dict[str, list[str]] = field(default_factory=dict)  # ConfigMap: keys, each an env var
    secrets: dict[str, list[str]] = field(default_factory=dict)  # Secret: keys (optional), each an env var
    runtime: str = RUNTIME
    # The job's activeDeadlineSeconds (0: none). The train task deletes its job when it is stopped
    # (SIGTERM); a task that dies without a word (a lost node, an OOM kill) cannot, and this bounds
    # how long the GPUs then go on training for nobody.
    deadline_seconds: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NodeSettings":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown or "image" not in data:
            raise ConfigError("node_settings", sorted(unknown) or data, f"give image and any of {sorted(known)}")
        deadline = data.get("deadline_seconds", 0)
        # KFP hands a dict parameter over as a protobuf Struct, whose numbers are doubles (86400.0);
        # the API server and Trainer's Go types take only an integer for activeDeadlineSeconds.
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 <= deadline < 2 ** 63 \
                or deadline % 1:
            raise ConfigError("node_settings.deadline_seconds", deadline, "give whole seconds, 0 for no deadline")
        return cls(**{**data, "deadline_seconds": int(deadline)})


def job_name(run_id: str) -> str:
    """One TrainJob name per run (RFC 1035, at most 63 characters): a retried train task finds its
    predecessor's job by it."""
    return f"kubetune-train-{re.sub(r'[^a-z0-9]', '', run_id.lower())[:40]}"


def environment(settings: NodeSettings) -> list[dict[str, Any]]:
    """The env the train task gets from pipelines/: ConfigMap keys (required) and Secret keys (optional)."""
    env = [{"name": key, "valueFrom": {"configMapKeyRef": {"name": name, "key": key}}}
           for name, keys in settings.config_maps.items() for key in keys]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": True}}}
            for name, keys in settings.secrets.items() for key in keys]
    return env


def manifest(name: str, settings: NodeSettings, nodes: int, processes: int, command: list[str], args: list[str],
             service_account: Optional[str] = None, labels: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The TrainJob: numNodes pods of the runtime, each running command+args with processes GPUs."""
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if settings.accelerator_type:
        limits[settings.accelerator_type] = processes
    for resource, value in (("cpu", settings.cpu), ("memory", settings.memory)):
        if value:
            limits[resource] = requests[resource] = value
    pod: dict[str, Any] = {}
    if service_account:
        pod["serviceAccountName"] = service_account
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    spec: dict[str, Any] = {
        **({"activeDeadlineSeconds": settings.deadline_seconds} if settings.deadline_seconds else {}),
        "runtimeRef": {"name": settings.runtime},
        "trainer": {"image": settings.image, "command": command, "args": args, "numNodes": nodes,
                    "numProcPerNode": processes, "env": environment(settings),
                    "resourcesPerNode": {k: v for k, v in (("limits", limits), ("requests", requests)) if v}},
    }
    if pod:
        spec["runtimePatches"] = [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod}}}}]}}}}]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "kubetune", **(labels or {})}},
            "spec": spec}


class Cluster:
    """The Kubernetes API as this process sees it: in a pod, its ServiceAccount; elsewhere the
    kubeconfig (KUBECONFIG or ~/.kube/config) and its current context's namespace."""

    def __init__(self, field_name: str, value: Any):
        from kubernetes import client, config

        self.field_name, self.value = field_name, value
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
                self.namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            else:
                # read KUBECONFIG now: the client reads it once, when imported
                kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
                config.load_kube_config(config_file=kubeconfig)
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                self.namespace = active.get("context", {}).get("namespace") or "default"
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(field_name, value, "training on several nodes submits a Kubeflow Trainer TrainJob, and "
                              f"no Kubernetes API is configured here ({str(exc).splitlines()[0]}): submit the run to "
                              "a cluster (kubetune submit), or set train.nodes to 1 (train.processes sets the "
                              "processes on one machine)") from None
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def _call(self, what: str, operation: Callable[[], Any], when_missing: Any = _REFUSED) -> Any:
        """operation(), with its refusals as one-line errors and an unreachable API as ServiceError
        (which follow() waits out); a 404 returns when_missing where absence is an answer."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return operation()
        except ApiException as exc:
            if exc.status == 404 and when_missing is not _REFUSED:
                return when_missing
            raise self._refusal(what, exc) from None
        except (HTTPError, OSError) as exc:
            raise ServiceError("Kubernetes API", what, f"no answer ({type(exc).__name__}: {exc}); check that "
                               "the API server is reachable from here") from None

    def _refusal(self, what: str, exc) -> UserError:
        reason = _api_message(exc)
        if exc.status == 404 and what.startswith(("create", "check")) and "trainingruntime" not in reason.lower():
            return ConfigError(self.field_name, self.value, f"this cluster has no TrainJob API ({GROUP}/{VERSION}): "
                               "install Kubeflow Trainer (its CRDs and the torch-distributed runtime), or set "
                               "train.nodes to 1")
        if exc.status == 403 and "admission webhook" not in reason:  # a webhook's denial is a 403 too
            return ConfigError(self.field_name, self.value, f"{what} was refused ({reason}): grant the pipeline's "
                               f"ServiceAccount create, get and delete on trainjobs.{GROUP} in namespace "
                               f"{self.namespace} (kustomize/base/pipeline-rbac.yaml does)")
        if exc.status in (400, 403, 404, 422):
            return ConfigError(self.field_name, self.value, f"{what} was refused by the cluster: {reason}")
        return ServiceError("Kubernetes API", what, f"HTTP {exc.status}: {reason}")

    def create(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        kwargs = {"dry_run": "All"} if dry_run else {}
        return self._call(f"{'check' if dry_run else 'create'} TrainJob {body['metadata']['name']}",
                          lambda: self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                              body, **kwargs))

    def get(self, name: str) -> Optional[dict[str, Any]]:
        """The job; None when there is none."""
        return self._call(f"read TrainJob {name}", lambda: self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name), when_missing=None)

    def delete(self, name: str) -> bool:
        """Deletes the job and (foreground) its pods; False when there was none."""
        def request() -> bool:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                        propagation_policy="Foreground")
            return True

        return self._call(f"delete TrainJob {name}", request, when_missing=False)

    def own_service_account(self) -> Optional[str]:
        """The ServiceAccount of the pod this runs in (the nodes get the same identity, say for S3);
        None outside a pod or where the pod cannot be read."""
        pod_name = os.environ.get("HOSTNAME")
        if not os.environ.get("KUBERNETES_SERVICE_HOST") or not pod_name:
            return None
        try:
            return self.core.read_namespaced_pod(pod_name, self.namespace).spec.service_account_name
        except Exception as exc:  # RBAC or an unusual pod name: the runtime's default account then
            log.warning("could not read this pod (%s); the training nodes run under the namespace's default "
                        "ServiceAccount", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None


def check_available(nodes: int, processes: int, image: str) -> None:
    """Preflight: a server-side dry run of creating a TrainJob like the train task's. It proves the API
    is reachable, the Trainer's CRD is installed, the ServiceAccount may create TrainJobs and (through
    Trainer's admission webhook) that the runtime exists, and creates nothing."""
    cluster = Cluster("train.nodes", nodes)
    body = manifest(job_name("preflight-check"), NodeSettings(image=image), nodes, processes,
                    ["python", "-m", "kubetune.train_node"], ["{}"])
    cluster.create(body, dry_run=True)


def _api_message(exc) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason or exc.body or exc.status)


def state(job: dict[str, Any]) -> tuple[str, str]:
    """(Complete | Failed | Suspended | Running | Pending, the condition's message) of a TrainJob."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}
    for kind in ("Failed", "Complete", "Suspended"):
        if kind in conditions:
            if conditions[kind].get("reason") == DEADLINE_REASON:
                seconds = (job.get("spec") or {}).get("activeDeadlineSeconds")
                limit = f"{seconds} s" if seconds else "the runtime's default"
                return kind, f"stopped at its activeDeadlineSeconds ({limit})"
            return kind, conditions[kind].get("message") or conditions[kind].get("reason") or ""
    jobs = (job.get("status") or {}).get("jobsStatus") or []
    return ("Running" if any(j.get("ready") or j.get("active") for j in jobs) else "Pending"), ""


def progress(job: dict[str, Any]) -> str:
    """One line on the nodes' pods: how many jobs are active, ready, succeeded, failed."""
    jobs = (job.get("status") or {}).get("jobsStatus") or []
    counts = {key: sum(int(j.get(key) or 0) for j in jobs) for key in ("active", "ready", "succeeded", "failed")}
    return ", ".join(f"{value} {key}" for key, value in counts.items() if value) or "no node started yet"


def follow(cluster: Cluster, name: str, poll_seconds: float = 10.0, say: Callable[[str], None] = log.info,
           outage_seconds: float = 900.0) -> tuple[str, str]:
    """Polls the job until Complete or Failed, saying each change of state; returns (state, message).
    Polls every 0.5 s at first, doubling to poll_seconds (a job that fails at once is seen at once).
    An API that stays unreachable past outage_seconds raises ServiceError; a job deleted by someone
    else raises TrainJobFailed."""
    shown, lost_since, interval = None, None, 0.5
    while True:
        interval = min(poll_seconds, interval * 2)
        try:
            job = cluster.get(name)
            lost_since = None
        except ServiceError:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > outage_seconds:
                raise
            time.sleep(interval)
            continue
        if job is None:
            raise TrainJobFailed(f"TrainJob {name} disappeared before it finished (deleted by someone else?)")
        current, message = state(job)
        line = f"TrainJob {name}: {current}" + (f" ({message})" if message else f": {progress(job)}")
        if line != shown:
            say(line)
            shown = line
        if current in ("Complete", "Failed"):
            return current, message
        time.sleep(interval)
