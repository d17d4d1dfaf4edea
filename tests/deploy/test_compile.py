"""The compiled pipeline in the repo is what the code compiles to: the seven stages in order inside
an exit handler that closes the MLflow run, and a typed, described run form."""

import json

import yaml

from kubetune.config import default_config
from kubetune.pipelines.pipeline import COMPILED, compile_pipeline
from kubetune.run_form import RUN_FORM, cluster_defaults

TASKS = ["preflight", "prepare-data", "tokenize", "prepare-model", "train", "evaluate", "register"]
KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}


def _spec() -> dict:
    return next(yaml.safe_load_all(COMPILED.read_text()))  # then the platforms: kubernetes document


def test_committed_yaml_matches_a_fresh_compile(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "pipeline drifted: run `make compile` and commit the YAML"


def test_seven_tasks_in_order_inside_the_exit_handler():
    spec = _spec()
    root = spec["root"]["dag"]["tasks"]
    assert sorted(root) == ["exit-handler-1", "finish-run"]
    assert root["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "taskFinalStatus" in root["finish-run"]["inputs"]["parameters"]["status"]
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(TASKS)
    upstream = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    for before, after in zip(TASKS, TASKS[1:]):
        assert before in upstream[after], f"{after} does not wait for {before}"
    # every stage after preflight trains with preflight's config (the run form applied), not config_json
    for name in TASKS[1:]:
        config = tasks[name]["inputs"]["parameters"]["config_json"]
        assert config["taskOutputParameter"] == {"producerTask": "preflight", "outputParameterKey": "config"}, name


def test_run_form_parameters_are_typed_described_and_empty_by_default():
    parameters = _spec()["root"]["inputDefinitions"]["parameters"]
    for field in RUN_FORM:
        parameter = parameters[field.parameter]
        assert parameter["parameterType"] == KFP_TYPES[field.type], field.parameter
        assert parameter.get("defaultValue", field.type()) == field.type(), field.parameter
        assert field.help.split(" (sets")[0] in " ".join(parameter["description"].split()), field.parameter
    # and each reaches the preflight task, which applies it (components/preflight.py names them one by one)
    preflight = _spec()["components"]["comp-exit-handler-1"]["dag"]["tasks"]["preflight"]["inputs"]["parameters"]
    for field in RUN_FORM:
        assert preflight[field.parameter] == {"componentInputParameter": f"pipelinechannel--{field.parameter}"}


def test_default_config_is_the_demo_without_local_only_inputs():
    default = _spec()["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]
    assert json.loads(default) == cluster_defaults(default_config())
    assert json.loads(default)["evaluate"]["retention_path"] is None
    assert json.loads(default)["data"] == default_config()["data"]


def test_evaluate_and_register_give_kfp_native_outputs():
    components = _spec()["components"]
    evaluate = components["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert evaluate["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert evaluate["confusion_matrix"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert evaluate["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    registered = components["comp-register"]["outputDefinitions"]["artifacts"]["registered_model"]
    assert registered["artifactType"]["schemaTitle"] == "system.Model"
