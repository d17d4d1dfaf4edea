"""train.nodes > 1: the train task as the follower of a Kubeflow Trainer TrainJob, and each node's side.

The train task (train_on_nodes) puts what the nodes need where all of them can read it, the run's
storage prefix: the tokenized data and the prepared model under `<run>/node-inputs/`. It then submits
one TrainJob (kubetune.trainjob), says each change of its state in the task's log, and when it
completes reads the adapter that rank 0 wrote to `<run>/adapter` as the stage's output; the task
itself needs no GPU. A failed job fails the task with each failed node's last error line, which the
node wrote to `<run>/node-errors/<attempt>/` (the TrainJob's own condition names only the pod). A
retried task deletes its predecessor's job first (one job name per run), and training resumes from the
last checkpoint in storage as on one node. A task stopped from outside (KFP cancel, the pod's
deadline: SIGTERM) deletes its job on the way out, so no GPUs keep training for a run nobody follows;
a task killed outright cannot, and the job's activeDeadlineSeconds (NodeSettings.deadline_seconds)
bounds that case.

Each node (run_node, started by the TrainJob's command `python -m kubetune.train_node ARGS`) fetches
the inputs to its own disk once and runs torchrun, which reads the PET_* rendezvous variables.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kubetune import artifacts, distributed, trainjob
from kubetune.config import RunConfig
from kubetune.training import ADAPTER

log = logging.getLogger(__name__)

INPUTS = "node-inputs"
ERRORS = "node-errors"
INPUTS_COMPLETE = "inputs-complete.json"  # written last: the inputs under a prefix with it are whole
NODE_MODULE = "kubetune.train_node"
WORKER_MODULE = "kubetune.train_worker"
#: How long a retried task waits for its predecessor's job (and pods) to be gone.
DELETE_WAIT_SECONDS = 300


class Cancelled(Exception):
    """The train task was told to stop (SIGTERM) while its TrainJob ran."""


def upload_inputs(store, prefix: str, tokenized_dir: Path, prepared_dir: Path) -> None:
    """The tokenized data and the prepared model to `<prefix>/node-inputs/` (once per run: a retry
    finds them complete)."""
    key = f"{prefix}/{INPUTS}"
    if store.exists(f"{key}/{INPUTS_COMPLETE}"):
        return
    store.upload_dir(tokenized_dir, f"{key}/tokenized")
    store.upload_dir(prepared_dir, f"{key}/prepared")
    store.write_bytes(f"{key}/{INPUTS_COMPLETE}", json.dumps({"written": time.time()}).encode())


def node_command(config_json: str, run_id: str, attempt: str) -> tuple[list[str], list[str]]:
    """The TrainJob's command and args: the image's python, kubetune's node entry, its arguments."""
    return ["python", "-m", NODE_MODULE], [json.dumps({"config": config_json, "run_id": run_id, "attempt": attempt})]


@contextmanager
def _stopping_deletes(cluster: "trainjob.Cluster", name: str) -> Iterator[None]:
    """SIGTERM (KFP cancelling the run, the pod's deadline) becomes Cancelled; on Cancelled or Ctrl-C
    the job is deleted before the task exits."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def stop(signum, frame):
            raise Cancelled(f"signal {signum}")
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except (Cancelled, KeyboardInterrupt):
        log.info("the train task is stopping: deleting TrainJob %s", name)
        cluster.delete(name)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _wait_gone(cluster: "trainjob.Cluster", name: str) -> None:
    deadline = time.monotonic() + DELETE_WAIT_SECONDS
    while cluster.get(name) is not None:
        if time.monotonic() > deadline:
            raise trainjob.TrainJobFailed(f"TrainJob {name} of an earlier attempt is still being deleted after "
                                          f"{DELETE_WAIT_SECONDS} s; its pods may hang: check `kubectl get trainjob "
                                          f"{name}` and retry")
        time.sleep(2)


def node_errors(store, prefix: str, attempt: str) -> list[str]:
    """`node N: <error line>` for each node of this attempt that wrote one."""
    key = f"{prefix}/{ERRORS}/{attempt}"
    return [f"{Path(k).stem.replace('-', ' ')}: {store.read_bytes(k).decode(errors='replace')}"
            for k in sorted(store.list(key))]


def train_on_nodes(cfg: RunConfig, config_json: str, run_id: str, prefix: str, store, tokenized_dir: Path,
                   prepared_dir: Path, out_dir: Path, settings: dict[str, Any], poll_seconds: float = 10.0,
                   say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Trains as one TrainJob of cfg.train.nodes nodes; returns rank 0's training summary, with the
    adapter (or model) in out_dir."""
    node_settings = trainjob.NodeSettings.from_dict(settings)
    cluster = trainjob.Cluster("train.nodes", cfg.train.nodes)
    name = trainjob.job_name(run_id)
    if cluster.delete(name):
        say(f"TrainJob {name}: deleting the earlier attempt's job before starting again")
        _wait_gone(cluster, name)
    upload_inputs(store, prefix, tokenized_dir, prepared_dir)
    attempt = uuid.uuid4().hex[:8]
    command, args = node_command(config_json, run_id, attempt)
    body = trainjob.manifest(name, node_settings, cfg.train.nodes, cfg.train.processes, command, args,
                             cluster.own_service_account(), labels={"kubetune.io/attempt": attempt})
    with _stopping_deletes(cluster, name):
        cluster.create(body)
        say(f"TrainJob {name}: submitted, {cfg.train.nodes} nodes x {cfg.train.processes} processes "
            f"({cfg.train.sharding}) on runtime {node_settings.runtime}")
        outcome, message = trainjob.follow(cluster, name, poll_seconds, say)
    if outcome != "Complete":
        failed = node_errors(store, prefix, attempt)
        raise trainjob.TrainJobFailed(f"TrainJob {name} failed: " + "; ".join(failed or [message or "no reason given"])
                                      + (f" (Trainer: {message})" if failed and message else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    store.download_dir(f"{prefix}/{ADAPTER}", out_dir)
    return artifacts.read_training_summary(out_dir)


def run_node(cfg: RunConfig, config_json: str, run_id: str, attempt: str, prefix: str, store) -> None:
    """One node: the inputs to local disk, then torchrun over this node's processes. A failure leaves
    the node's error line in storage for the train task, and exits non-zero."""
    node = os.environ.get("PET_NODE_RANK", "0")
    work = Path(tempfile.mkdtemp(prefix="kubetune-node-"))
    store.download_dir(f"{prefix}/{INPUTS}/tokenized", work / "tokenized")
    store.download_dir(f"{prefix}/{INPUTS}/prepared", work / "prepared")
    arguments = {"config": config_json, "run_id": run_id, "tokenized_dir": str(work / "tokenized"),
                 "prepared_dir": str(work / "prepared"), "out_dir": str(work / "tuned")}
    try:
        distributed.launch_node(WORKER_MODULE, arguments)
    except distributed.NodeFailed as exc:
        store.write_bytes(f"{prefix}/{ERRORS}/{attempt}/node-{node}.txt", exc.error_line.encode())
        raise SystemExit(exc.exit_code) from None
