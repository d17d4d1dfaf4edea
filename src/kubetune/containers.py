"""Podman on one machine: the engine that builds kubetune's images and runs the pipeline's tasks in
them when there is no Docker engine (`make images-local`, `kubetune run --runner container`).

Measured on these 2-core Debian machines (../shared/CONTAINERS.md): podman's default runtime (crun)
fails with "cgroups in hybrid mode not supported", so the runc runtime is named explicitly; podman
asks for more open files than the machine allows unless each container gets explicit ulimits.
Both are applied here, once, for every podman call kubetune makes.

Stdlib only at import: docker/build_local.py runs it with the system Python, before any venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from kubetune import __version__
from kubetune.errors import UserError

RUNTIME_ENV = "KUBETUNE_CONTAINER_RUNTIME"  # an OCI runtime name or path; default: runc where installed
ULIMITS = {"nofile": 4096, "nproc": 4096}  # soft = hard
IMAGE_USER_UID = 1000  # the numeric USER of both Dockerfiles
IN_PROCESS_HINT = "or run in-process instead: kubetune run (without --runner container)"


class ContainerError(UserError):
    """Containers cannot run here, or an image is missing or holds other code."""


@dataclass(frozen=True)
class Podman:
    executable: str
    runtime: Optional[str]

    def argv(self, *args: str) -> list[str]:
        return [self.executable, *(["--runtime", self.runtime] if self.runtime else []), *args]

    def ulimit_args(self) -> list[str]:
        return [arg for name, limit in ULIMITS.items() for arg in ("--ulimit", f"{name}={limit}:{limit}")]

    def run(self, *args: str, check: bool = True, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), check=check, text=True, timeout=timeout, capture_output=True)

    def image_id(self, tag: str) -> Optional[str]:
        """The image's id, or None when no image has that tag here."""
        done = self.run("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        return done.stdout.strip() or None if done.returncode == 0 else None

    def image_size(self, tag: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def in_image(self, tag: str, *command: str) -> str:
        """Run one short command in a throwaway container of `tag`; return its stdout."""
        done = self.run("run", "--rm", "--network", "host", *self.ulimit_args(), tag, *command, check=False)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
        return done.stdout

    def host_uid_of(self, container_uid: int) -> int:
        """The host uid a container uid writes files as: itself under rootful podman, a subordinate
        uid under rootless podman (read from podman's user-namespace mapping)."""
        if os.geteuid() == 0:
            return container_uid
        info = json.loads(self.run("info", "--format", "json").stdout)
        for entry in info.get("host", {}).get("idMappings", {}).get("uidmap") or []:
            start, size = entry["container_id"], entry["size"]
            if start <= container_uid < start + size:
                return entry["host_id"] + container_uid - start
        return container_uid


def find_podman(purpose: str) -> Podman:
    """podman and a runtime that works here, or one ContainerError saying what is missing."""
    executable = shutil.which("podman")
    if executable is None:
        raise ContainerError("runner", "container", f"{purpose} needs podman, which is not installed: "
                             f"`make images-local` installs it (apt-get, as root), {IN_PROCESS_HINT}")
    runtime = os.environ.get(RUNTIME_ENV) or ("runc" if shutil.which("runc") else None)
    podman = Podman(executable, runtime)
    try:
        podman.run("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise ContainerError("runner", "container", f"podman cannot run here ({reason[0]}); "
                             f"{IN_PROCESS_HINT}") from None
    except subprocess.TimeoutExpired:
        raise ContainerError("runner", "container", f"`podman info` did not answer in 60 s; {IN_PROCESS_HINT}") from None
    return podman


SOURCE_PACKAGES = ("kubetune", "kubetune.components", "kubetune.pipelines")


def source_digest(roots: Optional[dict[str, Path]] = None) -> str:
    """A digest of the kubetune code (library, components, pipeline): the same in an image and on the
    host exactly when both hold the same code, whatever the version says. The components and the
    pipeline sit beside the library in a checkout and inside it in a wheel, so each package is hashed
    under its own name. `roots` maps those package names to folders (a checkout without a venv);
    by default they are found where this interpreter imports them from."""
    import importlib.util

    if roots is None:
        roots = {name: Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))
                 for name in SOURCE_PACKAGES}
    nested = {name.rsplit(".", 1)[1] for name in SOURCE_PACKAGES[1:]}
    digest = hashlib.sha256()
    for name in SOURCE_PACKAGES:
        root = roots[name]
        files = [path for path in root.rglob("*.py")
                 if name != "kubetune" or path.relative_to(root).parts[0] not in nested]
        for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


