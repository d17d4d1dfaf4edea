"""The compiled pipeline in the repo is what the code compiles to, and it has the seven tasks."""

import yaml

from kubetune.pipelines.pipeline import COMPILED, compile_pipeline

TASKS = ["preflight", "prepare-data", "tokenize", "prepare-model", "train", "evaluate", "register"]


def test_committed_yaml_matches_a_fresh_compile(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "pipeline drifted: run `make compile` and commit the YAML"


def test_seven_tasks_in_order():
    spec = next(yaml.safe_load_all(COMPILED.read_text()))  # then the platforms: kubernetes document
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(TASKS)
    upstream = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    for before, after in zip(TASKS, TASKS[1:]):
        assert before in upstream[after], f"{after} does not wait for {before}"


def test_default_config_parameter_is_the_embedded_demo():
    import json

    from kubetune.config import default_config

    spec = next(yaml.safe_load_all(COMPILED.read_text()))  # then the platforms: kubernetes document
    default = spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]
    assert json.loads(default) == default_config()
