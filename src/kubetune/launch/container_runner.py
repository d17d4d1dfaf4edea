"""`kubetune run --runner container`: the same pipeline function as the in-process run, every task
in its component's image, as the image's non-root user, under kfp.local's DockerRunner.

podman serves the Docker API the runner speaks; kubetune starts that service for the run and stops
it after. What kfp.local does not do is done here:

- Every local place the config names (data, model, storage, the sqlite tracking store, the
  experiment's artifact folder, retention text), the state folder and files named by passed
  environment variables are mounted at the same path, so the config runs unchanged: inputs
  read-only, outputs read-write. Models installed from PyPI (`package:`) are mounted too.
- The image's user (uid 1000) may write the run's outputs through POSIX ACLs; no file on the host
  changes owner or mode.
- kfp.local removes each container automatically and, when it is gone before its exit code is
  read, assumes success (kfp/local/docker_task_handler.py, kfp 2.17.3 as pinned by the lock). For
  the run, its `run_docker_container` is replaced with one that keeps the container until its exit
  code and last lines are read, so a failed stage fails the run with the stage's own error line.
- On a machine without an NVIDIA GPU the stages whose component names the CUDA image run in the
  CPU image (the same code and lock, without the CUDA libraries), and the log says so.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from kubetune import containers, tracking
from kubetune.launch import kfp_local
from kubetune.config import INPUT, RunConfig
from kubetune.overrides import locations
from kubetune.console import PROGRESS_ENV
from kubetune.errors import StageFailed, UserError, redacted
from kubetune.images import CPU_IMAGE, CUDA_IMAGE
from kubetune.model_source import PACKAGE_PREFIX, PACKAGED_MODELS, source_kind
from kubetune.paths import STATE_ENV
from kubetune.pipelines.pipeline import STAGES, kubetune_pipeline

log = logging.getLogger(__name__)

# Environment passed into the containers: what selects services, credentials and offline mode.
PASSED_ENV_PREFIXES = ("KUBETUNE_", "MLFLOW_", "AWS_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_")
PASSED_ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONHASHSEED",
                    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
NOT_PASSED = ("HF_HOME", containers.RUNTIME_ENV)  # the image has its own HF_HOME under its home
# A mount at or above one of these would hide the image's own files.
IMAGE_PATHS = ("/opt/venv", "/home/kubetune", "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/var/lib",
               "/proc", "/sys", "/dev", "/run")
GPU_DEVICE = "nvidia.com/gpu=all"  # CDI name of every NVIDIA GPU (nvidia-container-toolkit's CDI spec)


# Models installed from PyPI (`package:`) appear here, on the containers' import path. Not at their
# host path: a mount that covers the host's site-packages would then put all of it on that path.
PACKAGES_IN_CONTAINER = Path("/opt/kubetune-model-packages")


@dataclass(frozen=True)
class Mount:
    path: Path  # on the host, and in the container unless `target` says otherwise
    writable: bool
    why: str  # the config key or variable that needs it
    target: Optional[Path] = None

    @property
    def inside(self) -> Path:
        return self.target or self.path


@dataclass
class ContainerPlan:
    mounts: list[Mount]
    writable: list[tuple[Path, bool]]  # (place, with everything below it) the image's user may write
    readable: list[tuple[Path, bool]]  # and may read
    environment: dict[str, str]
    images: dict[str, str]  # component image -> image that runs it here
    devices: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# What the containers need to see
# ------------------------------------------------------------------------------------------------


def _is_remote(value: str) -> bool:
    return "://" in value or value.startswith("package:")


def _package_paths(value: str) -> list[Path]:
    """The installed files of a `package:` model: its import package and its metadata folder."""
    distribution_name = value[len(PACKAGE_PREFIX):].strip()
    entry = PACKAGED_MODELS.get(distribution_name)
    try:
        distribution = importlib.metadata.distribution(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        return []  # preflight has already said how to install it
    site = Path(distribution.locate_file("")).resolve()
    folders = {file.parts[0] for file in distribution.files or [] if file.parts[0].endswith(".dist-info")}
    if entry is not None:
        folders.add(entry.module)
    return [site / folder for folder in sorted(folders) if (site / folder).is_dir()]


def plan_mounts(cfg: RunConfig, state: Path, artifact_location: Optional[Path],
                environment: dict[str, str]) -> tuple[list[Mount], list[tuple[Path, bool]]]:
    """Mounts for every local place the run reads or writes, and the places it writes (with
    whether everything below them is written too)."""
    mounts = [Mount(state, True, "KUBETUNE_HOME")]
    writable = [(state, True)]
    for key, value, kind in locations(cfg):
        if key == "tracking.mlflow_uri":
            store = tracking.local_path(value)
            if store is None:
                continue
            store = store.resolve()
            if value.startswith("sqlite:"):  # the database file, and its folder for sqlite's journal
                mounts.append(Mount(store.parent, True, key))
                writable += [(store.parent, False)] + ([(store, False)] if store.exists() else [])
            else:  # a file store: a folder of its own
                store.mkdir(parents=True, exist_ok=True)
                mounts.append(Mount(store, True, key))
                writable.append((store, True))
            continue
        if value.startswith("package:"):
            mounts.extend(Mount(path, False, key, PACKAGES_IN_CONTAINER / path.name) for path in _package_paths(value))
            continue
        if _is_remote(value):
            continue
        path = Path(value).resolve()
        if kind == INPUT:
            if path.exists():  # else a hub id (or missing, which preflight has reported)
                # A file's folder: sidecar files are read from beside it (labels, mapping.txt).
                mounts.append(Mount(path if path.is_dir() else path.parent, False, key))
        else:
            path.mkdir(parents=True, exist_ok=True)
            mounts.append(Mount(path, True, key))
            writable.append((path, True))
    if artifact_location is not None:
        artifact_location.mkdir(parents=True, exist_ok=True)
        mounts.append(Mount(artifact_location, True, "the experiment's artifact location"))
        writable.append((artifact_location, True))
    for name, value in environment.items():
        # A file a variable names (a CA bundle, a credentials file), unless the image has its own
        # file at that place (the system CA bundle under /etc): that one is used instead.
        if os.path.isabs(value) and os.path.exists(value) and not _in_image(Path(value)):
            mounts.append(Mount(Path(value).resolve(), False, name))
    return mounts, writable


def collapse(mounts: list[Mount]) -> list[Mount]:
    """One mount per place: a place inside another mount is dropped unless it must be writable
    inside a read-only one; the same place asked for twice is writable if either asks. Mounts to
    another place in the container are kept as they are."""
    moved = [mount for mount in mounts if mount.target is not None]
    merged: dict[Path, Mount] = {}
    for mount in (mount for mount in mounts if mount.target is None):
        old = merged.get(mount.path)
        merged[mount.path] = mount if old is None else Mount(mount.path, old.writable or mount.writable, old.why)
    kept: list[Mount] = []
    for mount in sorted(merged.values(), key=lambda m: (len(m.path.parts), str(m.path))):
        covering = [k for k in kept if mount.path.is_relative_to(k.path)]
        if covering and (covering[-1].writable or not mount.writable):
            continue
        kept.append(mount)
    return kept + moved


def _in_image(path: Path) -> bool:
    return any(path.is_relative_to(own) for own in IMAGE_PATHS)


def refuse_image_paths(mounts: list[Mount]) -> None:
    for mount in mounts:
        for own in IMAGE_PATHS:
            if Path(own).is_relative_to(mount.inside) or mount.inside.is_relative_to(own):
                raise UserError(mount.why, str(mount.path), f"mounted into the containers at the same path it "
                                f"would hide the image's own {own}; move it elsewhere, or run in-process")


def passed_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items()
            if (name.startswith(PASSED_ENV_PREFIXES) or name in PASSED_ENV_NAMES) and name not in NOT_PASSED}


def gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def plan(cfg: RunConfig, state: Path, artifact_location: Optional[Path], progress: bool,
         gpu: bool) -> ContainerPlan:
    environment = passed_environment()
    environment.update({STATE_ENV: str(state), PROGRESS_ENV: "1" if progress else "0",
                        "TOKENIZERS_PARALLELISM": environment.get("TOKENIZERS_PARALLELISM", "false")})
    mounts, writable = plan_mounts(cfg, state, artifact_location, environment)
    if cfg.model.name_or_path.startswith("package:"):
        environment["PYTHONPATH"] = str(PACKAGES_IN_CONTAINER)
    elif source_kind(cfg.model.name_or_path) == "hub":
        from huggingface_hub import constants

        hub_cache = Path(constants.HF_HUB_CACHE).resolve()
        if hub_cache.is_dir():  # hub models already downloaded here are found there, offline too
            mounts.append(Mount(hub_cache, False, "HF_HUB_CACHE"))
            environment["HF_HUB_CACHE"] = str(hub_cache)
    # Every input is made readable, also one inside a writable mount (a model folder beside the sqlite
    # store): that mount's grant covers only the folder itself, not a 0600 weight file in it.
    readable = [(m.path, True) for m in collapse([m for m in mounts if not m.writable])]
    mounts = collapse(mounts)
    refuse_image_paths(mounts)
    images = {} if gpu else {CUDA_IMAGE: CPU_IMAGE}
    return ContainerPlan(mounts=mounts, writable=writable, readable=readable, environment=environment,
                         images=images, devices=[GPU_DEVICE] if gpu else [])


# ------------------------------------------------------------------------------------------------
# Running the tasks
# ------------------------------------------------------------------------------------------------


ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)(: .*)?$")


def error_line(lines: list[str]) -> str:
    """The last exception line of a traceback, else the last line printed."""
    for line in reversed(lines):
        if ERROR_LINE.match(line.strip()):
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_limit(task: str) -> Optional[tuple[int, str]]:
    """(bytes, as written) of the memory limit the compiled pipeline gives the task's pod
    (pipelines.pipeline.STAGES), or None: its container here gets the same limit, so a stage that a
    cluster would OOM-kill is killed here too."""
    stage = STAGES.get(task)
    match = QUANTITY.match(stage.memory[1]) if stage else None
    return (int(float(match.group(1)) * UNITS[match.group(2)]), stage.memory[1]) if match else None


class TaskRunner:
    """Stands in for kfp.local's run_docker_container for one pipeline run."""

    def __init__(self, images: dict[str, str], lines=None, run_log=None):
        self.images = images
        self.failures: list[StageFailed] = []
        self.lines = lines  # console.StageLines unless verbose: the quiet console
        self.run_log = run_log  # the run's whole log, every line of every task

    def __call__(self, client, image: str, command: list[str], volumes: dict[str, Any], **run_args) -> int:
        task = kfp_local.task_name(command)
        actual = self.images.get(image, image)
        if actual != image:
            log.info("%s: its component names %s; running it in %s (no GPU on this machine)", task, image, actual)
        started = time.monotonic()
        if self.lines is not None:
            self.lines.started(task)
        limit = memory_limit(task)
        if limit is not None:  # no swap beyond it, as a pod has none
            run_args = {**run_args, "mem_limit": limit[0], "memswap_limit": limit[0]}
            log.info("%s: memory limit %s, the pipeline's for this stage", task, limit[1])
        container = client.containers.run(image=actual, command=command, detach=True, volumes=volumes, **run_args)
        tail: collections.deque[str] = collections.deque(maxlen=80)
        partial = ""
        try:
            for chunk in container.logs(stream=True, follow=True):
                text = chunk.decode(errors="replace")
                if self.lines is None:
                    print(redacted(text), end="", flush=True)
                *complete, partial = (partial + text).split("\n")
                for line in complete:
                    self._keep(task, line + "\n")
                tail.extend(complete)
            exit_code = container.wait()["StatusCode"]
            if exit_code == 137 and limit is not None:  # SIGKILL; podman on cgroup v1 does not report OOMKilled
                tail.append(f"killed (SIGKILL), most likely for memory: the stage's limit is {limit[1]} "
                            "(pipelines/pipeline.py STAGES), as on the cluster")
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        if partial:
            self._keep(task, partial + "\n")
        tail.append(partial)
        if self.lines is not None:
            self.lines.finished(task, time.monotonic() - started, exit_code == 0)
        log.info("%s: container exited %d after %.1f s", task, exit_code, time.monotonic() - started)
        if exit_code != 0:
            failure = StageFailed(task, actual, exit_code, error_line(list(tail)))
            self.failures.append(failure)
            if failure.deterministic:
                raise failure  # kfp.local would retry it after its backoff: bad input fails the same way again
        return exit_code

    def first_failure(self) -> StageFailed:
        """The stage that failed first, not the exit handler failing after it for the same reason."""
        return next((failure for failure in self.failures if failure.stage != "finish_run"), self.failures[-1])


    def _keep(self, task: str, line: str) -> None:
        line = redacted(line)
        if self.lines is not None:
            self.lines.line(task, line)
        if self.run_log is not None:
            self.run_log.write(f"{task}| {line}")