IMAGE_REPORT = ("import json, os, kubetune, kubetune.containers as c; "
                "print(json.dumps({'version': kubetune.__version__, 'source': c.source_digest(), 'uid': os.getuid()}))")


def image_report(podman: Podman, tag: str) -> dict:
    """What kubetune an image holds and as whom it runs, read by starting it once (about 2 s)."""
    return json.loads(podman.in_image(tag, "python", "-c", IMAGE_REPORT).strip().splitlines()[-1])


def check_image(podman: Podman, tag: str, field: str = "image", source: Optional[str] = None) -> dict:
    """Refuse an image that is missing, holds another kubetune than this one (`source`: the expected
    source digest, by default this installation's) or runs as another user than the one kubetune
    gives access to its files."""
    source = source or source_digest()

    if podman.image_id(tag) is None:
        raise ContainerError(field, tag, "no such image here: build it with `make images-local` "
                             f"(a checkout of kubetune {__version__}), {IN_PROCESS_HINT}")
    try:
        report = image_report(podman, tag)
    except (subprocess.CalledProcessError, ValueError) as exc:
        reason = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines()[-1:] or ["no output"]
        raise ContainerError(field, tag, f"the image does not say which kubetune it holds ({reason[0]}): rebuild "
                             "it with `make images-local` from this checkout") from None
    if report["version"] != __version__:
        raise ContainerError(field, tag, f"the image holds kubetune {report['version']}, this is {__version__}: "
                             "rebuild it with `make images-local` from this checkout")
    if report["source"] != source:
        raise ContainerError(field, tag, f"the image holds other kubetune {__version__} code than this "
                             f"installation (source digest {report['source']} vs {source}): rebuild "
                             "it with `make images-local` (only the small kubetune layer is rebuilt)")
    if report["uid"] != IMAGE_USER_UID:
        raise ContainerError(field, tag, f"the image runs as uid {report['uid']}; kubetune's images run as uid "
                             f"{IMAGE_USER_UID}, the user it gives access to the run's files: rebuild it from docker/")
    return report


def unreadable(place: Path, uid: int) -> Optional[Path]:
    """The first file or folder at or below `place` that `uid` may not read (a folder: not list and
    enter) by its permission bits, as owner or as others; None when it may read them all. For where
    an ACL could not be set: the group's members are not known here, and no ACL is read."""
    for path in [place, *sorted(place.rglob("*"))] if place.is_dir() else [place]:
        info = path.lstat()
        if path.is_symlink():
            continue  # its target is checked where it lies
        need = 0o5 if path.is_dir() else 0o4
        if (info.st_mode & need) != need and not (info.st_uid == uid and (info.st_mode >> 6) & need == need):
            return path
    return None


def grant(places: Sequence[tuple[Path, bool]], uid: int, write: bool) -> list[str]:
    """Let `uid` (the image's user as the host sees it) read, or also write, each place (and, where
    asked, everything below it and made in it later) without changing any file's owner or the
    permissions of its owner, group and others: POSIX ACLs (`ls -l` shows the ACL mask as the group
    bits). Write grants must succeed; read grants are best effort (a file that others may
    read needs none), and what failed is returned."""
    setfacl = shutil.which("setfacl")
    if setfacl is None:
        raise ContainerError("runner", "container", "setfacl is not installed (Debian: apt-get install acl); "
                             "it lets the image's user read and write the run's files; " + IN_PROCESS_HINT)
    failed = []
    spec = f"u:{uid}:{'rwX' if write else 'rX'}"
    for path, recursive in places:
        args = [setfacl, *(["-R"] if recursive else []), "-m", spec,
                *(["-m", f"d:{spec}"] if path.is_dir() else []), str(path)]
        done = subprocess.run(args, text=True, capture_output=True)
        if done.returncode != 0:
            if write:
                raise ContainerError("runner", "container", f"cannot give the image's user (host uid {uid}) write "
                                     f"access to {path}: {done.stderr.strip()}; {IN_PROCESS_HINT}")
            failed.append(f"{path}: {done.stderr.strip()}")
    return failed
