"""The TrainJob kubetune submits, checked against Kubeflow Trainer's own API files in
../shared/k8s/kubeflow-trainer/ (the CRD's openAPIV3Schema, the torch-distributed runtime), and how
its status is read. No cluster: the schema is what the API server would validate against."""

import json
import socket
import time

import pytest
import yaml

from kubetune import distributed, nodes, trainjob
from kubetune.errors import ConfigError, ServiceError
from kubetune.images import CPU_IMAGE
from kubetune.pipelines.pipeline import COMPILED, GPU_NODE_SELECTOR, STAGES, TRAIN_NODES
from trainer_stand_in import TrainerStandIn, runtime_names, validate_trainjob


def pipeline_manifest(**overrides) -> dict:
    settings = trainjob.NodeSettings.from_dict({**TRAIN_NODES, "accelerator_type": "nvidia.com/gpu",
                                                "node_selector": GPU_NODE_SELECTOR})
    command, args = nodes.node_command(json.dumps({"task": "causal_lm"}), "0f" * 16, "a1b2c3d4")
    arguments = {"name": trainjob.job_name("0f" * 16), "settings": settings, "nodes": 4, "processes": 8,
                 "command": command, "args": args, "service_account": "kubetune-pipeline", **overrides}
    return trainjob.manifest(**arguments)


