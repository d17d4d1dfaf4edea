"""The warm starter (kubetune.launch.warm): a real zygote process forks real tasks, launched by
the command line kfp compiles for kubetune's own components."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kubetune.components.register import register
from kubetune.launch import kfp_local, warm


def kfp_command(source: str, *arguments: str) -> list[str]:
    """kfp's launcher for a lightweight component, as compiled for kubetune's register component,
    running `source` instead of the component."""
    command = [*register.component_spec.implementation.container.command]
    return [*command[:3], source, *arguments]


TASK = """
import os, sys
from pathlib import Path

def main():
    print("cwd", os.getcwd())
    print("marker", os.environ.get("WARM_TEST_MARKER"), os.environ.get("_KFP_RUNTIME"))
    print("kfp arguments", sys.argv[1:])
    import random, tempfile
    print("tmp", tempfile.gettempdir(), "draw", random.random())
    print("to stderr", file=sys.stderr)
    mode = os.environ.get("WARM_TEST_MODE", "")
    if mode == "raise":
        raise ValueError("the task's own error")
    if mode == "sleep":
        Path(os.environ["WARM_TEST_PID"]).write_text(str(os.getpid()))
        import time; time.sleep(60)
    sys.exit(int(os.environ.get("WARM_TEST_EXIT", "0")))

main()
"""


@pytest.fixture
def zygote(tmp_path, monkeypatch):
    # A module that, like many libraries, asks for the temporary folder while it is imported.
    preload = tmp_path / "preload"
    preload.mkdir()
    (preload / "caches_tmp.py").write_text("import tempfile\ntempfile.gettempdir()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(preload), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TMPDIR", "/tmp")
    starter = warm.WarmStarter(["json", "caches_tmp"], tmp_path / "logs" / "warm.log")
    yield starter
    starter.close()


def run(starter, tmp_path, monkeypatch, **env):
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    full_env = {**os.environ, "WARM_TEST_MARKER": "m1", "PYTHONPATH": os.pathsep.join(sys.path),
                "TMPDIR": str(tmp_path), **env}
    # kfp's executor would import the component module and run it; a plain script is a module too,
    # and runs at import (before the executor looks for its function, which it never reaches).
    command = kfp_command(TASK, "--executor_input", "{}", "--function_to_execute", "main")
    assert starter.can_run(command)
    code = starter.run(command, full_env, lines.append)
    return code, "".join(lines)


def test_kfp_launcher_is_recognised_and_others_are_not():
    command = [*register.component_spec.implementation.container.command,
               *register.component_spec.implementation.container.args]
    source, arguments = kfp_local.launcher_script(command)
    assert "def register(" in source and arguments[:1] == ["--executor_input"]
    assert kfp_local.launcher_script(["python3", "-c", "print(1)"]) is None
    assert kfp_local.launcher_script(["sh", "-ec", command[2].replace("python3 -m", "pip install x && python3 -m"),
                            *command[3:]]) is None


def test_task_gets_its_environment_directory_output_and_exit_status(zygote, tmp_path, monkeypatch):
    code, output = run(zygote, tmp_path, monkeypatch, WARM_TEST_EXIT="3")
    assert code == 3
    assert f"cwd {tmp_path}" in output
    assert "marker m1 true" in output  # the task's environment, and what kfp's launcher sets
    assert "to stderr" in output
    assert f"tmp {tmp_path}" in output  # the task's TMPDIR, not the one the zygote started with
    code, second = run(zygote, tmp_path, monkeypatch, WARM_TEST_MARKER="m2")  # the next task, its own env
    assert code == 0 and "marker m2 true" in second
    draw = [line for line in output.splitlines() if line.startswith("tmp ")]
    assert draw != [line for line in second.splitlines() if line.startswith("tmp ")]  # random streams differ


def test_a_failing_task_reports_its_traceback_and_the_zygote_serves_on(zygote, tmp_path, monkeypatch):
    code, output = run(zygote, tmp_path, monkeypatch, WARM_TEST_MODE="raise")
    assert code == 1 and "ValueError: the task's own error" in output
    assert run(zygote, tmp_path, monkeypatch)[0] == 0


def test_task_dies_with_the_zygote_and_later_tasks_fall_back(zygote, tmp_path, monkeypatch):
    pid_file = tmp_path / "task.pid"
    import threading

    result = {}

    def sleeping_task():
        result["code"], result["output"] = run(zygote, tmp_path, monkeypatch, WARM_TEST_MODE="sleep",
                                               WARM_TEST_PID=str(pid_file))

    runner = threading.Thread(target=sleeping_task)
    runner.start()
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    task = int(pid_file.read_text())
    os.kill(zygote.process.pid, signal.SIGKILL)
    runner.join(timeout=30)
    assert result["code"] != 0
    deadline = time.monotonic() + 10
    while Path(f"/proc/{task}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{task}").exists() or "Z" in Path(f"/proc/{task}/stat").read_text().split()[2]
    assert not zygote.can_run(kfp_command(TASK))  # so ProcessTasks starts a plain subprocess


def test_zygote_that_would_fork_unsafely_refuses(tmp_path, monkeypatch):
    # A module that starts a thread at import: a fork would copy whatever lock that thread holds.
    (tmp_path / "threaded_module.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    starter = warm.WarmStarter(["threaded_module"], tmp_path / "warm.log")
    assert not starter.can_run(kfp_command(TASK))
    assert "threads" in starter.why
    starter.close()


def test_model_family_module_is_named_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma3"}')
    assert warm.model_modules(tmp_path) == ["transformers.models.gemma3.modeling_gemma3"]
    (tmp_path / "config.json").write_text('{"model_type": "../evil"}')
    assert warm.model_modules(tmp_path) == []
    assert warm.model_modules(tmp_path / "missing") == []
