"""`kubetune submit --wait | wait | runs | logs | cancel` against the KFP API stand-in.

The stand-in (tests/kfp_stand_in.py, NOT Kubeflow) plays a scripted run: each GET of it
moves to the next Snapshot, with task_details shaped as the real server converts an Argo workflow
(system nodes included). Outages are a SwitchableProxy (tests/tiny.py) between client and stand-in.
MLflow is a real sqlite store, its runs tagged as the pipeline's stages tag them.
"""

from __future__ import annotations

import datetime
import json
import socket
import threading
import urllib.request

import pytest
from kfp_stand_in import API, T0, Snapshot, Task
from tiny import SwitchableProxy

from kubetune.cli import main

#: The kubetune pipeline's stages and how long each takes in the scripted runs (seconds).
PLAN = [("preflight", 30), ("prepare-data", 20), ("tokenize", 20), ("prepare-model", 20), ("train", 252),
        ("evaluate", 60), ("register", 30), ("finish-run", 5)]
FAST = ["--poll-seconds", "0.02"]


def tasks(done: int, now: str = "RUNNING", error: str = None, then: list[str] = ()) -> list[Task]:
    """The first `done` stages SUCCEEDED, the next one `now` (ended unless RUNNING or PENDING), then
    the stages named in `then` SUCCEEDED after it (the exit handler, finish-run)."""
    out, clock = [], 0.0
    for index, (name, took) in enumerate(PLAN):
        if index < done or name in then:
            out.append(Task(name, "SUCCEEDED", clock, clock + took))
        elif index == done and now:
            live = now in ("RUNNING", "PENDING")
            out.append(Task(name, now, clock, None if live else clock + took, error))
        clock += took + 1
    return out


SUCCESS = [Snapshot("RUNNING", tasks(0)), Snapshot("RUNNING", tasks(1)), Snapshot("RUNNING", tasks(4, "PENDING")),
           Snapshot("RUNNING", tasks(4)), Snapshot("RUNNING", tasks(4)), Snapshot("RUNNING", tasks(5)),
           Snapshot("RUNNING", tasks(7)), Snapshot("SUCCEEDED", tasks(8, now=""))]
TRAIN_ERROR = "kubetune.errors.ResourceError: storage.uri = 's3://kubetune-artifacts/runs': the bucket is full"


def kubetune(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def run_of(kfp_api, timeline: list[Snapshot], pipeline: str = "kubetune", experiment: str = "") -> str:
    """A run of the named pipeline (created if missing) in the stand-in, as submit would make it."""
    pipeline_id = next((p for p, v in kfp_api.pipelines.items() if v["display_name"] == pipeline), None) \
        or kfp_api.add_pipeline(pipeline)
    return kfp_api.add_run({"display_name": f"{pipeline}-run-{len(kfp_api.runs) + 1}", "experiment_id": experiment,
                            "pipeline_version_reference": {"pipeline_id": pipeline_id, "pipeline_version_id": "v"}},
                           timeline)


def stage_lines(out: list[str]) -> list[tuple[str, str]]:
    """(stage, state) of each printed transition line: '  HH:MM:SS  stage  STATE ...'."""
    return [tuple(line.split()[1:3]) for line in out if line.startswith("  ") and line[2:3].isdigit()]


# ---------------------------------------------------------------------------------------------
# --wait and wait


def test_submit_wait_prints_each_stage_transition_and_exits_0(kfp_api, cluster_config, capsys):
    kfp_api.next_timeline = SUCCESS
    code, out, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config), "--wait", *FAST)
    assert code == 0, err
    (run_id,) = kfp_api.runs
    assert out[2] == f"{kfp_api.url}/#/runs/details/{run_id}" and out[3].startswith(f"kubetune: following run {run_id}")
    assert stage_lines(out) == [
        ("preflight", "RUNNING"), ("preflight", "SUCCEEDED"), ("prepare-data", "RUNNING"), ("prepare-data", "SUCCEEDED"),
        ("tokenize", "SUCCEEDED"), ("prepare-model", "SUCCEEDED"), ("train", "PENDING"), ("train", "RUNNING"),
        ("train", "SUCCEEDED"), ("evaluate", "RUNNING"), ("evaluate", "SUCCEEDED"), ("register", "SUCCEEDED"),
        ("finish-run", "RUNNING"), ("finish-run", "SUCCEEDED")]
    assert any(line.endswith("train          SUCCEEDED after 4m12s") for line in out), out
    assert out[-1].startswith(f"kubetune: run {kfp_api.runs[run_id]['display_name']} SUCCEEDED after ")
    assert len(kfp_api.sent("GET", f"/runs/{run_id}")) == len(SUCCESS)  # it stopped at the end, not before