def test_the_pipelines_trainjob_is_valid_against_the_crd_and_names_an_installed_runtime():
    body = pipeline_manifest()
    assert validate_trainjob(body) == []
    assert body["spec"]["runtimeRef"]["name"] in runtime_names() == {"torch-distributed"}
    trainer = body["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["command"] == ["python", "-m", "kubetune.train_node"]
    assert json.loads(trainer["args"][0])["attempt"] == "a1b2c3d4"
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"  # the runtime's replicated job
    assert pod["template"]["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-pipeline"
    # a task that dies without deleting its job: the job stops when the task's own attempt would have
    assert body["spec"]["activeDeadlineSeconds"] == STAGES["train"].timeout_minutes * 60


def test_the_nodes_get_the_train_tasks_endpoints_and_secrets():
    from kubetune.pipelines.pipeline import ENDPOINT_KEYS, SECRETS_AS_ENV

    env = {entry["name"]: entry["valueFrom"] for entry in pipeline_manifest()["spec"]["trainer"]["env"]}
    assert set(env) == set(ENDPOINT_KEYS) | {key for keys in SECRETS_AS_ENV.values() for key in keys}
    assert all(env[key]["configMapKeyRef"]["name"] == "kubetune-endpoints" for key in ENDPOINT_KEYS)
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {"name": "kubetune-s3", "key": "AWS_ACCESS_KEY_ID",
                                                        "optional": True}


def test_a_cpu_job_asks_for_no_gpu_and_the_schema_catches_a_broken_body():
    body = pipeline_manifest(settings=trainjob.NodeSettings(image=CPU_IMAGE), service_account=None)
    assert "limits" not in body["spec"]["trainer"]["resourcesPerNode"] and "runtimePatches" not in body["spec"]
    assert validate_trainjob(body) == []
    body["spec"]["trainer"]["numNodes"] = "4"
    body["spec"]["trainer"]["nodes"] = 4
    body["spec"]["activeDeadlineSeconds"] = 86400.0  # what a protobuf Struct makes of 86400
    problems = validate_trainjob(body)
    assert any("numNodes" in p for p in problems) and "unknown field spec.trainer.nodes" in problems
    assert "spec.activeDeadlineSeconds: 86400.0 is not an integer" in problems


@pytest.mark.parametrize("run_id", ["0123456789abcdef0123456789abcdef", "RUN_with.Odd-chars", "9" * 80])
def test_job_names_are_dns_labels_for_any_run_id(run_id):
    name = trainjob.job_name(run_id)
    assert validate_trainjob({**pipeline_manifest(), "metadata": {"name": name}}) == []
    assert trainjob.job_name(run_id) == name  # a retried task finds its predecessor by it


def test_the_deadline_reaches_the_api_as_an_integer_when_kfp_hands_it_over_as_a_double():
    """The compiled pipeline stores node_settings as a protobuf Struct: 86400 becomes 86400.0."""
    def constants(node):  # every node_settings value the compiled pipeline passes as a constant
        if isinstance(node, dict):
            if "node_settings" in node and "runtimeValue" in node["node_settings"]:
                yield node["node_settings"]["runtimeValue"]["constant"]
            for value in node.values():
                yield from constants(value)
        elif isinstance(node, list):
            for value in node:
                yield from constants(value)

    [settings] = list(constants(list(yaml.safe_load_all(COMPILED.read_text()))))
    assert settings["deadline_seconds"] == 86400.0
    body = pipeline_manifest(settings=trainjob.NodeSettings.from_dict(settings))
    assert '"activeDeadlineSeconds": 86400,' in json.dumps(body)
    for bad in (-1, 1.5, "1d", True, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="node_settings.deadline_seconds"):
            trainjob.NodeSettings.from_dict({**TRAIN_NODES, "deadline_seconds": bad})


def test_node_settings_refuse_unknown_keys():
    with pytest.raises(ConfigError, match="node_settings"):
        trainjob.NodeSettings.from_dict({**TRAIN_NODES, "gpus": 8})


@pytest.mark.parametrize("status, expected", [
    ({}, ("Pending", "")),
    ({"jobsStatus": [{"name": "node", "active": 1, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]},
     ("Running", "")),
    ({"conditions": [{"type": "Complete", "status": "True", "message": "jobset completed"}]},
     ("Complete", "jobset completed")),
    ({"conditions": [{"type": "Complete", "status": "False"},
                     {"type": "Failed", "status": "True", "reason": "JobSetFailed"}]}, ("Failed", "JobSetFailed")),
    ({"conditions": [{"type": "Suspended", "status": "True", "message": "suspended by Kueue"}]},
     ("Suspended", "suspended by Kueue")),
    ({"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "deadline"}]},
     ("Failed", "stopped at its activeDeadlineSeconds (86400 s)")),
])
def test_state_reads_the_conditions(status, expected):
    assert trainjob.state({"spec": {"activeDeadlineSeconds": 86400}, "status": status}) == expected


def test_no_kubernetes_api_configured_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(ConfigError) as refused:
        trainjob.Cluster("train.nodes", 2)
    message = str(refused.value)
    assert message.startswith("train.nodes = 2: ") and "no Kubernetes API is configured here" in message
    assert "\n" not in message and "set train.nodes to 1" in message


def test_an_unreachable_api_is_a_service_error_for_every_call_and_follow_waits_it_out(tmp_path, monkeypatch):
    """Nothing listens where the kubeconfig points (the stand-in's kubeconfig, the stand-in not serving):
    every call is a ServiceError, which is what follow() retries until outage_seconds have passed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    silent = TrainerStandIn(tmp_path)
    silent.url = f"http://127.0.0.1:{port}"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(silent.kubeconfig(tmp_path / "kubeconfig")))
    cluster = trainjob.Cluster("train.nodes", 2)
    for call in (lambda: cluster.get("x"), lambda: cluster.delete("x"), lambda: cluster.create(pipeline_manifest())):
        with pytest.raises(ServiceError, match="Kubernetes API"):
            call()
    said = []
    started = time.monotonic()
    with pytest.raises(ServiceError):
        trainjob.follow(cluster, "x", poll_seconds=0.2, say=said.append, outage_seconds=1)
    assert time.monotonic() - started >= 1 and said == []


def test_a_node_runs_torchrun_with_no_rendezvous_flags(monkeypatch):
    """Everything about the other nodes reaches torchrun through the PET_* variables Trainer sets."""
    seen = {}

    class Finished:
        def __init__(self, command, **kwargs):
            seen["command"] = command
            self.stdout, self.returncode = iter(["step 1\n"]), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(distributed.subprocess, "Popen", Finished)
    distributed.launch_node("kubetune.train_worker", {"a": 1})
    command = seen["command"]
    assert command[1:4] == ["-m", "torch.distributed.run", "-m"] and command[4] == "kubetune.train_worker"
    assert not [part for part in command if part.startswith("--")]


@pytest.mark.parametrize("lines, expected", [
    (["Traceback (most recent call last):", '  File "x.py"', "kubetune.errors.DataError: data.path = 'x': no",
      "[rank0]: torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "====="],
     "kubetune.errors.DataError: data.path = 'x': no"),
    (["RuntimeError: [gloo] Connection closed by peer", "E1207 12:00:00 failed"],
     "RuntimeError: [gloo] Connection closed by peer"),
    (["starting", "Killed", ""], "Killed"),
    (["[rank1]: ValueError: bad shape", "[rank1]: more"], "ValueError: bad shape"),
])
def test_error_line_is_the_workers_last_exception(lines, expected):
    assert distributed.error_line(lines) == expected


def test_an_admission_webhooks_denial_is_not_taken_for_rbac():
    """Trainer's webhook refuses (HTTP 403 by Kubernetes' default) a TrainJob whose runtime is missing."""
    from kubernetes.client.exceptions import ApiException

    cluster = trainjob.Cluster.__new__(trainjob.Cluster)
    cluster.field_name, cluster.value, cluster.namespace = "train.nodes", 2, "kubetune"
    denial = ApiException(status=403, reason="Forbidden")
    denial.body = json.dumps({"message": 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the '
                                        'request: ClusterTrainingRuntime "torch-distributed" not found'})
    message = str(cluster._refusal("create TrainJob x", denial))
    assert "was refused by the cluster: admission webhook" in message and "grant" not in message
