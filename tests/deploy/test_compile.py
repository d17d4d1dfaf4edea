"""The compiled pipeline in the repo is what the code compiles to: the seven stages in order inside
an exit handler that closes the MLflow run, and a typed, described run form."""

import json
import re

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


def test_seven_tasks_in_order_inside_the_exit_handler_six_behind_preflights_verdict():
    spec = _spec()
    root = spec["root"]["dag"]["tasks"]
    assert sorted(root) == ["exit-handler-1", "finish-run"]
    assert root["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "taskFinalStatus" in root["finish-run"]["inputs"]["parameters"]["status"]
    handler = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert sorted(handler) == ["condition-2", "preflight"]
    gate = handler["condition-2"]
    assert gate["dependentTasks"] == ["preflight"]
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--preflight-verdict'] == 'train'"
    assert gate["inputs"]["parameters"]["pipelinechannel--preflight-verdict"] == {
        "taskOutputParameter": {"producerTask": "preflight", "outputParameterKey": "verdict"}}
    tasks = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(TASKS[1:])
    upstream = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    for before, after in zip(TASKS[1:], TASKS[2:]):
        assert before in upstream[after], f"{after} does not wait for {before}"
    # every stage after preflight trains with preflight's config (the run form applied), not config_json
    assert gate["inputs"]["parameters"]["pipelinechannel--preflight-config"] == {
        "taskOutputParameter": {"producerTask": "preflight", "outputParameterKey": "config"}}
    for name in TASKS[1:]:
        config = tasks[name]["inputs"]["parameters"]["config_json"]
        assert config == {"componentInputParameter": "pipelinechannel--preflight-config"}, name


def test_every_value_a_group_refers_to_is_handed_into_it():
    """KFP's backend fails a task whose input names a parameter its DAG was not given ("parent DAG
    does not have input parameter"); kfp 2.17's compiler leaves out values used only in resource
    settings, so each is also a task input (pipelines/pipeline.py). Checked for every DAG."""
    spec = _spec()
    dags = {"root": spec["root"], **{name: c for name, c in spec["components"].items() if "dag" in c}}
    for name, component in dags.items():
        given = set(component.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in component["dag"]["tasks"].items():
            for parameter in task.get("inputs", {}).get("parameters", {}).values():
                wanted = parameter.get("componentInputParameter")
                assert wanted is None or wanted in given, f"{name}/{task_name} needs {wanted}, not handed into {name}"
            constant = json.dumps(task.get("inputs", {}))
            for placeholder in re.findall(r"pipelinechannel--[A-Za-z0-9_-]+", constant):
                assert placeholder in given or f'"{placeholder}"' in constant, (name, task_name, placeholder)


def test_run_form_parameters_are_typed_described_and_optional_without_a_default():
    parameters = _spec()["root"]["inputDefinitions"]["parameters"]
    for field in RUN_FORM:
        parameter = parameters[field.parameter]
        assert parameter["parameterType"] == KFP_TYPES[field.type], field.parameter
        # a KFP optional input: the run form shows it empty, and left empty the config's value stays
        assert parameter["isOptional"] is True and "defaultValue" not in parameter, field.parameter
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