def test_retrain_wait_on_a_failed_run_names_the_stage_and_its_error(kfp_api, cluster_config, capsys):
    kfp_api.next_timeline = [Snapshot("RUNNING", tasks(4)),
                             Snapshot("RUNNING", tasks(4, "FAILED", f"Traceback ...\n{TRAIN_ERROR}")),
                             Snapshot("FAILED", tasks(4, "FAILED", f"Traceback ...\n{TRAIN_ERROR}", then=["finish-run"]))]
    code, out, err = kubetune(capsys, "retrain", "--host", kfp_api.url, "--config", str(cluster_config), "--wait", *FAST)
    (run_id,) = kfp_api.runs
    assert code == 1, err
    assert ("train", "FAILED") in stage_lines(out) and ("finish-run", "SUCCEEDED") in stage_lines(out)
    assert err.count("\n") == 1 and " FAILED after " in err
    assert f"in stage train: {TRAIN_ERROR}; its log: `kubetune logs {run_id} --stage train`" in err


def test_wait_reads_the_error_line_from_mlflow_when_kfp_has_none(kfp_api, capsys, tmp_path):
    """Today's server fills no task error: the exit handler's MLflow tags say what failed."""
    from mlflow import MlflowClient

    run_id = run_of(kfp_api, [Snapshot("FAILED", tasks(4, "FAILED", then=["finish-run"]))])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = MlflowClient(uri)
    mlflow.create_run(mlflow.create_experiment("quotes"), tags={
        "kubetune.pipeline_run": run_id, "kubetune.failed_stage": "train", "kubetune.error": TRAIN_ERROR})
    code, out, err = kubetune(capsys, "wait", run_id, "--host", kfp_api.url, *FAST,
                              "--set", f"tracking.mlflow_uri={uri}")
    assert code == 1 and f"in stage train: {TRAIN_ERROR}" in err, err

    code, out, err = kubetune(capsys, "wait", run_id, "--host", kfp_api.url, *FAST)  # no MLflow named
    assert code == 1 and "in stage train: no error line recorded" in err, err


def test_wait_on_a_succeeded_run_says_what_it_registered_or_why_it_skipped(kfp_api, capsys, tmp_path):
    """A when_data_changes run that found the champion's data succeeds in KFP (its later stages did
    not run): the last line says it was skipped, from the MLflow run's kubetune.skipped tag."""
    from mlflow import MlflowClient

    skipped = run_of(kfp_api, [Snapshot("SUCCEEDED", tasks(1, then=["finish-run"]))])
    trained = run_of(kfp_api, [Snapshot("SUCCEEDED", tasks(7, then=["finish-run"]))])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("quotes")
    reason = "skipped: data unchanged since version 2 (quotes-lora/2, the champion, was trained on the same data"
    mlflow.create_run(experiment, tags={"kubetune.pipeline_run": skipped, "kubetune.skipped": reason})
    mlflow.create_run(experiment, tags={"kubetune.pipeline_run": trained, "kubetune.registered_model": "quotes-lora",
                                        "kubetune.registered_version": "3", "kubetune.champion": "yes"})
    code, out, err = kubetune(capsys, "wait", skipped, "--host", kfp_api.url, *FAST, "--set", f"tracking.mlflow_uri={uri}")
    assert code == 0 and out[-1].endswith(f": {reason}") and " SUCCEEDED " in out[-1], (out, err)
    code, out, err = kubetune(capsys, "wait", trained, "--host", kfp_api.url, *FAST, "--set", f"tracking.mlflow_uri={uri}")
    assert code == 0 and out[-1].endswith(": registered quotes-lora/3 (the new champion)"), (out, err)
    code, out, err = kubetune(capsys, "runs", "--host", kfp_api.url, "--set", f"tracking.mlflow_uri={uri}")
    assert code == 0, err
    (skipped_row,) = [line for line in out if line.startswith(skipped)]
    assert "skipped: same data" in skipped_row


