"""The MLflow UI as a platform engineer sees a kubetune run, in a real browser: Debian's headless
Chromium renders the run's page from a real MLflow server after the real stages logged a tiny run.
The rendered page must show the metric sections (names grouped by `/`), the dataset inputs and the
run-config params; a screenshot is kept in the test's folder for a person to look at.

Slow (a server, a run and a browser) and skipped where /usr/bin/chromium is not installed
(`apt-get install chromium`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kubetune.config import RunConfig
from tiny import run_stages, tiny_run_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")]
# Flags that keep Chromium off the network it cannot reach here, and root-safe.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1500,1800", "--virtual-time-budget=20000"]


def _browser(url: str, profile: Path, *what: str) -> str:
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *what, url], capture_output=True,
                          text=True, timeout=180)
    return done.stdout


def test_run_page_shows_sections_datasets_and_params(tiny_model_dir, quotes_file, mlflow_server, tmp_path):
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": mlflow_server, "experiment": None},
                             storage={"uri": str(tmp_path / "storage")}, register={"model_name": "ui-check"})
    out = run_stages(config, tmp_path / "artifacts", through="register")
    run_id = out["run_id"]
    from kubetune import tracking

    run = tracking.client(mlflow_server).get_run(run_id)
    assert tracking.client(mlflow_server).get_experiment(run.info.experiment_id).name == "ui-check"
    page = f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

    shots = Path(os.environ.get("KUBETUNE_UI_SHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    _browser(page, tmp_path / "profile", f"--screenshot={shots / 'overview.png'}")
    _browser(page + "/model-metrics", tmp_path / "profile", f"--screenshot={shots / 'metrics.png'}")
    print(f"screenshots: {shots / 'overview.png'} {shots / 'metrics.png'}")
    overview = _browser(page, tmp_path / "profile", "--dump-dom")
    (shots / "overview.html").write_text(overview)
    metrics = _browser(page + "/model-metrics", tmp_path / "profile", "--dump-dom")
    (shots / "metrics.html").write_text(metrics)
    # the first dataset input by name with its digest; the others behind "+2" (validation, retention)
    assert re.search(r"quotes-train \([0-9a-f]{16}\)", overview) and ">+2<" in overview, "no dataset inputs"
    assert f"Parameters ({len(run.data.params)})" in overview and ">model.lora.r<" in overview
    assert set(run.data.params) == set(tracking.flatten(RunConfig.from_dict(config).to_dict())), "params beside the config"
    # one section per name prefix, in name order: the tab opens on eval, the headline figures
    found = re.findall(r">(eval|inputs|model|timing|train)<", metrics)
    assert found == ["eval", "inputs", "model", "timing", "train"], found
