"""Warm starts for `kubetune run`'s stage processes: import once, fork per task.

Every KFP task is a fresh Python process and paid its imports again. Measured here (2 cores,
2026-12-02): importing what the stages use takes about 11.7 s in a fresh process
(transformers.trainer 5.4 s, torch 1.7 s, kubetune.stages with mlflow 1.7 s, the sqlalchemy
store 0.9 s, matplotlib 0.9 s), and a stage process spends about 2 s more tearing them down at
exit; seven stages paid that seven times. The model's own work in most stages is well under that.

A zygote (`python -m kubetune.launch.warm`, started by `kubetune run`) imports those modules
once, then serves one task at a time: it forks, and the child becomes the task's process with the
task's environment, working directory and output pipe, running kfp's executor as kfp's own
launcher script would. The child is a real process of its own: its exit status, its output and
its death with `kubetune run` (PR_SET_PDEATHSIG) are as before.

Forking is only safe while the zygote holds no CUDA context and runs no Python threads (a lock
held by a thread at fork time stays held in the child); the zygote checks both after importing and
refuses otherwise, and anything it cannot serve (a command that is not kfp's lightweight-component
launcher, a zygote that died) runs as a plain subprocess, as before.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Callable, Optional

from kubetune.console import die_with_parent
from kubetune.launch import kfp_local

log = logging.getLogger(__name__)

#: Imported by the zygote for every run; none of them imports torch.
BASE_MODULES = ("kubetune.stages", "kfp.dsl.executor_main", "mlflow.pyfunc", "mlflow.store.tracking.sqlalchemy_store",
                "mlflow.store.model_registry.sqlalchemy_store", "matplotlib.pyplot")
#: Imported too where this machine has no NVIDIA GPU: on one, these ask the CUDA driver for its devices while
#: importing, and a process forked after the driver has been touched cannot use CUDA.
TORCH_MODULES = ("torch", "transformers", "transformers.trainer", "peft", "bitsandbytes")


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def modules_for() -> list[str]:
    """What the zygote imports first: the stages' libraries, and torch's where no GPU is."""
    return list(BASE_MODULES) if has_nvidia_gpu() else [*BASE_MODULES, *TORCH_MODULES]


_MESSAGE_BYTES = 4 * 1024 * 1024


def model_modules(model_dir: Path) -> list[str]:
    """transformers' modelling module of the model's family (the Gemma 3 one takes 2.4 s to import);
    none where a GPU is (it imports torch, as TORCH_MODULES do)."""
    if has_nvidia_gpu():
        return []
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return []
    name = str(model_type).replace("-", "_")
    return [f"transformers.models.{name}.modeling_{name}"] if name.isidentifier() else []


# ---- the zygote's side --------------------------------------------------------------------------------------

def _preload(modules: list[str]) -> list[str]:
    """Imports what it can; a module that is not installed is skipped (the task imports it, or fails, itself)."""
    skipped = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            skipped.append(f"{name}: {exc}")
    return skipped


def _unsafe_to_fork() -> str:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised while importing"
    if threading.active_count() > 1:
        return f"{threading.active_count() - 1} Python threads were started while importing"
    return ""


def _fresh_process_state() -> None:
    """What a fresh process would not share with its siblings: the temporary folder (tempfile caches
    the first TMPDIR it saw, the zygote's) and the unseeded random streams (a fresh process seeds
    them from the OS; forked siblings would all draw the same numbers)."""
    import random

    tempfile.tempdir = None
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _run_task(command: list[str], environment: dict[str, str], cwd: str) -> int:
    """In the forked child: become the task's process and run kfp's executor as its launcher does."""
    os.environ.clear()
    os.environ.update(environment)
    os.environ["_KFP_RUNTIME"] = "true"  # what kfp's launcher script sets
    os.chdir(cwd)
    die_with_parent()
    _fresh_process_state()
    source, arguments = kfp_local.launcher_script(command)
    program = Path(tempfile.mkdtemp()) / "ephemeral_component.py"
    program.write_text(source)
    sys.argv = [kfp_local.EXECUTOR, "--component_module_path", str(program), *arguments]
    try:
        runpy.run_module(kfp_local.EXECUTOR, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the task's own failure, reported as a process would
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter runs at exit; os._exit below skips it
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _serve_one(channel: socket.socket, request: dict, output_fd: int) -> int:
    child = os.fork()
    if child == 0:
        code = 1
        try:
            channel.close()  # the zygote's; kubetune run must see it close when the zygote goes
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            os.close(output_fd)
            sys.stdout.reconfigure(line_buffering=True)
            sys.stderr.reconfigure(line_buffering=True)
            code = _run_task(request["command"], request["env"], request["cwd"])
        except BaseException:  # noqa: BLE001 - setting up the task failed: say why, as a process would
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(output_fd)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def serve(channel: socket.socket, modules: list[str]) -> None:
    """The zygote's loop: import, say whether it can serve, then one message at a time: either
    more modules to import, or a task (with its output pipe) to fork and wait for."""
    skipped = _preload(modules)
    refused = _unsafe_to_fork()
    channel.send(json.dumps({"ready": not refused, "why": refused, "skipped": skipped}).encode())
    if refused:
        return
    while True:
        message, fds, _, _ = socket.recv_fds(channel, _MESSAGE_BYTES, 1)
        if not message:
            return  # kubetune run closed its end
        request = json.loads(message)
        if "import" in request:
            skipped = _preload(request["import"])
            refused = _unsafe_to_fork()
            channel.send(json.dumps({"ready": not refused, "why": refused, "skipped": skipped}).encode())
            if refused:
                return
            continue
        channel.send(json.dumps({"exit": _serve_one(channel, request, fds[0])}).encode())


# ---- kubetune run's side ------------------------------------------------------------------------------------

class WarmStarter:
    """The client of one zygote, for one `kubetune run`. Not thread-safe: kfp.local runs one task at a time."""

    def __init__(self, modules: list[str], log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_file = log_path.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "kubetune.launch.warm", str(theirs.fileno()),
                                         *modules], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=self.log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        theirs.close()
        self.ready: Optional[bool] = None  # None until the zygote has answered
        self.why = ""

    def _answer(self) -> dict:
        reply = self.channel.recv(_MESSAGE_BYTES)
        if not reply:
            raise ConnectionError(f"the warm starter exited (status {self.process.poll()}); see {self.log_file.name}")
        return json.loads(reply)

    def _await_ready(self) -> bool:
        if self.ready is None:
            try:
                answer = self._answer()
            except (ConnectionError, OSError, ValueError) as exc:
                answer = {"ready": False, "why": str(exc)}
            self.ready, self.why = answer["ready"], answer.get("why", "")
            for skipped in answer.get("skipped", []):
                log.debug("warm start: not imported: %s", skipped)
            if not self.ready:
                log.info("warm start off (%s): each stage imports its libraries itself", self.why)
        return bool(self.ready)

    def preload(self, modules: list[str]) -> None:
        """Asks the zygote to import more (the model family's module, once preflight knows it)."""
        if not modules or not self._await_ready():
            return
        self.channel.send(json.dumps({"import": modules}).encode())
        self.ready = None

    def can_run(self, command: list[str]) -> bool:
        return kfp_local.launcher_script(command) is not None and self._await_ready()

    def run(self, command: list[str], env: dict[str, str], lines: Callable[[str], None]) -> int:
        """Runs one task in a child of the zygote; each line of its output goes to `lines`; returns its exit status."""
        reader, writer = os.pipe()
        try:
            socket.send_fds(self.channel, [json.dumps({"command": command, "env": env, "cwd": os.getcwd()}).encode()],
                            [writer])
        finally:
            os.close(writer)
        with os.fdopen(reader, "r", errors="replace") as output:
            for line in output:
                lines(line)
        try:
            return int(self._answer()["exit"])
        except (ConnectionError, OSError, ValueError, KeyError) as exc:
            self.ready, self.why = False, str(exc)
            lines(f"kubetune: the task's warm starter failed: {exc}\n")
            return 1

    def close(self) -> None:
        """Ends the zygote at once: it holds nothing worth a graceful exit, and a run that failed
        early (bad input) must not wait for it to finish importing."""
        self.channel.close()
        self.process.kill()
        self.process.wait()
        self.log_file.close()


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), sys.argv[2:])