@pytest.mark.parametrize("final", ["CANCELED", "CANCELING"])
def test_a_canceled_run_exits_3(kfp_api, capsys, final):
    run_id = run_of(kfp_api, [Snapshot("RUNNING", tasks(4)), Snapshot(final, tasks(4, "FAILED"))])
    code, out, err = kubetune(capsys, "wait", run_id, "--host", kfp_api.url, *FAST)
    assert code == 3 and f" {final}" in err and "SUCCEEDED" not in err, err


def test_cancel_terminates_and_a_waited_run_that_gets_canceled_exits_non_zero(kfp_api, capsys):
    run_id = run_of(kfp_api, [Snapshot("RUNNING", tasks(4))] * 1000)
    code, out, err = kubetune(capsys, "cancel", run_id, "--host", kfp_api.url)
    assert code == 0 and out == [f"kubetune: run {run_id} is being canceled (CANCELING); `kubetune wait {run_id}` "
                                 "follows it"], err
    assert len(kfp_api.sent("POST", f"/runs/{run_id}:terminate")) == 1
    code, out, err = kubetune(capsys, "wait", run_id, "--host", kfp_api.url, *FAST)
    assert code == 3 and "CANCELING (being stopped)" in err

    code, out, err = kubetune(capsys, "cancel", run_id, "--host", kfp_api.url)  # it has ended: nothing is sent
    assert code == 0 and "nothing to cancel" in out[0] and len(kfp_api.sent("POST", f"/runs/{run_id}:terminate")) == 1

    # Someone cancels it in the KFP UI while --wait follows it.
    other = run_of(kfp_api, [Snapshot("RUNNING", tasks(4))] * 1000)
    request = urllib.request.Request(f"{kfp_api.url}{API}/runs/{other}:terminate", data=b"{}", method="POST")
    threading.Timer(0.3, urllib.request.urlopen, [request]).start()
    code, out, err = kubetune(capsys, "wait", other, "--host", kfp_api.url, *FAST)
    assert code == 3 and ("train", "RUNNING") in stage_lines(out) and "CANCEL" in err


def test_wait_rides_out_an_outage_with_backoff(kfp_api, capsys):
    run_id = run_of(kfp_api, [Snapshot("RUNNING", tasks(4))] * 15 + SUCCESS[-3:])
    proxy = SwitchableProxy(kfp_api.url)
    kfp_api.hooks[run_id, 3] = lambda: proxy.down_for(1.0)  # after the third look
    code, out, err = kubetune(capsys, "wait", run_id, "--host", proxy.url, "--poll-seconds", "0.05")
    assert code == 0, err
    assert err.count("lost the KFP API") == 1 and err.count("answers again") == 1, err
    assert out[-1].endswith(" SUCCEEDED after 7m24s") and ("train", "SUCCEEDED") in stage_lines(out)
    assert len(kfp_api.sent("GET", f"/runs/{run_id}")) == 18  # every snapshot seen: none lost to the outage


def test_an_outage_longer_than_the_patience_gives_up_with_exit_4_never_0(kfp_api, capsys):
    run_id = run_of(kfp_api, [Snapshot("RUNNING", tasks(4))] * 5 + [Snapshot("SUCCEEDED", tasks(8, now=""))])
    proxy = SwitchableProxy(kfp_api.url)
    kfp_api.hooks[run_id, 2] = proxy.down  # after the second look, for good
    code, out, err = kubetune(capsys, "wait", run_id, "--host", proxy.url, "--poll-seconds", "0.05",
                              "--outage-patience", "1")
    assert code == 4, err
    assert err.count("lost the KFP API") == 1
    assert f"could not see run {run_id} finish: the KFP API did not answer for" in err
    assert f"`kubetune wait {run_id} --host {proxy.url}` follows it again" in err
    assert not any(line.startswith("kubetune: run ") for line in out)  # no outcome claimed


