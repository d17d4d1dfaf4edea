"""The MLflow UI as a platform engineer sees a kubetune run, in a real browser: Debian's headless
Chromium renders the pages of a real MLflow server after the real stages logged tiny runs. The run
page must show the metric sections (names grouped by `/`), the dataset inputs, the run-config params
and, in its description, the headline (base vs tuned, the champion decision); the compare view must
tell two runs apart by name; a registered version must say why it is or is not the champion; and
the link `kubetune run` prints, after `kubetune services up --store`, must open the run. Screenshots
are kept in the test's folder (or KUBETUNE_UI_SHOTS) for a person to look at.

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
    # the description: the headline table, rendered, and the champion decision
    assert re.search(r"<td[^>]*>perplexity \(held-out\)</td>", overview), "no headline table in the description"
    assert "ui-check/1 is the champion" in overview, "no champion decision in the description"
    assert f"Parameters ({len(run.data.params)})" in overview and ">model.lora.r<" in overview
    assert set(run.data.params) == set(tracking.flatten(RunConfig.from_dict(config).to_dict())), "params beside the config"
    # one section per name prefix, in name order: the tab opens on eval, the headline figures
    found = re.findall(r">(eval|inputs|model|timing|train)<", metrics)
    assert found == ["eval", "inputs", "model", "timing", "train"], found


def _tiny_run(config: dict, root: Path) -> str:
    return run_stages(config, root, through="register")["run_id"]


def test_two_runs_compare_by_name_and_the_registry_says_why(tiny_model_dir, quotes_file, mlflow_server, tmp_path):
    """Two runs that differ in learning rate, named for it as `kubetune run --set` names them."""
    from kubetune import tracking
    from kubetune.overrides import run_name

    runs = {}
    for rate in (1e-2, 3e-3):
        name = run_name("ui-compare", {"train.learning_rate": rate})
        config = tiny_run_config(tiny_model_dir, quotes_file, train={"learning_rate": rate},
                                 tracking={"mlflow_uri": mlflow_server, "experiment": None, "run_name": name},
                                 storage={"uri": str(tmp_path / "storage")}, register={"model_name": "ui-compare"})
        runs[name] = _tiny_run(config, tmp_path / f"artifacts-{rate}")
    client = tracking.client(mlflow_server)
    experiment = client.get_run(next(iter(runs.values()))).info.experiment_id
    ids = ",".join(f'"{run_id}"' for run_id in runs.values())
    shots = Path(os.environ.get("KUBETUNE_UI_SHOTS", tmp_path))
    compare = f'{mlflow_server}/#/compare-runs?runs=[{ids}]&experiments=["{experiment}"]'
    _browser(compare, tmp_path / "profile", f"--screenshot={shots / 'compare.png'}")
    page = _browser(compare, tmp_path / "profile", "--dump-dom")
    (shots / "compare.html").write_text(page)
    assert all(name in page for name in runs), f"the compare view does not name both runs: {list(runs)}"

    version = f"{mlflow_server}/#/models/ui-compare/versions/2"
    _browser(version, tmp_path / "profile", f"--screenshot={shots / 'version.png'}")
    page = _browser(version, tmp_path / "profile", "--dump-dom")
    (shots / "version.html").write_text(page)
    decision = client.get_model_version("ui-compare", "2").description.splitlines()[0]
    assert "ui-compare/2 is" in decision and "champion" in decision
    assert decision.split(":")[0] in page, "the version page does not show why it is or is not the champion"


def test_the_printed_link_opens_the_run_on_the_store_it_used(tiny_model_dir, quotes_file, tmp_path, free_port,
                                                             monkeypatch):
    """A run on a sqlite store of its own, run from another directory; `kubetune services up --store`
    serves it (artifacts beside it), and the link kubetune prints opens the run."""
    from kubetune import services
    from kubetune.launch.local import browse_hint

    store = f"sqlite:///{tmp_path / 'team' / 'runs.db'}"
    (tmp_path / "team").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": store, "experiment": None,
                                                                     "run_name": "ui-link run"},
                             evaluate={"retention_path": None},  # the repository's default is relative to it
                             storage={"uri": str(tmp_path / "storage")}, register={"model_name": "ui-link"})
    run_id = _tiny_run(config, tmp_path / "artifacts")
    from kubetune import tracking

    experiment = tracking.client(store).get_run(run_id).info.experiment_id
    hint = browse_hint(store, experiment, run_id, port=free_port)
    assert f"--store {store}" in hint
    try:
        url = services.services_up(port=free_port, store=store)
        link = hint.split("then open ", 1)[1]
        assert link.startswith(url)
        page = _browser(link, tmp_path / "profile", "--dump-dom")
    finally:
        services.services_down()
    assert "ui-link run" in page and "ui-link/1 is the champion" in page, "the printed link does not open the run"
