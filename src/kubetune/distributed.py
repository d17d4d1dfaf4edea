"""Training processes started by torchrun: train.processes workers on one node, and on each node of
a TrainJob (train.nodes > 1).

One worker per GPU (NCCL), or several on the CPU (gloo). Each worker runs the same entry module
with the same arguments; the Trainer joins them into one process group from torchrun's environment
(RANK, WORLD_SIZE, ...), and only the first one writes, logs and uploads.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Lines of a node's output kept to find its error line in.
TAIL_LINES = 200
#: An exception line of a Python traceback; torchrun's own summary of a failed child is not one we want.
_ERROR_LINE = re.compile(r"^(?!torch\.distributed\.elastic)[\w.]*(Error|Exception|Interrupt|Exit)\b.*")


_RANK_PREFIX = re.compile(r"^\[(default)?\d*rank\d+\]:\s*")  # torchrun's --tee / log-line prefix


class NodeFailed(Exception):
    """torchrun ended non-zero on this node; error_line: the last exception line its workers printed."""

    def __init__(self, exit_code: int, error_line: str):
        self.exit_code, self.error_line = exit_code, error_line
        super().__init__(f"exit {exit_code}: {error_line}")


def _arguments_file(arguments: dict[str, Any]) -> Path:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(arguments, handle)
    return Path(handle.name)


def launch(processes: int, module: str, arguments: dict[str, Any]) -> None:
    """`torchrun --standalone --nproc_per_node=processes -m module ARGS.json`; raises when a worker fails."""
    path = _arguments_file(arguments)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", module, str(path)]
    log.info("%d data-parallel processes: %s", processes, " ".join(command))
    try:
        subprocess.run(command, check=True)
    finally:
        path.unlink(missing_ok=True)


def launch_node(module: str, arguments: dict[str, Any]) -> None:
    """One node of several: `torchrun -m module ARGS.json` with no rendezvous flags, since torchrun
    reads them from PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
    PET_MASTER_PORT (what Kubeflow Trainer's torch runtime sets). Its output passes through; raises
    NodeFailed with the last error line when torchrun fails."""
    path = _arguments_file(arguments)
    command = [sys.executable, "-m", "torch.distributed.run", "-m", module, str(path)]
    log.info("training node: %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as process:
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                tail.append(line.rstrip("\n"))
        if process.returncode:
            raise NodeFailed(process.returncode, error_line(list(tail)))
    finally:
        path.unlink(missing_ok=True)


def error_line(lines: list[str]) -> str:
    """The last exception line among lines (a traceback's last), else the last non-empty one."""
    cleaned = [_RANK_PREFIX.sub("", line).strip() for line in lines]
    for line in reversed(cleaned):
        if _ERROR_LINE.match(line):
            return line
    return next((line for line in reversed(cleaned) if line), "no output")


def read_arguments() -> dict[str, Any]:
    """In a worker: the arguments launch() or launch_node() passed."""
    return json.loads(Path(sys.argv[1]).read_text())