@contextlib.contextmanager
def docker_api(podman: containers.Podman, timeout: float = 60.0) -> Iterator[str]:
    """`podman system service` on a socket of its own for as long as the block runs; DOCKER_HOST
    points at it meanwhile."""
    import docker

    folder = Path(tempfile.mkdtemp(prefix="kubetune-podman-"))  # short: a socket path has ~100 bytes
    socket = f"unix://{folder / 'podman.sock'}"
    log_file = open(folder / "service.log", "w")
    # Its own folder as working folder: after an OOM kill it leaves a file `oom` there.
    service = subprocess.Popen(podman.argv("system", "service", "--time=0", socket),
                               stdout=log_file, stderr=subprocess.STDOUT, cwd=folder)
    previous = os.environ.get("DOCKER_HOST")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                docker.DockerClient(base_url=socket, timeout=5).ping()
                break
            except Exception:
                if service.poll() is not None or time.monotonic() > deadline:
                    log_file.flush()
                    reason = (folder / "service.log").read_text().strip().splitlines()[-1:] or ["no output"]
                    raise containers.ContainerError("runner", "container", f"podman's Docker API service did not "
                                                    f"start ({reason[0]}); {containers.IN_PROCESS_HINT}") from None
                time.sleep(0.2)
        os.environ["DOCKER_HOST"] = socket
        yield socket
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
        log_file.close()
        shutil.rmtree(folder, ignore_errors=True)


