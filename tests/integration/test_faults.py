"""Faults an operator meets, on real processes: two first runs on one fresh MLflow store, and a
`kubetune run` killed mid-training and continued with --resume. (A stage's own retry after a kill
is tests/integration/test_components.py; an S3 outage during an upload, test_storage.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from kubetune import tracking
from tiny import tiny_run_config


def test_two_first_runs_on_a_fresh_store_do_not_race(tmp_path):
    """MLflow's schema migration failed in one of two runs that opened a new sqlite store at once
    (`table _alembic_tmp_experiments already exists`); preflight now creates it under a file lock."""
    check = "import sys; from kubetune import tracking; tracking.check_reachable(sys.argv[1])"
    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / f'store{attempt}' / 'mlflow.db'}"
        processes = [subprocess.Popen([sys.executable, "-c", check, uri], stderr=subprocess.PIPE, text=True)
                     for _ in range(2)]
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err[-2000:]
        assert tracking.client(uri).search_experiments()  # the store works


def kubetune(*args: str, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kubetune.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_a_killed_run_continues_with_resume(tiny_model_dir, quotes_file, tmp_path):
    storage, uri = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri},
                             storage={"uri": str(storage)}, evaluate={"retention_path": None},
                             train={"max_steps": 120, "save_steps": 10, "batch_size": 8, "warmup_steps": 2,
                                    "learning_rate": 1.0e-3, "seed": 0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}

    first = kubetune("run", "--no-progress", "--config", str(tmp_path / "run.yaml"), env=env)
    deadline = time.monotonic() + 600
    while not list(storage.glob("runs/*/checkpoints/checkpoint-20/trainer_state.json")):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run_dir = next(storage.glob("runs/*"))
    run_id = run_dir.name
    time.sleep(5)
    stored = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    time.sleep(5)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == stored, "a stage trained on after its parent died"
    assert max(int(name.split("-")[1]) for name in stored) < 120
    client = tracking.client(uri)
    assert client.get_run(run_id).info.status == "RUNNING"

    resumed = kubetune("run", "--no-progress", "--config", str(tmp_path / "run.yaml"), "--resume", run_id, env=env)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kubetune.resumed"] == "1"
    assert "kubetune.failed_stage" not in run.data.tags
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 121)), "a step was lost or logged twice"
    assert client.get_model_version("tiny-lora", "1").run_id == run_id
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-110", "checkpoint-120"]
    assert "resumed from checkpoint-" in output  # the train stage's line on the quiet console
    assert not list((tmp_path / "home").glob("run-*")), "temporary folders left behind"
    print(f"killed after {stored}; resumed and finished")


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(start time in clock ticks, pid) of every living process below pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                started = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[19])
            except OSError:
                continue
            found.append((started, child))
            todo.append(child)
    return found


@pytest.mark.slow
def test_a_stage_killed_from_outside_leaves_the_run_failed_by_the_exit_handler(tiny_model_dir, quotes_file, tmp_path):
    """A task SIGKILLed (an OOM kill, an eviction) cannot record its own failure; the pipeline's exit
    handler (finish_run) marks the MLflow run FAILED with the stage it was in. Kills evaluate: train
    would be retried (set_retry, honoured by kfp.local) and resume."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri},
                             storage={"uri": str(tmp_path / "storage")}, evaluate={"retention_path": None,
                                                                                   "max_samples": 4000,
                                                                                   # generations long enough
                                                                                   # to kill it in
                                                                                   "num_generations": 16,
                                                                                   "max_new_tokens": 240})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    run = kubetune("run", "--no-progress", "--config", str(tmp_path / "run.yaml"),
                   env={**os.environ, "KUBETUNE_HOME": str(home)})
    deadline = time.monotonic() + 600
    while not list((home / "logs").glob("*-evaluate.log")):
        assert run.poll() is None, run.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "evaluate did not start within 10 minutes"
        time.sleep(0.2)
    time.sleep(1)
    _, task = max(_descendants(run.pid))  # the youngest process below `kubetune run`: the evaluate task
    os.kill(task, signal.SIGKILL)
    output, _ = run.communicate(timeout=300)
    assert run.returncode != 0
    client = tracking.client(uri)
    [mlflow_run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert mlflow_run.info.status == "FAILED", output[-3000:]
    assert mlflow_run.data.tags["kubetune.failed_stage"] == "evaluate"
    assert "the evaluate task ended without reporting an error" in mlflow_run.data.tags["kubetune.error"]
    exit_log = next((home / "logs").glob("*-finish_run.log")).read_text()
    assert f"marked MLflow run {mlflow_run.info.run_id} FAILED" in exit_log


@pytest.mark.slow
def test_metrics_logged_while_mlflow_is_down_for_20_s_arrive(mlflow_server):
    """The MLflow client retries with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default), so a
    stage that logs during a short outage waits rather than fails or loses the value."""
    from tiny import SwitchableProxy

    proxy = SwitchableProxy(mlflow_server)
    try:
        run_id = tracking.start_run(proxy.url, "outage", "outage", {"train": {"max_steps": 1}}, {})
        logger = tracking.RunLogger(proxy.url, run_id)
        proxy.down_for(20)
        started = time.monotonic()
        for step in (1, 2, 3):
            logger.metrics({"train/loss": 1.0 / step}, step=step)
        waited = time.monotonic() - started
    finally:
        proxy.down()
    history = tracking.client(mlflow_server).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert waited >= 15


# ---- issue 23: lineage that cannot lie, interrupts, a full disk, a read-only store -----------------------

def _artifact(kind, root: Path, name: str):
    return kind(name=name, uri=str(root / name), metadata={})


def test_data_changed_after_preflight_stops_the_run_before_training(tiny_model_dir, quotes_file, tmp_path):
    """The run and its model version carry the hash preflight computed; if the rows changed before
    prepare_data read them, training on them would make that record false: the run stops instead."""
    from kfp import dsl

    from kubetune import components
    from kubetune.errors import DataError
    from tiny import preflight

    data = tmp_path / "quotes.json"
    shutil.copyfile(quotes_file, data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = json.dumps(tiny_run_config(tiny_model_dir, data, tracking={"mlflow_uri": uri},
                                        storage={"uri": str(tmp_path / "storage")}, evaluate={"retention_path": None}))
    run_id = preflight(config, _artifact(dsl.Artifact, tmp_path, "lineage"))
    data.write_text(json.dumps(json.loads(data.read_text())[:40]))  # someone rewrites the file meanwhile
    with pytest.raises(DataError, match="the data changed since preflight checked it"):
        components.prepare_data.python_func(config_json=config, run_id=run_id,
                                            dataset=_artifact(dsl.Dataset, tmp_path, "dataset"))
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["kubetune.failed_stage"] == "prepare_data"
    assert "kubetune.user_error" in run.data.tags  # a retry would stop at once


def test_data_changed_after_prepare_data_is_not_what_was_trained_or_recorded(tiny_model_dir, quotes_file, tmp_path):
    """The other order: once prepare_data has written the rows, later stages read only them; the hash
    on the run (what register puts on the version) is the hash of those rows."""
    from kubetune import artifacts
    from tiny import run_stages

    data = tmp_path / "quotes.json"
    shutil.copyfile(quotes_file, data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tiny_model_dir, data, tracking={"mlflow_uri": uri},
                             storage={"uri": str(tmp_path / "storage")}, evaluate={"retention_path": None})
    out = run_stages(config, tmp_path / "artifacts", through="prepare_data")
    data.write_text(json.dumps(json.loads(data.read_text())[:40]))
    stats = json.loads((Path(out["dataset"].path) / artifacts.DATA_STATS).read_text())
    recorded = tracking.client(uri).get_run(out["run_id"]).data.tags["kubetune.data_sha256"]
    assert recorded == stats["content_sha256"] == artifacts.read_lineage(Path(out["lineage"].path))["kubetune.data_sha256"]
    assert stats["rows_source"] == len(json.loads(quotes_file.read_text()))


def _wait_for(path_glob: Callable[[], list], process: subprocess.Popen, what: str, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path_glob():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.2)


def test_an_interrupted_run_is_marked_killed_and_continues_with_resume(tiny_model_dir, quotes_file, tmp_path):
    """SIGINT to `kubetune run` alone (as `kill -INT` sends it; Ctrl-C reaches the stages too): the
    stage is stopped, the MLflow run marked KILLED naming the stage, one line says how to go on."""
    storage, uri = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri}, storage={"uri": str(storage)},
                             evaluate={"retention_path": None},
                             train={"max_steps": 400, "save_steps": 10, "eval_steps": 0, "batch_size": 8})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}
    # A process started in the background by a shell without job control (`make test &`) inherits
    # SIGINT ignored, and Python keeps it ignored: `kubetune run` then rightly goes on, as any
    # background job does. What is tested is a run that Ctrl-C can reach.
    run = kubetune("run", "--no-progress", "--config", str(tmp_path / "run.yaml"), env=env,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(lambda: list(storage.glob("runs/*/checkpoints/checkpoint-10/trainer_state.json")), run, "a checkpoint")
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 130, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("kubetune: interrupted")]
    run_id = next(storage.glob("runs/*")).name
    assert line == (f"kubetune: interrupted in stage train; MLflow run {run_id} marked KILLED; continue it with "
                    f"`kubetune run --resume {run_id}` and the same --config/--set")
    assert "Traceback" not in output
    mlflow_run = tracking.client(uri).get_run(run_id)
    assert mlflow_run.info.status == "KILLED" and mlflow_run.data.tags["kubetune.failed_stage"] == "train"
    assert not _descendants(run.pid), "a stage outlived the run"
    assert not list((tmp_path / "home").glob("run-*")), "temporary folders left behind"