def test_wait_timeout_gives_up_with_exit_4(kfp_api, capsys):
    run_id = run_of(kfp_api, [Snapshot("RUNNING", tasks(4))])  # it never ends
    code, out, err = kubetune(capsys, "wait", run_id, "--host", kfp_api.url, *FAST, "--wait-timeout", "0.3")
    assert code == 4 and "--wait-timeout" in err and f"could not see run {run_id} finish" in err, err


# ---------------------------------------------------------------------------------------------
# runs


@pytest.fixture
def listed(kfp_api, tmp_path, monkeypatch, capsys):
    """Five runs: three of kubetune in experiment A (one registered v3 as champion, one failed, one
    running without an MLflow run yet), one of another pipeline, one of kubetune in experiment B."""
    from mlflow import MlflowClient

    monkeypatch.setattr("kubetune.launch.kfp_runs.PAGE_SIZE", 2)  # several pages, as kfp pages them
    a = {"experiment_id": "experiment-a", "display_name": "A", "namespace": ""}
    b = {"experiment_id": "experiment-b", "display_name": "B", "namespace": ""}
    kfp_api.experiments.update({"experiment-a": a, "experiment-b": b})
    runs = {"champion": run_of(kfp_api, [], experiment="experiment-a"),
            "failed": run_of(kfp_api, [], experiment="experiment-a"),
            "other": run_of(kfp_api, [], pipeline="someone-elses", experiment="experiment-a"),
            "in-b": run_of(kfp_api, [], experiment="experiment-b"),
            "running": run_of(kfp_api, [], experiment="experiment-a")}
    kfp_api.snapshots[runs["champion"]] = Snapshot("SUCCEEDED", tasks(8, now=""))
    kfp_api.snapshots[runs["failed"]] = Snapshot("FAILED", tasks(4, "FAILED", then=["finish-run"]))
    kfp_api.snapshots[runs["in-b"]] = Snapshot("SUCCEEDED", tasks(8, now=""))
    kfp_api.snapshots[runs["running"]] = Snapshot("RUNNING", tasks(2))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("quotes")
    mlflow_runs = {}
    for key, tags in {"champion": {"kubetune.registered_model": "quotes-lora", "kubetune.registered_version": "3",
                                   "kubetune.champion": "yes"},
                      "failed": {"kubetune.failed_stage": "train"},
                      "in-b": {"kubetune.registered_model": "quotes-lora", "kubetune.registered_version": "4",
                               "kubetune.champion": "no"}}.items():
        mlflow_runs[key] = mlflow.create_run(experiment, tags={"kubetune.pipeline_run": runs[key], **tags}).info.run_id
    capsys.readouterr()  # MLflow's lines about creating the store
    return runs, mlflow_runs, uri


