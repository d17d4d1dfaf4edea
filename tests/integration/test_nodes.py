"""train.nodes: the train component as a cluster runs it, following a TrainJob of two nodes.

The Kubernetes API is tests/trainer_stand_in.py (there is no cluster here; that is the one stand-in).
Everything else is real: the TrainJob body is the one kubetune builds (validated against the CRD's
schema by the stand-in), each node is a separate process started from that body's command, args and
env (ConfigMap and Secret references resolved), the nodes rendezvous on loopback through the PET_*
variables alone, storage is S3 (moto on loopback) and MLflow a sqlite store.

Loss equality: 2 nodes x 1 process, 1 node x 2 processes and one process, with the same global batch
(8 rows a step) and a fixed data order, train on the same rows each step, so their losses may differ
only by floating-point summation order (tolerance as in test_sharding.py).
"""

import json
import threading
import time
from pathlib import Path

import pytest
from kfp import dsl

from kubetune import tracking
from kubetune.errors import ConfigError
from kubetune.pipelines.pipeline import TRAIN_NODES
from kubetune.trainjob import TrainJobFailed, job_name
from tiny import losses, run_stages, tiny_run_config, train_again
from trainer_stand_in import TrainerStandIn, validate_trainjob

TOLERANCE = 1e-4
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def artifact(kind, root: Path, name: str):
    return kind(name=name, uri=str(root / name), metadata={})