def docker_run_args(container_plan: ContainerPlan) -> dict[str, Any]:
    import docker

    run_args: dict[str, Any] = {
        "network_mode": "host",  # MLflow and S3 servers on the machine's loopback are reachable
        "ulimits": [docker.types.Ulimit(name=name, soft=limit, hard=limit)
                    for name, limit in containers.ULIMITS.items()],
        "environment": container_plan.environment,
        "mounts": [docker.types.Mount(target=str(m.inside), source=str(m.path), type="bind", read_only=not m.writable)
                   for m in container_plan.mounts],
    }
    if container_plan.devices:
        run_args["devices"] = container_plan.devices
    return run_args


def ready(images: tuple[str, ...] = (CPU_IMAGE, CUDA_IMAGE)) -> tuple[containers.Podman, bool]:
    """podman runs here and the images the run needs hold this kubetune; before any stage starts."""
    podman = containers.find_podman("kubetune run --runner container")
    gpu = gpu_present()
    for image in images:
        if image == CUDA_IMAGE and not gpu:
            continue  # its stages run in the CPU image here
        containers.check_image(podman, image, "image")
    return podman, gpu


def artifact_folder(tracking_uri: str, experiment: str) -> Optional[Path]:
    """The experiment's artifact folder when it is on this machine (created now as a stage would)."""
    experiment_id = tracking.experiment_id(tracking_uri, experiment)
    location = tracking.client(tracking_uri).get_experiment(experiment_id).artifact_location
    path = tracking.local_path(location)
    return path.resolve() if path is not None else None


