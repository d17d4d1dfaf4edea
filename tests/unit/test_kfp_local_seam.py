"""Contracts of kubetune.launch.kfp_local with kfp.local's private API: one test per replaced
function (and the launcher script, in tests/integration/test_warm_start.py). Each fails when kfp
changes what kubetune replaces: its name, its parameters, or the way kfp calls it (through the
module's attribute at call time, so that a replacement takes effect). A failure here means: read
the new kfp, adapt kfp_local, then move kfp_local.SUPPORTED."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.errors import ConfigError
from kubetune.launch import kfp_local

ROOT = Path(__file__).resolve().parents[2]


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _calls(module, name: str) -> list[ast.Call]:
    """The calls of `name` in module's source, as a bare name or as an attribute."""
    tree = ast.parse(inspect.getsource(module))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)]


def test_the_installed_kfp_is_the_supported_one_and_others_are_refused():
    kfp_local.check_version()  # requirements.lock pins a supported kfp
    for version in ("2.18.0", "3.0.1", "2.16.2"):
        with pytest.raises(ConfigError, match=r"^kfp = '.*': `kubetune run` replaces parts of kfp.local written "
                                              r"for kfp 2\.17\.x"):
            kfp_local.check_version(version)


def test_run_local_subprocess_is_called_by_keyword_with_the_command_and_environment():
    from kfp.local import subprocess_task_handler as handler

    assert _parameters(handler.run_local_subprocess) == ["full_command", "env_vars"]
    [call] = _calls(handler, "run_local_subprocess")
    assert isinstance(call.func, ast.Name)  # looked up in the module at call time: a replacement is seen
    assert sorted(keyword.arg for keyword in call.keywords) == ["env_vars", "full_command"]


def test_replace_python_executable_rewrites_python3_in_every_element():
    """kubetune keeps kfp's rewrite of the launcher script only (ProcessTasks.keep_arguments)."""
    from kfp.local import subprocess_task_handler as handler

    assert _parameters(handler.replace_python_executable) == ["full_command", "new_executable"]
    rewritten = handler.replace_python_executable(["sh", "-c", "python3 -m x", "--executor_input", "/v/python3/x"],
                                                  "/venv/bin/python")
    assert rewritten == ["sh", "-c", "/venv/bin/python -m x", "--executor_input", "/v//venv/bin/python/x"]
    [call] = _calls(handler, "replace_python_executable")
    assert isinstance(call.func, ast.Name)


def test_run_docker_container_is_called_by_keyword_with_the_image_command_and_volumes():
    from kfp.local import docker_task_handler

    parameters = inspect.signature(docker_task_handler.run_docker_container).parameters
    assert list(parameters)[:4] == ["client", "image", "command", "volumes"]
    assert parameters[list(parameters)[-1]].kind is inspect.Parameter.VAR_KEYWORD
    calls = _calls(docker_task_handler, "run_docker_container")
    assert calls and all(isinstance(call.func, ast.Name) for call in calls)
    assert all({"client", "image", "command", "volumes"} <= {k.arg for k in call.keywords} for call in calls)


def test_kfp_logs_its_task_lines_through_the_replaceable_logging_helpers():
    from kfp.local import logging_utils, pipeline_orchestrator, task_dispatcher

    assert _parameters(logging_utils.local_logger_context) == []
    assert _parameters(logging_utils.print_horizontal_line) == []
    for module in (pipeline_orchestrator, task_dispatcher):
        for name in ("local_logger_context", "print_horizontal_line"):
            calls = _calls(module, name)
            assert calls and all(getattr(call.func.value, "id", None) == "logging_utils" for call in calls), \
                f"{module.__name__} no longer calls logging_utils.{name}"


