"""train.nodes in the image: each node of the TrainJob a container of kubetune's CPU image (podman,
host network), started from the TrainJob's own image, command, args and env, rendezvousing on
loopback through the PET_* variables alone; the train task in this process follows the job through
the Kubernetes API stand-in (tests/trainer_stand_in.py: no cluster here).

Nothing is mounted: as on a cluster, the nodes reach the base model (an s3:// snapshot), the inputs,
checkpoints and adapter (S3, moto) and the MLflow server over the network, with the endpoints and
credentials the TrainJob's env names. Marked `containers` (`make test-containers`).
"""

import os
from pathlib import Path

import pytest

from kubetune import containers
from kubetune.images import CPU_IMAGE
from kubetune.pipelines.pipeline import TRAIN_NODES
from tiny import losses, run_stages, tiny_run_config, train_again
from trainer_stand_in import TrainerStandIn, validate_trainjob

pytestmark = pytest.mark.containers

TOLERANCE = 1e-4
BUCKET = "kubetune-nodes-containers"


@pytest.fixture(scope="module")
def prepared(cpu_image, tiny_model_dir, quotes_file, tmp_path_factory, s3_server, mlflow_server):
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    for file in sorted(tiny_model_dir.rglob("*")):
        if file.is_file():
            client.upload_file(str(file), BUCKET, f"models/tiny/{file.relative_to(tiny_model_dir).as_posix()}")
    root = tmp_path_factory.mktemp("nodes_in_containers")
    config = tiny_run_config(Path("unused"), quotes_file, model={"name_or_path": f"s3://{BUCKET}/models/tiny",
                                                                 "quantization": "none"},
                             tracking={"mlflow_uri": mlflow_server, "experiment": "nodes-in-containers"},
                             storage={"uri": f"s3://{BUCKET}/base"},
                             train={"max_steps": 4, "save_steps": 2, "eval_steps": 0, "group_by_length": False,
                                    "warmup_steps": 0, "batch_size": 4})
    os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint_url
    try:
        yield {"root": root, "config": config, **run_stages(config, root, through="prepare_model")}
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)


def test_two_nodes_as_two_containers_train_like_two_processes(prepared, tmp_path, monkeypatch, s3_server,
                                                              mlflow_server):
    with TrainerStandIn(tmp_path / "nodes").serving() as stand_in:
        stand_in.podman = containers.find_podman("the TrainJob's nodes as containers")
        stand_in.config_maps["kubetune-endpoints"] = {"AWS_ENDPOINT_URL": s3_server.endpoint_url,
                                                      "MLFLOW_TRACKING_URI": mlflow_server}
        stand_in.secrets["kubetune-s3"] = {key: os.environ[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        stand_in.base_env = {"MLFLOW_DISABLE_TELEMETRY": "true"}  # no outside network from here
        monkeypatch.setenv("KUBECONFIG", str(stand_in.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        in_containers = train_again(prepared, f"s3://{BUCKET}/containers", {**TRAIN_NODES, "image": CPU_IMAGE}, nodes=2,
                                    processes=1)
        (_, _, body), = [r for r in stand_in.requests if r[0] == "POST"]
        node_log = "\n".join(stand_in.node_log(body["metadata"]["name"], rank) for rank in (0, 1))
    assert validate_trainjob(body) == [] and body["spec"]["trainer"]["image"] == CPU_IMAGE
    in_process = train_again(prepared, f"s3://{BUCKET}/processes", processes=2)
    assert in_containers["steps"] == 4 and len(losses(in_containers)) == 4, node_log[-3000:]
    assert losses(in_containers) == pytest.approx(losses(in_process), rel=TOLERANCE)