def run(cfg: RunConfig, podman: containers.Podman, gpu: bool, state: Path, progress: bool,
        pipeline_root: Path, workspace_root: Path, resume: str = "", lines=None, run_log=None,
        when_data_changes: bool = False) -> None:
    """Run the DAG in containers. lines: the quiet console (console.StageLines), None to print every
    line; run_log: where every line is kept."""
    from kfp import local

    container_plan = plan(cfg, state, artifact_folder(cfg.tracking.mlflow_uri, cfg.tracking.experiment),
                          progress, gpu)
    for path in (pipeline_root, workspace_root):
        path.mkdir(parents=True, exist_ok=True)
    uid = podman.host_uid_of(containers.IMAGE_USER_UID)
    # Reads first: a read grant on an input above a writable place would take its write access back.
    failed = containers.grant(container_plan.readable, uid, write=False)
    containers.grant([*container_plan.writable, (pipeline_root, True), (workspace_root, True)], uid, write=True)
    for key, value, _ in (place for place in locations(cfg) if failed and place[2] == INPUT):
        blocked = None if _is_remote(value) or not Path(value).exists() else containers.unreadable(Path(value), uid)
        if blocked is not None:  # before any stage starts, not as a FileNotFoundError in prepare_model
            raise UserError(key, value, f"the containers' user (host uid {uid}) cannot read {blocked}, and it could "
                            f"not be given an ACL ({failed[0]}); chmod a+r {blocked} (a folder: a+rx), or run "
                            "in-process (without --runner container)")
    for mount in container_plan.mounts:
        log.info("mounted in every container: %s%s (%s, for %s)", mount.path,
                 f" at {mount.target}" if mount.target else "", "read-write" if mount.writable else "read-only",
                 mount.why)
    runner = TaskRunner(container_plan.images, lines, run_log)
    with docker_api(podman), kfp_local.docker_tasks(runner):
        local.init(runner=local.DockerRunner(**docker_run_args(container_plan)), pipeline_root=str(pipeline_root),
                   workspace_root=str(workspace_root), raise_on_error=True)
        try:
            kubetune_pipeline(config_json=json.dumps(cfg.to_dict()), resume_run_id=resume,
                              when_data_changes=when_data_changes)
        except RuntimeError:
            if runner.failures:
                raise runner.first_failure() from None
            raise
