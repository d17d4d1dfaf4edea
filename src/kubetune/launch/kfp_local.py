"""The one seam with kfp.local's private API: everything kubetune replaces or parses in it.

`kubetune run` executes the pipeline under kfp.local, which has no hooks for what a local run of a
training pipeline needs (a task's output on the console and in a log file, its last error line,
warm-started processes, containers with limits, a quiet console). So five private functions are
replaced for the length of a run, and the shell script kfp writes to start a lightweight
component is parsed. They are all here, written against kfp SUPPORTED (the version requirements.lock
pins) and checked on first use: under another kfp, `kubetune run` stops with one line instead of
failing somewhere inside kfp. tests/unit/test_kfp_local_seam.py holds one contract test per
replaced function and for the launcher script: each fails when kfp changes what is replaced.

Everything else in kubetune.launch uses kfp.local's public API (`local.init`, `SubprocessRunner`,
`DockerRunner`) or the functions below.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from kubetune.errors import ConfigError

#: The kfp releases these replacements are written for: 2.17.x (requirements.lock pins 2.17.3).
SUPPORTED = (2, 17)

#: What kfp's launcher script for a lightweight Python component runs.
EXECUTOR = "kfp.dsl.executor_main"


def kfp_version() -> str:
    import kfp

    return kfp.__version__


def check_version(version: Optional[str] = None) -> None:
    """ConfigError unless the installed kfp is a SUPPORTED release."""
    version = version or kfp_version()
    parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if parts != SUPPORTED:
        wanted = ".".join(map(str, SUPPORTED))
        raise ConfigError("kfp", version, f"`kubetune run` replaces parts of kfp.local written for kfp {wanted}.x; "
                          f"install it (pip install 'kfp=={wanted}.3', as requirements.lock pins) or run on a "
                          "cluster with `kubetune submit`, which uses only kfp's public client")


@contextlib.contextmanager
def subprocess_tasks(run: Callable[..., int]) -> Iterator[None]:
    """Under SubprocessRunner, `run(full_command, env_vars)` starts each task and returns its exit
    code (kfp: subprocess_task_handler.run_local_subprocess). kfp also swaps the string `python3` for
    this interpreter's path in every element of the command (replace_python_executable), config
    JSON and artifact paths included, so a data path inside a virtualenv's lib/python3.11/ pointed
    nowhere: only the shell script that starts Python is rewritten now."""
    check_version()
    from kfp.local import subprocess_task_handler as handler

    originals = handler.replace_python_executable, handler.run_local_subprocess

    def script_only(full_command: list[str], new_executable: str) -> list[str]:
        rewritten = originals[0](full_command, new_executable)
        return [old if i > 0 and full_command[i - 1] == "--executor_input" else new
                for i, (old, new) in enumerate(zip(full_command, rewritten))]

    handler.replace_python_executable, handler.run_local_subprocess = script_only, run
    try:
        yield
    finally:
        handler.replace_python_executable, handler.run_local_subprocess = originals


@contextlib.contextmanager
def docker_tasks(run: Callable[..., int]) -> Iterator[None]:
    """Under DockerRunner, `run(client, image, command, volumes, **run_args)` runs each task's
    container and returns its exit code (kfp: docker_task_handler.run_docker_container)."""
    check_version()
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


@contextlib.contextmanager
def task_logging(context: Optional[Callable[[], contextlib.AbstractContextManager]]) -> Iterator[None]:
    """kfp.local's own lines (a task's inputs, its status) are logged inside
    logging_utils.local_logger_context, with print_horizontal_line between tasks: with `context`,
    that context replaces kfp's and the rules are dropped; None leaves kfp's as they are."""
    check_version()
    from kfp.local import logging_utils

    originals = logging_utils.local_logger_context, logging_utils.print_horizontal_line
    if context is not None:
        logging_utils.local_logger_context, logging_utils.print_horizontal_line = context, lambda: None
    try:
        yield
    finally:
        logging_utils.local_logger_context, logging_utils.print_horizontal_line = originals


def launcher_script(command: list[str]) -> Optional[tuple[str, list[str]]]:
    """(component source, executor arguments) when `command` is kfp's launcher for a lightweight
    Python component (`sh -ec '<write $0 to ephemeral_component.py; python3 -m
    kfp.dsl.executor_main --component_module_path ... "$@">' SOURCE ARGS...`) that installs
    nothing; None for anything else."""
    if len(command) < 4 or command[:2] != ["sh", "-ec"]:
        return None
    script = command[2]
    if EXECUTOR not in script or '"$program_path/ephemeral_component.py"' not in script or '"$@"' not in script \
            or "pip install" in script or "pip3 install" in script:
        return None
    return command[3], command[4:]


def task_name(command: list[str]) -> str:
    """The task a kfp.local command runs (its component function's name), "task" if none is named."""
    if "--function_to_execute" in command:
        return command[command.index("--function_to_execute") + 1]
    return "task"