def test_a_pipeline_under_the_seam_runs_each_task_through_the_replacement(tmp_path):
    """The whole contract at once, on a real one-task pipeline under SubprocessRunner: the task's
    command reaches the replacement with kfp's executor input intact (kfp alone would turn the
    argument's `python3` into this interpreter's path), and the task's output comes back."""
    script = f"""
import subprocess, sys
from kfp import dsl, local
from kubetune.launch import kfp_local

@dsl.component(base_image="python:3.11", install_kfp_package=False)
def hello(word: str) -> str:
    return word + "!"

seen = []
def run(full_command, env_vars=None):
    seen.append(kfp_local.task_name(full_command))
    return subprocess.call(full_command, env={{**__import__("os").environ, **(env_vars or {{}})}},
                           stdout=subprocess.DEVNULL)

local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root={str(tmp_path)!r}, raise_on_error=True)
with kfp_local.subprocess_tasks(run), kfp_local.task_logging(None):
    task = hello(word="python3 stays")
assert task.output == "python3 stays!", task.output
assert seen == ["hello"], seen
"""
    (tmp_path / "one_task.py").write_text(script)  # kfp reads a component's source from its file
    done = subprocess.run([sys.executable, str(tmp_path / "one_task.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_nothing_outside_the_seam_touches_kfp_local_internals():
    """Only kfp_local imports kfp.local's modules; the rest of kubetune uses `from kfp import local`
    (init, SubprocessRunner, DockerRunner)."""
    found = []
    for path in (ROOT / "src" / "kubetune").rglob("*.py"):
        if path.name == "kfp_local.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kfp.local"):
                found.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
            if isinstance(node, ast.Import) and any(a.name.startswith("kfp.local") for a in node.names):
                found.append(f"{path.relative_to(ROOT)}: import kfp.local...")
    assert not found, found


OPTIONAL_PIPELINE = '''
from typing import Optional
from kfp import dsl, local
from kubetune.launch.kfp_local import optional_inputs

@dsl.component(base_image="python:3.11")
def show(a: Optional[int] = None, b: Optional[str] = None, c: Optional[float] = None):
    print("GOT", a, repr(b), c)

@dsl.component(base_image="python:3.11")
def echo(x: str) -> str:
    return x

@dsl.pipeline(name="optional-inputs")
def optional_pipeline(a: Optional[int] = None, b: Optional[str] = None, c: Optional[float] = None):
    with dsl.ExitHandler(echo(x="done")):  # a nested DAG, as kubetune's exit handler makes
        show(a=a, b=b, c=c)

local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root="{root}")
try:
    optional_pipeline()
    print("WITHOUT THE SEAM: ran")
except Exception as exc:
    print("WITHOUT THE SEAM:", type(exc).__name__)
with optional_inputs():
    optional_pipeline()
    optional_pipeline(a=0, b="x", c=0.5)
'''


def test_optional_pipeline_inputs_left_unset_reach_tasks_as_their_defaults(tmp_path):
    """kfp.local fails on an unset optional pipeline input (kfp 2.17.3); under optional_inputs() the
    task gets its own default, as on KFP's backend, inside a nested DAG too, and set values arrive
    (0 included). When kfp fixes this, the first assertion fails: the seam can then go."""
    lines, output = _run_pipeline_script(OPTIONAL_PIPELINE, tmp_path, ("WITHOUT", "GOT"))
    assert lines == ["WITHOUT THE SEAM: ValueError", "GOT None None None", "GOT 0 'x' 0.5"], output


def _run_pipeline_script(source: str, tmp_path: Path, marks: tuple[str, ...]) -> tuple[list[str], str]:
    """Runs a kfp.local pipeline script in a fresh interpreter (kfp.local's state is per process);
    returns its lines that start with one of marks, and all it printed."""
    script = tmp_path / "pipeline_script.py"
    script.write_text(source.replace("{root}", str(tmp_path / "root")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    output = done.stdout + done.stderr
    return [line.strip() for line in output.splitlines() if line.strip().startswith(marks)], output


CONDITION_PIPELINE = '''
from typing import NamedTuple
from kfp import dsl, local
from kubetune.launch.kfp_local import named_output_conditions

@dsl.component(base_image="python:3.11")
def decide(go: str) -> NamedTuple("Decision", verdict=str, other=int):
    from collections import namedtuple
    return namedtuple("Decision", ["verdict", "other"])(go, 1)

@dsl.component(base_image="python:3.11")
def guarded(note: str):
    print("GUARDED RAN", note)

@dsl.component(base_image="python:3.11")
def echo(x: str) -> str:
    return x

@dsl.pipeline(name="named-output-condition")
def condition_pipeline(go: str):
    with dsl.ExitHandler(echo(x="done")):
        decided = decide(go=go)
        with dsl.If(decided.outputs["verdict"] == "train"):
            guarded(note=go)

local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root="{root}")
print("WITHOUT THE SEAM")
condition_pipeline(go="train")
print("WITH THE SEAM")
with named_output_conditions():
    condition_pipeline(go="train")
    condition_pipeline(go="skip")
'''


def test_a_condition_on_a_named_output_is_evaluated_as_on_the_backend(tmp_path):
    """kfp.local 2.17.3 evaluates `dsl.If(task.outputs["name"] == ...)` as false (it cannot resolve a
    named output's channel) and skips the guarded tasks; under named_output_conditions() they run
    when the condition holds, and only then. When kfp fixes this, the first assertion fails."""
    lines, output = _run_pipeline_script(CONDITION_PIPELINE, tmp_path, ("WITH", "GUARDED"))
    assert lines == ["WITHOUT THE SEAM", "WITH THE SEAM", "GUARDED RAN train"], output
