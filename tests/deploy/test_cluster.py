"""`kubetune submit | retrain | schedule` against a local stand-in for the KFP REST API.

`KfpApiStandIn` (tests/kfp_stand_in.py) is NOT Kubeflow Pipelines: it answers the v2beta1
endpoints that kfp.Client 2.17.3 calls for these commands, records every request, and keeps just
enough state to answer them; the fixtures are in tests/conftest.py. It checks no pipeline
spec, cron expression or permission the way a real server would. Following, listing, logs and
cancelling: tests/deploy/test_cluster_runs.py.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from kubetune import __version__
from kubetune.cli import main
from kubetune.run_config import load_config
from kubetune.pipelines.pipeline import PIPELINE_NAME, compile_pipeline



def kubetune(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def parameters(run_body: dict) -> dict:
    return run_body["runtime_config"]["parameters"]


def test_submit_uploads_the_compiled_pipeline_and_creates_a_run(kfp_api, cluster_config, capsys, tmp_path):
    code, out, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config))
    assert code == 0, err

    (upload,) = kfp_api.sent("POST", "/pipelines/upload")
    assert upload.query["name"] == PIPELINE_NAME
    compiled = compile_pipeline(tmp_path / "fresh.yaml").read_bytes()
    assert upload.files["uploadfile"] == compiled
    assert list(yaml.safe_load_all(upload.files["uploadfile"])) == list(yaml.safe_load_all(compiled))

    (run,) = [r.json for r in kfp_api.sent("POST", "/runs")]
    (pipeline_id,) = kfp_api.pipelines
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline_id,
                                                 "pipeline_version_id": kfp_api.versions[pipeline_id][0]["pipeline_version_id"]}
    assert "pipeline_spec" not in run  # the run points at the uploaded version, not at an inline copy
    sent = parameters(run)
    assert json.loads(sent["config_json"]) == load_config(cluster_config).to_dict()
    assert {k: v for k, v in sent.items() if k != "config_json"} == {
        "accelerator_type": "nvidia.com/gpu", "accelerator_count": 1,
        "gpu_node_selector": {"nvidia.com/gpu.present": "true"}}
    assert re.fullmatch(r"quotes-lora-\d{8}-\d{6}", run["display_name"])

    (experiment,) = kfp_api.experiments.values()
    assert experiment["display_name"] == "quotes-cluster" and run["experiment_id"] == experiment["experiment_id"]
    (run_id,) = kfp_api.runs
    assert out[-1] == f"{kfp_api.url}/#/runs/details/{run_id}"
    assert out[0] == f"kubetune: pipeline version {PIPELINE_NAME} uploaded"


def test_later_submits_reuse_the_pipeline_experiment_and_unchanged_version(kfp_api, cluster_config, capsys):
    for _ in range(3):
        code, out, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config))
        assert code == 0, err

    assert len(kfp_api.sent("POST", "/pipelines/upload")) == 1
    # The server names the first version after the pipeline; the next submit adds the version named
    # after this code (package version + YAML hash), and the one after that finds and reuses it.
    (version_upload,) = kfp_api.sent("POST", "/pipelines/upload_version")
    assert re.fullmatch(rf"{PIPELINE_NAME}-{re.escape(__version__)}-[0-9a-f]{{12}}", version_upload.query["name"])
    assert out[0] == f"kubetune: pipeline version {version_upload.query['name']} already there"
    assert len(kfp_api.sent("POST", "/experiments")) == 1
    runs = [r.json for r in kfp_api.sent("POST", "/runs")]
    assert len(runs) == 3 and len({run["experiment_id"] for run in runs}) == 1
    versions = [run["pipeline_version_reference"]["pipeline_version_id"] for run in runs]
    assert versions[0] != versions[1] == versions[2]

    code, _, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--experiment", "other")
    assert code == 0, err
    assert sorted(e["display_name"] for e in kfp_api.experiments.values()) == ["other", "quotes-cluster"]


def test_accelerator_parameters_and_auth_reach_the_run(kfp_api, cluster_config, capsys):
    code, _, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--token", "s3cret", "--namespace", "team-a", "--accelerator-type", "amd.com/gpu",
                            "--accelerator-count", "0",
                            "--gpu-node-selector", "pool=a100", "--run-name", "my-run",
                            "--service-account", "kubetune-pipeline")
    assert code == 0, err
    assert all(r.headers.get("authorization") == "Bearer s3cret" for r in kfp_api.requests)
    assert not kfp_api.sent("GET", "/healthz")  # with a namespace kfp.Client does not ask whether KFP is multi-user
    assert kfp_api.sent("POST", "/pipelines/upload")[0].query["namespace"] == "team-a"
    assert kfp_api.sent("POST", "/experiments")[0].json["namespace"] == "team-a"
    (run,) = [r.json for r in kfp_api.sent("POST", "/runs")]
    assert run["display_name"] == "my-run" and run["service_account"] == "kubetune-pipeline"
    assert {k: v for k, v in parameters(run).items() if k != "config_json"} == {
        "accelerator_type": "amd.com/gpu", "accelerator_count": 0,
        "gpu_node_selector": {"pool": "a100"}}


def test_in_a_pod_the_projected_service_account_token_is_the_credential(kfp_api, cluster_config, capsys,
                                                                         monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-1")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    kfp_api.require_token = "sa-token-1"
    code, _, err = kubetune(capsys, "retrain", "--host", kfp_api.url, "--config", str(cluster_config))
    assert code == 0, err
    assert {r.headers["authorization"] for r in kfp_api.requests} == {"Bearer sa-token-1"}

    token_file.write_text("sa-token-2")  # the kubelet rotated it: read again on every request
    kfp_api.require_token = "sa-token-2"
    code, _, err = kubetune(capsys, "retrain", "--host", kfp_api.url, "--config", str(cluster_config))
    assert code == 0, err


def test_retrain_sends_the_overrides_in_config_json(kfp_api, cluster_config, capsys):
    code, out, err = kubetune(capsys, "retrain", "--host", kfp_api.url, "--config", str(cluster_config),
                              "--set", "data.path=s3://kubetune-data/quotes-2.jsonl", "--set", "train.max_steps=7")
    assert code == 0, err
    (run,) = [r.json for r in kfp_api.sent("POST", "/runs")]
    assert run["display_name"].startswith("retrain-quotes-lora-")
    config = json.loads(parameters(run)["config_json"])
    assert config["data"]["path"] == "s3://kubetune-data/quotes-2.jsonl" and config["train"]["max_steps"] == 7
    assert config == load_config(cluster_config, ["data.path=s3://kubetune-data/quotes-2.jsonl",
                                                  "train.max_steps=7"]).to_dict()
    (run_id,) = kfp_api.runs
    assert out[-1] == f"{kfp_api.url}/#/runs/details/{run_id}"


@pytest.mark.parametrize("command", [["retrain"], ["submit"], ["schedule", "--name", "weekly", "--cron", "@weekly"]],
                         ids=lambda argv: argv[0])
def test_when_data_changes_is_the_pipeline_parameter_and_sent_only_when_asked(kfp_api, cluster_config, capsys,
                                                                              command):
    base = [*command, "--host", kfp_api.url, "--config", str(cluster_config)]
    code, _, err = kubetune(capsys, *base, "--when-data-changes")
    assert code == 0, err
    code, _, err = kubetune(capsys, *base)
    assert code == 0, err
    sent = [r.json for r in kfp_api.sent("POST", "/recurringruns" if command[0] == "schedule" else "/runs")]
    assert parameters(sent[0])["when_data_changes"] is True and "when_data_changes" not in parameters(sent[1])
    compiled = next(yaml.safe_load_all(compile_pipeline(cluster_config.with_name("p.yaml")).read_text()))
    assert compiled["root"]["inputDefinitions"]["parameters"]["when_data_changes"]["defaultValue"] is False


def test_schedule_creates_then_replaces_by_name(kfp_api, cluster_config, capsys):
    base = ["schedule", "--host", kfp_api.url, "--config", str(cluster_config), "--name", "nightly"]
    code, out, err = kubetune(capsys, *base, "--cron", "0 3 * * *")  # the CronJob's dialect
    assert code == 0, err
    (first,) = kfp_api.recurring_runs.values()
    # KFP reads 6 fields, seconds first: the same schedule at second 0
    assert first["display_name"] == "nightly" and first["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert first["mode"] == "ENABLE" and first["max_concurrency"] == 1 and first["no_catchup"] is True
    assert first["pipeline_version_reference"]["pipeline_id"] in kfp_api.pipelines
    assert json.loads(parameters(first)["config_json"]) == load_config(cluster_config).to_dict()
    assert out[-1] == f"{kfp_api.url}/#/recurringrun/details/{first['recurring_run_id']}"

    code, _, err = kubetune(capsys, "schedule", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--name", "weekly", "--cron", "@weekly")
    assert code == 0, err
    code, out, err = kubetune(capsys, *base, "--cron", "30 4 * * mon-fri", "--set", "train.max_steps=9")
    assert code == 0, err

    by_name = {r["display_name"]: r for r in kfp_api.recurring_runs.values()}
    assert sorted(r["display_name"] for r in kfp_api.recurring_runs.values()) == ["nightly", "weekly"]
    assert by_name["nightly"]["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * mon-fri"
    assert by_name["weekly"]["trigger"]["cron_schedule"]["cron"] == "0 0 0 * * 0"  # @weekly as robfig/cron means it
    assert json.loads(parameters(by_name["nightly"])["config_json"])["train"]["max_steps"] == 9
    (deleted,) = kfp_api.sent("DELETE", f"/recurringruns/{first['recurring_run_id']}")
    created_last = kfp_api.sent("POST", "/recurringruns")[-1]
    assert kfp_api.requests.index(created_last) < kfp_api.requests.index(deleted)  # never without a schedule
    assert f"replacing {first['recurring_run_id']}" in out[1]


@pytest.mark.parametrize("argv", [
    ["submit", "--set", "train.nope=1"],  # unknown key
    ["submit", "--set", "train.max_steps=many"],  # wrong type
    ["submit"],  # the embedded config reads this machine's files
    ["submit", "--set", "storage.uri=null"],  # checkpoints would die with the pod
    ["submit", "--accelerator-count", "-1"],
    ["submit", "--gpu-node-selector", "pool"],
    ["retrain", "--set", "model.name_or_path=./my-model"],
    ["schedule", "--name", "nightly", "--cron", "0 0 3 * * *"],  # KFP's 6 fields: drop the seconds
    ["schedule", "--name", "nightly", "--cron", "3 * *"],
    ["schedule", "--name", "nightly", "--cron", "60 3 * * *"],  # minute out of range
    ["schedule", "--name", "nightly", "--cron", "0 24 * * *"],
    ["schedule", "--name", "nightly", "--cron", "0 3 0 * *"],  # days of the month start at 1
    ["schedule", "--name", "nightly", "--cron", "0 3 * 13 *"],
    ["schedule", "--name", "nightly", "--cron", "0 3 * * 7"],  # Sunday is 0 for robfig/cron
    ["schedule", "--name", "nightly", "--cron", "*/0 * * * *"],
    ["schedule", "--name", "nightly", "--cron", "0 5-3 * * *"],
    ["schedule", "--name", "nightly", "--cron", "0 3 * * fry"],
    ["schedule", "--name", "nightly", "--cron", "@fortnightly"],
    ["schedule", "--name", " ", "--cron", "@daily"],
], ids=lambda argv: " ".join(argv))
def test_bad_input_exits_2_and_sends_nothing(kfp_api, cluster_config, capsys, argv):
    config = [] if argv == ["submit"] else ["--config", str(cluster_config)]
    code, out, err = kubetune(capsys, *argv, *config, "--host", kfp_api.url)
    assert code == 2
    assert err.startswith("kubetune: error: ") and err.count("\n") == 1, err
    assert kfp_api.requests == []


def test_missing_host_exits_2(kfp_api, cluster_config, capsys):
    code, _, err = kubetune(capsys, "submit", "--config", str(cluster_config))
    assert code == 2 and err.startswith("kubetune: error: --host = None: give the Kubeflow Pipelines URL")
    code, _, err = kubetune(capsys, "submit", "--config", str(cluster_config), "--host", "kfp.example.com")
    assert code == 2 and "https://kfp.example.com" in err


@pytest.mark.parametrize("namespace", [[], ["--namespace", "team-a"]], ids=["healthz first", "namespace given"])
def test_refused_token_is_one_line_that_says_what_to_do(kfp_api, cluster_config, capsys, namespace):
    kfp_api.require_token = "right"
    code, _, err = kubetune(capsys, "submit", "--host", kfp_api.url, "--config", str(cluster_config),
                            "--token", "wrong", *namespace)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("kubetune: error: --token = '<hidden>': ") and "HTTP 401" in err and "wrong" not in err
    assert len(kfp_api.requests) == 1  # the first refusal ends it: no retries, nothing uploaded


@pytest.mark.parametrize("cron", ["0 3 * * *", "*/15 0-6,22-23 1,15 jan-jun ?", "30 2 * * MON-FRI", "0 0-23/2 * * sun",
                                  "5 4 31 12 6", "@daily", "@Hourly", "@yearly", "0  3 *  * *"])
def test_the_standard_cron_is_taken_and_handed_to_kfp_at_second_0(cron):
    from kubetune.launch.cron import DESCRIPTORS, check_cron, kfp_cron

    checked = check_cron(cron)
    assert kfp_cron(checked) == "0 " + DESCRIPTORS.get(checked, " ".join(cron.split()))
    assert len(kfp_cron(checked).split()) == 6


@pytest.mark.parametrize("cron, says", [
    ("0 0 3 * * *", "drop the seconds field, '0 3 * * *'"),
    ("60 3 * * *", "minute '60': 60 is outside 0-59"),
    ("0 3 * * 7", "day-of-week '7': 7 is outside 0-6; Sunday is 0 (or sun)"),
    ("0 3 * jnu *", "month 'jnu': 'jnu' is not a number, or a name (jan-dec)"),
    ("*/0 * * * *", "minute '*/0': the step after / must be a whole number above 0"),
    ("0 5-3 * * *", "hour '5-3': the range 5-3 runs backwards"),
])
def test_a_bad_cron_names_the_field_and_the_fix(cron, says):
    from kubetune.errors import ConfigError
    from kubetune.launch.cron import check_cron

    with pytest.raises(ConfigError) as raised:
        check_cron(cron)
    assert str(raised.value).startswith(f"--cron = {cron!r}: ") and says in str(raised.value), str(raised.value)


def test_the_retrain_cronjob_and_kubetune_schedule_read_one_cron_dialect():
    from pathlib import Path

    from kubetune.launch.cron import check_cron

    cronjob = yaml.safe_load((Path(__file__).parents[2] / "kustomize/components/retrain/cronjob.yaml").read_text())
    assert check_cron(cronjob["spec"]["schedule"]) == cronjob["spec"]["schedule"]
