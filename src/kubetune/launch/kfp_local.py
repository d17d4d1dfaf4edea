"""The one seam with kfp.local's private API: everything kubetune replaces or parses in it.

`kubetune run` executes the pipeline under kfp.local, which has no hooks for what a local run of a
training pipeline needs (a task's output on the console and in a log file, its last error line,
warm-started processes, containers with limits, a quiet console). So five private functions are
replaced for the length of a run (nine: four of them fill gaps where kfp.local's DAG runs
differently from KFP's backend: optional inputs left unset, and dsl.If on a named output), and the shell script kfp writes to start a lightweight
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
def optional_inputs() -> Iterator[None]:
    """Optional pipeline inputs left unset (the run form's `Optional[T] = None` parameters) stay unset
    under kfp.local, as KFP's backend treats them: the task gets no value and its own default applies.
    kfp.local (OrchestratorUtils.join_user_inputs_and_defaults) instead fails on an optional input
    without a default ("Unknown value type"), cannot pass None to a task, and would hand the task an
    empty value (executor_input_utils.construct_executor_input); so such an input is left out of the
    DAG's arguments, a task input that refers to it is dropped (make_task_arguments), and a task's
    executor input carries no value for it."""
    check_version()
    from kfp.local import executor_input_utils, executor_output_utils
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    originals = OrchestratorUtils.join_user_inputs_and_defaults, OrchestratorUtils.make_task_arguments
    construct = executor_input_utils.construct_executor_input

    def construct_executor_input(*args, **kwargs):
        executor_input = construct(*args, **kwargs)
        values = executor_input.inputs.parameter_values
        for name in [name for name, value in values.items() if value.WhichOneof("kind") is None]:
            del values[name]
        return executor_input

    def join_user_inputs_and_defaults(cls, dag_arguments, dag_inputs_spec):
        joined = dict(dag_arguments)
        for name, spec in dag_inputs_spec.parameters.items():
            # A nested DAG's inputs (pipelinechannel--...) are not marked optional: no default is the sign.
            if name not in joined and spec.HasField("default_value"):
                joined[name] = executor_output_utils.pb2_value_to_python(spec.default_value)
        return joined

    def make_task_arguments(cls, task_inputs_spec, io_store):
        unset = [name for name, spec in task_inputs_spec.parameters.items()
                 if spec.HasField("component_input_parameter") and not _has_parent_input(io_store,
                                                                                          spec.component_input_parameter)]
        if unset:
            task_inputs_spec = type(task_inputs_spec).FromString(task_inputs_spec.SerializeToString())
            for name in unset:
                del task_inputs_spec.parameters[name]
        return originals[1].__func__(cls, task_inputs_spec, io_store)

    OrchestratorUtils.join_user_inputs_and_defaults = classmethod(join_user_inputs_and_defaults)
    OrchestratorUtils.make_task_arguments = classmethod(make_task_arguments)
    executor_input_utils.construct_executor_input = construct_executor_input
    try:
        yield
    finally:
        OrchestratorUtils.join_user_inputs_and_defaults, OrchestratorUtils.make_task_arguments = originals
        executor_input_utils.construct_executor_input = construct


@contextlib.contextmanager
def named_output_conditions() -> Iterator[None]:
    """A dsl.If on a named output of a task (`preflight.outputs["verdict"] == ...`, channel
    `pipelinechannel--preflight-verdict`) is resolved as KFP's backend resolves it. kfp.local's
    ConditionEvaluator._resolve_pipeline_channel reads only `<task>-Output` and `<task>--<name>`
    channels as task outputs, looks `<task>-<name>` up as a pipeline input, finds none and evaluates
    the condition as false: every task under the dsl.If would be skipped, silently."""
    check_version()
    from kfp.local.orchestrator.enhanced_dag_orchestrator import ConditionEvaluator

    original = ConditionEvaluator._resolve_pipeline_channel

    def resolve(channel_ref: str, io_store):
        reference = channel_ref.replace("pipelinechannel--", "")
        if "-Output" not in reference and "--" not in reference:
            for at in [i for i, char in enumerate(reference) if char == "-"]:
                try:
                    return io_store.get_task_output(reference[:at], reference[at + 1:])
                except (KeyError, ValueError):
                    continue
        return original(channel_ref, io_store)

    ConditionEvaluator._resolve_pipeline_channel = staticmethod(resolve)
    try:
        yield
    finally:
        ConditionEvaluator._resolve_pipeline_channel = staticmethod(original)


@contextlib.contextmanager
def backend_semantics() -> Iterator[None]:
    """Both gaps above filled, for as long as the block runs."""
    with optional_inputs(), named_output_conditions():
        yield


def _has_parent_input(io_store, key: str) -> bool:
    try:
        io_store.get_parent_input(key)
    except ValueError:  # kfp.local.io.IOStore: "Parent pipeline input argument ... not found."
        return False
    return True


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
        with backend_semantics():
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
        with backend_semantics():
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
