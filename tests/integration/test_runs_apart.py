"""Any number of `kubetune run` at once in one folder, on one MLflow store and one storage: each
run's summary, log files, stage logs and MLflow log artifact are its own. (Before: the second of two
runs started together printed the first run's id, version and adapter; both wrote one run log; stage
logs of the same second overwrote each other; one MLflow run had no log.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from kubetune import tracking
from tiny import tiny_run_config

RUNS = 3


def test_three_runs_started_together_in_one_folder_keep_apart(tiny_model_dir, quotes_file, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)  # the store exists before they race to use it
    home = tmp_path / "home"
    processes = []
    for index in range(RUNS):  # seeds tell them apart: each trains a different model
        config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri},
                                 storage={"uri": str(tmp_path / "storage")}, evaluate={"retention_path": None},
                                 train={"max_steps": 4, "save_steps": 2, "eval_steps": 0, "seed": index})
        (tmp_path / f"run{index}.yaml").write_text(yaml.safe_dump(config))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "run", "--no-progress", "--config", f"run{index}.yaml"],
            cwd=tmp_path, env={**os.environ, "KUBETUNE_HOME": str(home)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-3000:]
        outputs.append(output)

    client = tracking.client(uri)
    seen_runs, seen_versions, seen_logs = set(), set(), set()
    for index, output in enumerate(outputs):
        run_id = re.search(r"^MLflow run (\w+) in ", output, re.M).group(1)
        registered = re.search(r"^registered model version: (\S+)", output, re.M).group(1)
        storage = re.search(r"^adapter and checkpoints:\s+(\S+)", output, re.M).group(1)
        log_path = Path(re.search(r"the run's whole log: (\S+)", output).group(1))
        run = client.get_run(run_id)
        assert run.data.params["train.seed"] == str(index), "the summary names another run"
        assert f"{run.data.tags['kubetune.registered_model']}/{run.data.tags['kubetune.registered_version']}" \
            == registered
        assert storage.endswith(f"runs/{run_id}")
        own_log = log_path.read_text()
        assert f"MLflow run {run_id}" in own_log
        assert not any(f"MLflow run {other}" in own_log for other in seen_runs)
        [artifact] = [a.path for a in client.list_artifacts(run_id, "logs")]
        assert artifact == "logs/run.log"
        kept = Path(client.download_artifacts(run_id, artifact, str(tmp_path / f"kept{index}")))
        assert f"MLflow run {run_id}" in kept.read_text()
        seen_runs.add(run_id)
        seen_versions.add(registered)
        seen_logs.add(log_path)
    assert len(seen_runs) == len(seen_versions) == len(seen_logs) == RUNS
    stage_logs = list((home / "logs").glob("*-train.log"))
    assert len(stage_logs) == RUNS, "stage logs overwrote each other"
    for run_id in seen_runs:
        assert sum(f"MLflow run {run_id}" in path.read_text()
                   for path in (home / "logs").glob("*-preflight.log")) == 1