@pytest.fixture(scope="module")
def bucket(s3_server):
    import uuid

    name = f"kubetune-nodes-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, quotes_file, tmp_path_factory, s3_server, bucket):
    import os

    root = tmp_path_factory.mktemp("nodes")
    config = tiny_run_config(tiny_model_dir, quotes_file, model={"quantization": "none"},
                             tracking={"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "nodes"},
                             storage={"uri": f"s3://{bucket}/base"},
                             train={"max_steps": 6, "save_steps": 3, "eval_steps": 0, "group_by_length": False,
                                    "warmup_steps": 0})
    os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint_url  # the task's endpoint, as the ConfigMap gives it
    try:
        yield {"root": root, "config": config, **run_stages(config, root, through="prepare_model")}
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def trainer(tmp_path, monkeypatch, s3_server, prepared):
    """The stand-in, with the cluster's ConfigMap and Secret as pipelines/ names them, and a kubeconfig."""
    import os

    with TrainerStandIn(tmp_path / "nodes").serving() as stand_in:
        stand_in.config_maps["kubetune-endpoints"] = {"AWS_ENDPOINT_URL": s3_server.endpoint_url,
                                                      "MLFLOW_TRACKING_URI": prepared["config"]["tracking"]["mlflow_uri"]}
        stand_in.secrets["kubetune-s3"] = {key: os.environ[key] for key in SECRETS}
        # The node's own environment: this machine's, less what the TrainJob must bring itself.
        stand_in.base_env = {k: v for k, v in os.environ.items()
                             if k not in {*SECRETS, "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"} and not k.startswith("PET_")}
        monkeypatch.setenv("KUBECONFIG", str(stand_in.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield stand_in


def train(prepared, name: str, **train_settings) -> dict:
    storage = f"{prepared['config']['storage']['uri'].rsplit('/', 1)[0]}/{name}"
    return train_again(prepared, storage, TRAIN_NODES, **train_settings)


def test_two_nodes_train_like_one_node_of_two_processes_and_like_one_process(prepared, trainer):
    two_nodes = train(prepared, "two-nodes", nodes=2, processes=1, batch_size=4)
    one_node = train(prepared, "one-node", processes=2, batch_size=4)
    single = train(prepared, "single", batch_size=8)
    assert two_nodes["processes"] == 2 and two_nodes["steps"] == 6
    for step, (nodes, processes, one) in enumerate(zip(losses(two_nodes), losses(one_node), losses(single)), start=1):
        assert nodes == pytest.approx(processes, rel=TOLERANCE), f"step {step}: 2 nodes {nodes} vs 1 node {processes}"
        assert nodes == pytest.approx(one, rel=TOLERANCE), f"step {step}: 2 nodes {nodes} vs one process {one}"
    assert len(losses(two_nodes)) == 6
    # What was submitted: one TrainJob, valid against the CRD, both nodes started from its command.
    (_, _, body), = [r for r in trainer.requests if r[0] == "POST"]
    assert validate_trainjob(body) == []
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["spec"]["trainer"]["numProcPerNode"] == 1
    assert body["spec"]["runtimeRef"]["name"] == "torch-distributed"
    name = job_name(prepared["run_id"])
    assert [node.returncode for node in trainer.jobs[name].processes] == [0, 0], trainer.node_log(name, 1)[-2000:]
    # rank 0 logged each step once to the run, from its node
    logged = tracking.client(prepared["config"]["tracking"]["mlflow_uri"]).get_metric_history(prepared["run_id"],
                                                                                               "train/loss")
    assert {m.step for m in logged} >= set(range(1, 7))


def test_sharded_across_two_nodes(prepared, trainer):
    """FSDP over 2 nodes x 1 process: the weights split across machines, the loss as DDP's."""
    sharded = train(prepared, "fsdp-nodes", nodes=2, processes=1, batch_size=4, sharding="fsdp")
    ddp = train(prepared, "ddp-nodes-ref", processes=2, batch_size=4)
    assert losses(sharded) == pytest.approx(losses(ddp), rel=TOLERANCE)
    assert sharded["parameter_mb_per_process"] / ddp["parameter_mb_per_process"] == pytest.approx(0.5, abs=0.05)


def test_a_killed_node_fails_the_task_and_a_retry_resumes(prepared, trainer, s3_server):
    """One node's process is killed after the first checkpoint is stored: the job fails, the task
    fails with one line, and the retried task deletes the old job and resumes from that checkpoint."""
    settings = {"nodes": 2, "processes": 1, "batch_size": 4, "max_steps": 60, "save_steps": 5}
    name = job_name(prepared["run_id"])
    bucket, base = prepared["config"]["storage"]["uri"][5:].split("/", 1)
    marker = f"kill/runs/{prepared['run_id']}/checkpoints/checkpoint-5/trainer_state.json"
    killed = threading.Event()

    def kill_after_first_checkpoint():
        client = s3_server.client()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if client.list_objects_v2(Bucket=bucket, Prefix=marker).get("KeyCount"):
                trainer.kill_node(name, 1)
                killed.set()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(TrainJobFailed) as failure:
        train(prepared, "kill", **settings)
    watcher.join()
    assert killed.is_set()
    message = str(failure.value)
    assert message.startswith(f"TrainJob {name} failed: ") and "node" in message and "\n" not in message
    retried = train(prepared, "kill", **settings)
    assert ("DELETE", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubetune/trainjobs/{name}") in \
        [(method, path.split("?")[0]) for method, path, _ in trainer.requests]
    assert retried["resumed_from"] and retried["steps"] == 60
    assert int(retried["resumed_from"].rsplit("-", 1)[1]) >= 5


def test_a_job_past_its_deadline_is_stopped_and_fails_the_task_with_one_line(prepared, trainer):
    """A train task that dies without a word (a lost node, an OOM kill) cannot delete its job; the
    job's activeDeadlineSeconds (pipelines/ sets the train task's timeout) then stops the nodes. Here
    2 s, long before 200 steps are done."""
    storage = f"{prepared['config']['storage']['uri'].rsplit('/', 1)[0]}/deadline"
    with pytest.raises(TrainJobFailed) as failure:
        train_again(prepared, storage, {**TRAIN_NODES, "deadline_seconds": 2}, nodes=2, processes=1, batch_size=4,
                    max_steps=200)
    name = job_name(prepared["run_id"])
    assert str(failure.value).startswith(f"TrainJob {name} failed: ")
    assert "stopped at its activeDeadlineSeconds (2 s)" in str(failure.value) and "\n" not in str(failure.value)
    body = [body for method, _, body in trainer.requests if method == "POST"][-1]
    assert body["spec"]["activeDeadlineSeconds"] == 2
    assert all(node.poll() is not None for node in trainer.jobs[name].processes), "a node outlived its deadline"


def test_a_node_that_fails_names_its_error_line(prepared, trainer):
    """A node whose training raises leaves its error line for the task (the Trainer's condition names
    only the pod); bf16 on CPU nodes is refused by the workers themselves."""
    with pytest.raises(TrainJobFailed) as failure:
        train(prepared, "bf16", nodes=2, processes=1, batch_size=4, precision="bf16")
    assert "node 0: kubetune.errors.ConfigError: train.precision = 'bf16'" in str(failure.value) or \
        "node 1: kubetune.errors.ConfigError: train.precision = 'bf16'" in str(failure.value)


def test_a_cancelled_task_deletes_its_trainjob(prepared, trainer, tmp_path):
    """KFP cancelling the run sends the train task's pod SIGTERM: the task deletes its job (and the
    stand-in its node processes) before it exits."""
    import os
    import signal
    import subprocess
    import sys

    config = json.loads(json.dumps(prepared["config"]))
    config["train"].update(nodes=2, processes=1, batch_size=4, max_steps=100000, save_steps=0)
    config["storage"]["uri"] = config["storage"]["uri"].rsplit("/", 1)[0] + "/cancel"
    script = tmp_path / "task.py"
    script.write_text(f"""
import json, sys
from kfp import dsl
from kubetune import components
model = lambda name: dsl.Model(name=name, uri=name, metadata={{}})
dataset = lambda path: dsl.Dataset(name="tokenized", uri=path, metadata={{}})
components.train.python_func(config_json={json.dumps(json.dumps(config))}, run_id={prepared['run_id']!r},
    tokenized=dataset({prepared['tokenized'].path!r}), prepared_model=model({prepared['prepared'].path!r}),
    tuned_model=model({str(tmp_path / 'tuned')!r}), accelerator_type="", node_settings={TRAIN_NODES!r})
""")
    task = subprocess.Popen([sys.executable, str(script)], env=os.environ.copy(), cwd=tmp_path)
    name = job_name(prepared["run_id"])
    deadline = time.monotonic() + 120
    while name not in trainer.jobs and time.monotonic() < deadline and task.poll() is None:
        time.sleep(0.2)
    assert name in trainer.jobs, "the task never submitted its TrainJob"
    nodes = trainer.jobs[name].processes
    task.send_signal(signal.SIGTERM)
    assert task.wait(timeout=60) != 0
    assert name not in trainer.jobs and all(node.poll() is not None for node in nodes)
    assert ("DELETE", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubetune/trainjobs/{name}") in \
        [(method, path.split("?")[0]) for method, path, _ in trainer.requests]


def test_a_cluster_without_trainer_stops_the_task_with_one_line(prepared, trainer):
    """Bad input is not retried: the refusal is recorded on the run, so this test opens its own."""
    from tiny import preflight

    trainer.mode = "absent"
    own_run = preflight(json.dumps(prepared["config"]), artifact(dsl.Artifact, prepared["root"], "lineage-refused"))
    with pytest.raises(ConfigError) as refused:
        train({**prepared, "run_id": own_run}, "refused", nodes=2, processes=1, batch_size=4)
    assert str(refused.value).startswith("train.nodes = 2: this cluster has no TrainJob API")


@pytest.mark.parametrize("mode, says", [
    ("installed", None),
    ("absent", "this cluster has no TrainJob API (trainer.kubeflow.org/v1alpha1): install Kubeflow Trainer"),
    ("forbidden", "check TrainJob kubetune-train-preflightcheck was refused (trainjobs.trainer.kubeflow.org is "
                  "forbidden")])
def test_preflight_asks_the_cluster_with_a_dry_run(prepared, trainer, mode, says):
    """Preflight creates nothing: a server-side dry run proves the API, the CRD, the RBAC and the runtime."""
    from kubetune import preflight
    from kubetune.config import RunConfig

    trainer.mode = mode
    cfg = RunConfig.from_dict({**prepared["config"], "train": {**prepared["config"]["train"], "nodes": 2}})
    if says is None:
        preflight.check_nodes(cfg, train_gpus=True)
        (_, path, body), = [r for r in trainer.requests if r[0] == "POST"]
        assert "dryRun=All" in path and validate_trainjob(body) == [] and not trainer.jobs
        return
    with pytest.raises(ConfigError) as refused:
        preflight.check_nodes(cfg, train_gpus=True)
    assert str(refused.value).startswith("train.nodes = 2: ") and says in str(refused.value)


def test_preflight_refuses_nodes_when_the_pipeline_grants_no_gpus(prepared):
    """accelerator_count 0 on a cluster: the nodes would train on CPUs; refused before asking the cluster."""
    from kubetune import preflight
    from kubetune.config import RunConfig

    cfg = RunConfig.from_dict({**prepared["config"], "train": {**prepared["config"]["train"], "nodes": 3}})
    with pytest.raises(ConfigError) as refused:
        preflight.check_nodes(cfg, train_gpus=False)
    assert str(refused.value).startswith("train.nodes = 3: the pipeline grants no GPUs (accelerator_count 0)")
