"""`kubetune services`: a real local `mlflow server`, started, used over HTTP and stopped.

Also checks the suite's `mlflow_server` fixture does what other tests rely on.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from kubetune import paths
from kubetune.errors import ServiceError
from kubetune.services import services_down, services_status, services_up
from kubetune.tracking import embedded_artifact_root as artifact_root
from kubetune.tracking import embedded_uri as backend_store_uri


@pytest.fixture
def no_server_left():
    """Stop a server a failing test may have left running."""
    yield
    services_down()


def test_up_status_down(free_port, tmp_path, no_server_left):
    start = time.monotonic()
    url = services_up(port=free_port)
    started_in = time.monotonic() - start
    assert url == f"http://127.0.0.1:{free_port}"

    status = services_status()
    assert status["alive"] and status["healthy"] and status["url"] == url
    assert Path(status["log"]).is_file() and Path(status["log"]).parent == paths.state_dir() / "services"
    assert (paths.state_dir() / "services" / "mlflow.pid").read_text().strip() == str(status["pid"])

    # A client over HTTP writes the store and artifact folder that embedded tracking uses ...
    client = MlflowClient(tracking_uri=url)
    experiment_id = client.create_experiment("over-http")
    assert client.get_experiment(experiment_id).artifact_location == f"{artifact_root().as_uri()}/{experiment_id}"
    run_id = client.create_run(experiment_id).info.run_id
    (tmp_path / "note.txt").write_text("hi")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    assert (artifact_root() / experiment_id / run_id / "artifacts" / "note.txt").read_text() == "hi"
    embedded = MlflowClient(tracking_uri=backend_store_uri())
    assert embedded.get_run(run_id).info.experiment_id == experiment_id
    # ... and a run logged with no server at all shows up in the server (and its UI).
    embedded_run = embedded.create_run(experiment_id).info.run_id
    assert {r.info.run_id for r in client.search_runs([experiment_id])} == {run_id, embedded_run}

    start = time.monotonic()
    assert services_up(port=free_port) == url  # already running: no second server
    assert time.monotonic() - start < 3

    pid = status["pid"]
    assert services_down() is True
    status = services_status()
    assert not status["alive"] and not status["healthy"] and status["pid"] is None
    assert not (paths.state_dir() / "services" / "mlflow.pid").exists()
    assert not Path(f"/proc/{pid}").exists() or b"mlflow" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert services_down() is False
    print(f"mlflow server answered /health after {started_in:.1f} s")


def test_up_refuses_a_port_in_use(free_port, no_server_left):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port))
        sock.listen()
        start = time.monotonic()
        with pytest.raises(ServiceError, match="already in use") as info:
            services_up(port=free_port)
        assert time.monotonic() - start < 3
    assert str(info.value).startswith(f"--port = {free_port}")
    assert not services_status()["alive"]


def test_up_reports_a_server_that_dies(free_port, monkeypatch, no_server_left):
    monkeypatch.setattr("kubetune.services.embedded_uri", lambda: "nosuchdb://x")
    # As on a loaded machine, where the child's /proc command line does not yet say "mlflow" (its
    # exec is not done) when it is first checked: the server it started must not be taken for dead.
    monkeypatch.setattr("kubetune.services._alive", lambda pid: False)
    with pytest.raises(ServiceError, match="exited while starting") as info:
        services_up(port=free_port)
    assert "nosuchdb" in str(info.value)  # the log tail says why
    assert services_status()["pid"] is None


def test_mlflow_server_fixture_logs_artifacts_and_registers_models(mlflow_server, tmp_path):
    """The fixture's server proxies artifacts, so any process can log and register with just the URI."""

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[int], params=None) -> list[int]:
            return model_input

    mlflow.set_tracking_uri(mlflow_server)
    try:
        mlflow.set_experiment("fixture-check")
        with mlflow.start_run() as run:
            (tmp_path / "metrics.json").write_text("{}")
            mlflow.log_artifact(str(tmp_path / "metrics.json"))
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        version = mlflow.register_model(info.model_uri, "fixture-check-model")
        client = MlflowClient(tracking_uri=mlflow_server)
        client.set_registered_model_alias("fixture-check-model", "champion", version.version)
        assert client.get_model_version_by_alias("fixture-check-model", "champion").version == version.version
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "back"))
        assert Path(local).read_text() == "{}"
        model = mlflow.pyfunc.load_model("models:/fixture-check-model@champion")
        assert model.predict([1, 2]) == [1, 2]
    finally:
        mlflow.set_tracking_uri(None)


def test_up_serves_the_store_a_run_used_with_its_artifacts_beside_it(free_port, tmp_path, monkeypatch, no_server_left):
    """A run on a sqlite store of its own (any current directory) keeps its artifacts beside the store,
    and `services up --store` serves that store: the run and its artifacts are there over HTTP."""
    from kubetune import tracking

    store = f"sqlite:///{tmp_path / 'team' / 'runs.db'}"
    (tmp_path / "team").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    tracking.initialise_sqlite(store, tmp_path / "team" / "runs.db")
    run_id = tracking.start_run(store, "team-exp", "team-exp lr=0.003", {"train": {"learning_rate": 0.003}}, {})
    tracking.RunLogger(store, run_id).text("hello", "notes/hello.txt")
    assert (tmp_path / "team" / "mlartifacts" / "team-exp").is_dir() and not (tmp_path / "elsewhere" / "mlruns").exists()

    with pytest.raises(ServiceError, match=r"^--store = 'sqlite:///.*nope.db': no such database"):
        services_up(port=free_port, store=f"sqlite:///{tmp_path / 'nope.db'}")
    with pytest.raises(ServiceError, match=r"^--store = 'http://mlflow:5000': it is a server already"):
        services_up(port=free_port, store="http://mlflow:5000")
    url = services_up(port=free_port, store=store)
    assert services_status()["backend_store_uri"] == store
    client = MlflowClient(tracking_uri=url)
    served = client.get_run(run_id)
    assert served.info.run_name == "team-exp lr=0.003"
    assert [item.path for item in client.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]
    with pytest.raises(ServiceError, match=r"serves sqlite:///.*runs.db; stop it with kubetune services down"):
        services_up(port=free_port)  # the state folder's store, while another one is served
