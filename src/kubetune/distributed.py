"""Data-parallel training on one node: train.processes workers started by torchrun.

One worker per GPU (NCCL), or several on the CPU (gloo). Each worker runs the same entry module
with the same arguments; the Trainer joins them into one DDP group from torchrun's environment
(RANK, WORLD_SIZE, ...), and only the first one writes, logs and uploads.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def launch(processes: int, module: str, arguments: dict[str, Any]) -> None:
    """`torchrun --standalone --nproc_per_node=processes -m module ARGS.json`; raises when a worker fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(arguments, handle)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", module, handle.name]
    log.info("%d data-parallel processes: %s", processes, " ".join(command))
    try:
        subprocess.run(command, check=True)
    finally:
        Path(handle.name).unlink(missing_ok=True)


def read_arguments() -> dict[str, Any]:
    """In a worker: the arguments launch() passed."""
    return json.loads(Path(sys.argv[1]).read_text())