def _unshare_available() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "--user", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not _unshare_available(),
                    reason="needs unshare (util-linux) and user namespaces for a small tmpfs")
def test_a_full_disk_ends_train_with_one_line_and_resume_finishes_after_the_fix(tiny_model_dir, quotes_file,
                                                                                 tmp_path):
    """Storage on a real file system that is full (a 64 KB tmpfs in a mount namespace of its own):
    checkpoints cannot be stored (warnings), the adapter cannot either: train ends with one line that
    names the place and the fix, is not retried, leaves no half-written file; after the tmpfs is
    made larger, --resume finishes the run."""
    storage, uri = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage.mkdir()
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri}, storage={"uri": str(storage)},
                             evaluate={"retention_path": None}, train={"max_steps": 6, "save_steps": 3, "eval_steps": 0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    script = f"""
mount -t tmpfs -o size=64k tmpfs {storage}
{sys.executable} -m kubetune.cli run --no-progress --config {tmp_path / 'run.yaml'} > {tmp_path / 'first.out'} 2>&1
echo "exit $?" >> {tmp_path / 'first.out'}
find {storage} -name '*.partial' > {tmp_path / 'partial.txt'}
mount -o remount,size=200m {storage}
RUN=$(ls {storage}/runs)
{sys.executable} -m kubetune.cli run --no-progress --config {tmp_path / 'run.yaml'} --resume $RUN > {tmp_path / 'second.out'} 2>&1
echo "exit $?" >> {tmp_path / 'second.out'}
"""
    subprocess.run(["unshare", "--mount", "--map-root-user", "--user", "sh", "-c", script], check=True, timeout=900,
                   env={**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")})
    first = (tmp_path / "first.out").read_text()
    assert first.rstrip().endswith("exit 2"), first[-3000:]
    errors = [line for line in first.splitlines() if line.startswith("kubetune: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"kubetune: error: disk space = '{storage}"), first[-3000:]
    assert "no space left on the device that holds it" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in first and "Retrying" not in first
    assert (tmp_path / "partial.txt").read_text() == "", "a half-written file was left"
    client = tracking.client(uri)
    [mlflow_run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    second = (tmp_path / "second.out").read_text()
    assert second.rstrip().endswith("exit 0"), second[-3000:]
    resumed = client.get_run(mlflow_run.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["kubetune.resumed"] == "1"
    attempts = client.get_metric_history(mlflow_run.info.run_id, "timing/train_attempt_seconds")
    assert len(attempts) == 1, "the full disk was retried"


def test_a_tracking_store_made_read_only_mid_run_ends_with_one_line_and_resumes(tiny_model_dir, quotes_file, tmp_path):
    """The sqlite store (file and folder) made read-only while train runs: the stage ends with one line
    naming tracking.mlflow_uri, not retried, not a traceback blaming the exit handler; once it is
    writable again, --resume finishes the run. As root, the run gets no DAC override capability
    (setpriv), so file modes bind it as they bind a user."""
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    storage = tmp_path / "storage"
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri}, storage={"uri": str(storage)},
                             evaluate={"retention_path": None},
                             train={"max_steps": 200, "save_steps": 10, "eval_steps": 0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] \
        if os.geteuid() == 0 and shutil.which("setpriv") else []
    run = subprocess.Popen([*as_user, sys.executable, "-m", "kubetune.cli", "run", "--no-progress", "--config",
                            str(tmp_path / "run.yaml")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    _wait_for(lambda: list(storage.glob("runs/*/checkpoints/checkpoint-10/trainer_state.json")), run, "a checkpoint")
    _make_read_only(store)
    try:
        output, _ = run.communicate(timeout=300)
    finally:
        _make_writable(store)
    assert run.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("kubetune: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"kubetune: error: tracking.mlflow_uri = '{uri}': the tracking "
                                                     "store refused a write"), output[-3000:]
    assert "(in stage train)" in errors[0] and "Traceback" not in output and "Retrying" not in output
    run_id = next(storage.glob("runs/*")).name
    resumed = kubetune("run", "--no-progress", "--config", str(tmp_path / "run.yaml"), "--resume", run_id, env=env)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"


def _make_read_only(store: Path) -> None:
    """The store frozen in the middle of a write where it can be: once sqlite's rollback journal
    (mlflow.db-journal, there while a write is under way) exists, the folder first, so the journal
    stays behind as a hot journal that every reader must roll back and cannot. That is the harder
    case: the run's own process then cannot even read the store. If no write comes within 30 s, the
    store is frozen between writes."""
    deadline = time.monotonic() + 30
    while not (store / "mlflow.db-journal").exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    store.chmod(0o555)  # from here no file comes or goes
    for path in store.iterdir():
        path.chmod(0o444)


def _make_writable(store: Path) -> None:
    store.chmod(0o755)
    for path in store.iterdir():
        # the run may still be writing (after a timeout): the journal comes and goes
        with contextlib.suppress(FileNotFoundError):
            path.chmod(0o644)
