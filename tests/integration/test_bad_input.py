"""Bad input stops in preflight with one line naming the field and the value, exit code 2, no
traceback, and nothing registered (no MLflow run is even opened)."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from kfp import dsl

from kubetune import components, tracking
from kubetune.cli import main
from kubetune.errors import UserError
from tiny import tiny_run_config


@pytest.fixture
def setup(tiny_model_dir, quotes_file, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri},
                             storage={"uri": str(tmp_path / "storage")})

    def write(config_dict):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config_dict))
        return path

    return {"config": config, "uri": uri, "write": write, "tmp": tmp_path}


def nothing_recorded(uri):
    client = tracking.client(uri)
    assert client.search_registered_models() == []
    experiments = client.search_experiments()
    assert all(not client.search_runs([e.experiment_id]) for e in experiments)


def quantized_copy(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "gptq-model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


CASES = {
    "unknown key": (["train.epoch=3"], "train.epoch = 3: unknown key; did you mean train.epochs?"),
    "wrong type": (["train.batch_size=four"], "train.batch_size = 'four': expected integer"),
    "lora rank zero": (["model.lora.r=0"], "model.lora.r = 0: the LoRA rank must be a positive integer"),
    "max steps zero": (["train.max_steps=0"], "train.max_steps = 0: must be a positive integer"),
    "missing data file": (["data.path=/nonexistent/quotes.json"], "data.path = '/nonexistent/quotes.json': no such file"),
    "text field not in data": (["data.text_field=quote"], "data.text_field = 'quote': not a field of the data; fields found: author, content, tags"),
    "unknown target modules": (["model.lora.target_modules=[q_proj, query_key_value]"],
                               "model.lora.target_modules = ['q_proj', 'query_key_value']: query_key_value not in this "
                               "model; its linear modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_rejects_bad_input(case, setup, capsys):
    overrides, expected = CASES[case]
    code = main(["run", "--config", str(setup["write"](setup["config"])), *sum((["--set", o] for o in overrides), [])])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("kubetune: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    nothing_recorded(setup["uri"])


def test_8bit_on_an_already_quantized_model(setup, tiny_model_dir, capsys):
    config = setup["config"]
    config["model"]["name_or_path"] = str(quantized_copy(tiny_model_dir, setup["tmp"]))
    assert main(["run", "--config", str(setup["write"](config))]) == 2
    assert "model.quantization = '8bit': the model at" in capsys.readouterr().err
    nothing_recorded(setup["uri"])


@pytest.mark.parametrize("key", ["evaluate.retention_path", "data.replay_path"])
def test_general_text_without_prose_lines(key, setup, capsys):
    """Replay and retention text is read a line at a time; a file of headings and fragments fails
    in preflight, not after training."""
    short = setup["tmp"] / "headings.txt"
    short.write_text("= Chapter one =\n\nA short line.\n= Chapter two =\n")
    overrides = [f"{key}={short}"] + (["data.replay_fraction=0.2"] if key == "data.replay_path" else [])
    code = main(["run", "--config", str(setup["write"](setup["config"])), *sum((["--set", o] for o in overrides), [])])
    err = capsys.readouterr().err
    assert code == 2
    assert f"kubetune: error: {key} = '{short}': holds no lines of 8 words or more" in err
    nothing_recorded(setup["uri"])


def test_preflight_component_stops_the_dag_with_the_same_message(setup):
    """On a cluster the preflight task is what stops a bad run before any GPU task is scheduled."""
    config = setup["config"]
    config["data"]["text_field"] = "quote"
    with pytest.raises(UserError, match="data.text_field = 'quote'"):
        components.preflight.python_func(config_json=json.dumps(config), accelerator_count=1,
                                         lineage=dsl.Artifact(name="lineage", uri=str(setup["tmp"] / "lineage"),
                                                              metadata={}))
    nothing_recorded(setup["uri"])


def test_real_process_exit_code_and_no_traceback(setup):
    path = setup["write"](setup["config"])
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "--config", str(path), "--set", "model.lora.r=-4"],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "kubetune: error: model.lora.r = -4: the LoRA rank must be a positive integer, e.g. 16")
    assert "Traceback" not in proc.stderr