def test_runs_lists_the_pipelines_runs_newest_first_with_their_mlflow_facts(kfp_api, capsys, listed):
    runs, mlflow_runs, uri = listed
    code, out, err = kubetune(capsys, "runs", "--host", kfp_api.url, "--set", f"tracking.mlflow_uri={uri}")
    assert code == 0 and err == "", err
    assert out[0].split() == ["RUN", "ID", "STATE", "STARTED", "DURATION", "MLFLOW", "RUN", "REGISTERED", "CHAMPION",
                              "NAME"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert [line.split()[0] for line in out[1:]] == [runs[k] for k in ("running", "in-b", "failed", "champion")]
    assert rows[runs["champion"]][1] == "SUCCEEDED" and rows[runs["champion"]][4] == "7m24s"
    assert rows[runs["champion"]][5:8] == [mlflow_runs["champion"], "quotes-lora/3", "yes"]
    assert rows[runs["in-b"]][5:8] == [mlflow_runs["in-b"], "quotes-lora/4", "no"]
    assert rows[runs["failed"]][1] == "FAILED" and rows[runs["failed"]][5:8] == [mlflow_runs["failed"], "-", "-"]
    assert rows[runs["running"]][1] == "RUNNING" and rows[runs["running"]][4].endswith("+")  # still going
    assert rows[runs["running"]][5:8] == ["-", "-", "-"]
    pages = kfp_api.sent("GET", "/runs")
    assert len(pages) == 3 and {p.query["sort_by"] for p in pages} == {"created_at desc"}
    assert [p.query.get("page_token") for p in pages] == [None, "2", "4"] and pages[0].query["page_size"] == "2"

    code, out, err = kubetune(capsys, "runs", "--host", kfp_api.url, "--limit", "1", "--experiment", "A",
                              "--set", f"tracking.mlflow_uri={uri}")
    assert code == 0 and [line.split()[0] for line in out[1:]] == [runs["running"]], err
    assert {p.query.get("experiment_id") for p in kfp_api.sent("GET", "/runs")[3:]} == {"experiment-a"}


def test_runs_without_mlflow_still_lists_and_says_so_once(kfp_api, capsys, listed):
    runs, _, _ = listed
    code, out, err = kubetune(capsys, "runs", "--host", kfp_api.url, "--set", "tracking.mlflow_uri=http://127.0.0.1:9")
    assert code == 0 and len(out) == 5, err
    assert err.count("\n") == 1 and "MLflow at http://127.0.0.1:9 was not reachable" in err
    assert all(line.split()[5:8] == ["-", "-", "-"] for line in out[1:])
    code, out, err = kubetune(capsys, "runs", "--host", kfp_api.url)
    assert code == 0 and len(out) == 5 and err.count("\n") == 1 and "MLflow columns empty" in err


# ---------------------------------------------------------------------------------------------
# logs, and one line for each wrong thing


def test_logs_of_a_stage_come_from_the_ui_pod_logs_route(kfp_api, capsys):
    run_id = run_of(kfp_api, [Snapshot("SUCCEEDED", tasks(8, now=""))])
    kfp_api.logs[kfp_api.pod_name(run_id, "train")] = "step 1 loss 2.31\nstep 2 loss 1.87\n"
    code, out, err = kubetune(capsys, "logs", run_id, "--stage", "train", "--host", kfp_api.url)
    assert code == 0 and out == ["step 1 loss 2.31", "step 2 loss 1.87"], err
    # Argo pod names v2: the node id from child_tasks, then the executor templates' pod names.
    asked = [r.query for r in kfp_api.requests if r.path == "/k8s/pod/logs"]
    assert [q["podname"] for q in asked] == [kfp_api.node_id(run_id, "train"),
                                             kfp_api.pod_name(run_id, "train").replace("retry-", ""),
                                             kfp_api.pod_name(run_id, "train")]
    assert asked[-1] == {"podname": kfp_api.pod_name(run_id, "train"), "runid": run_id,
                         "createdat": (T0 + datetime.timedelta(seconds=141)).date().isoformat()}  # train's start

    kfp_api.pod_names, kfp_api.multi_user = "v1", True  # the pod is named as its node; namespaces required
    kfp_api.logs[kfp_api.pod_name(run_id, "prepare-data")] = "prepared 1000 rows\n"
    code, out, err = kubetune(capsys, "logs", run_id, "--stage", "prepare_data", "--host", kfp_api.url,
                              "--namespace", "team-a")
    assert code == 0 and out == ["prepared 1000 rows"], err
    assert [r.query for r in kfp_api.requests if r.path == "/k8s/pod/logs"][-1]["podnamespace"] == "team-a"


def test_logs_without_a_stage_lists_the_stages(kfp_api, capsys):
    run_id = run_of(kfp_api, [Snapshot("FAILED", tasks(4, "FAILED", then=["finish-run"]))])
    code, out, err = kubetune(capsys, "logs", run_id, "--host", kfp_api.url)
    assert code == 0, err
    assert [line.split()[:2] for line in out[1:-1]] == [["preflight", "SUCCEEDED"], ["prepare-data", "SUCCEEDED"],
                                                        ["tokenize", "SUCCEEDED"], ["prepare-model", "SUCCEEDED"],
                                                        ["train", "FAILED"], ["finish-run", "SUCCEEDED"]]
    assert out[-1].endswith("NAME is one of: preflight, prepare-data, tokenize, prepare-model, train, finish-run")


def one_line(code: int, err: str, starts: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"kubetune: error: {starts}"), err


def test_wrong_stage_run_id_token_and_host_are_one_line_exit_2(kfp_api, capsys):
    run_id = run_of(kfp_api, [Snapshot("RUNNING", tasks(4))])
    code, _, err = kubetune(capsys, "logs", run_id, "--stage", "trian", "--host", kfp_api.url)
    one_line(code, err, "--stage = 'trian': no such stage; give one of preflight, prepare-data, tokenize, "
                        "prepare-model, train")
    code, _, err = kubetune(capsys, "logs", run_id, "--stage", "evaluate", "--host", kfp_api.url)
    one_line(code, err, "--stage = 'evaluate': run ")
    code, _, err = kubetune(capsys, "logs", run_id, "--stage", "train", "--host", kfp_api.url)  # no log of its pod
    one_line(code, err, "--stage = 'train': KFP has no log of the stage's pod")
    for command in (["logs", "run-nope", "--stage", "train"], ["wait", "run-nope", *FAST], ["cancel", "run-nope"]):
        code, _, err = kubetune(capsys, *command, "--host", kfp_api.url)
        one_line(code, err, f"RUN_ID = 'run-nope': Kubeflow Pipelines at {kfp_api.url} has no such run")

    kfp_api.serves_ui = False  # --host is the API server itself: no logs route there
    kfp_api.logs[kfp_api.pod_name(run_id, "train")] = "a log\n"
    code, _, err = kubetune(capsys, "logs", run_id, "--stage", "train", "--host", kfp_api.url)
    one_line(code, err, f"--host = '{kfp_api.url}': serves no /k8s/pod/logs")

    kfp_api.require_token = "right"
    for command in (["logs", run_id], ["wait", run_id], ["cancel", run_id], ["runs"]):
        code, _, err = kubetune(capsys, *command, "--host", kfp_api.url, "--token", "wrong")
        one_line(code, err, "--token = '<hidden>': ")
        assert "HTTP 401" in err and "wrong" not in err

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    code, _, err = kubetune(capsys, "wait", run_id, "--host", nowhere)
    one_line(code, err, f"--host = '{nowhere}': Kubeflow Pipelines does not answer")
    code, _, err = kubetune(capsys, "runs", "--host", kfp_api.url, "--token", "right", "--experiment", "nope")
    one_line(code, err, "--experiment = 'nope': ")
    code, _, err = kubetune(capsys, "wait", run_id, "--host", kfp_api.url, "--wait-timeout", "soon")
    one_line(code, err, "--wait-timeout = 'soon': give a duration")


def test_the_stand_in_answers_as_kfp_server_api_parses(kfp_api):
    """Every field the commands read parses into kfp_server_api's models (no silent None)."""
    import kfp_server_api

    run_id = run_of(kfp_api, [Snapshot("FAILED", tasks(4, "FAILED", TRAIN_ERROR), error="run failed")])
    with urllib.request.urlopen(f"{kfp_api.url}{API}/runs/{run_id}") as response:
        data = json.loads(response.read())
    api = kfp_server_api.ApiClient()
    run = api._ApiClient__deserialize(data, "V2beta1Run")
    assert run.state == "FAILED" and run.error.message == "run failed" and run.finished_at.year >= 2025
    train = next(t for t in run.run_details.task_details if t.display_name == "train")
    assert train.state == "FAILED" and train.error.message == TRAIN_ERROR and train.start_time.year >= 2025
    assert train.child_tasks[0].pod_name == kfp_api.node_id(run_id, "train")
    assert {t.display_name for t in run.run_details.task_details} >= {"exit-handler-1", "train-driver", "executor"}
