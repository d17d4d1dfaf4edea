"""Build kubetune's images on a machine with no Docker engine and no registry: `make images-local`.

    python3 docker/build_local.py [--flavor cpu] [--flavor cuda] [--log-dir DIR]

The same Dockerfiles that `make images` builds with buildx for a cluster, built here by podman:
1. the tools (podman, runc, debootstrap, and acl for `kubetune run --runner container`) are
   installed with apt-get when missing;
2. the Python base image is made from Debian packages with debootstrap (no registry to pull
   python:3.11-slim from) and imported once; later calls reuse it;
3. each image is built with the machine's own pip settings, read from `pip config list`: its CA
   bundle (PyPI may be reached through a TLS-inspecting proxy) and the folder holding the CPU torch
   wheel, both mounted into the build only, never written into the repository or the image;
4. each image is checked by running it: the kubetune inside is this checkout's (version and source
   digest), it runs as uid 1000, and torch, bitsandbytes and peft import (the CUDA image: torch
   reports its CUDA version). An image that fails its check is untagged.

An image whose inputs (Dockerfile, build context, arguments, base image) are those it was built
from is left as it is; otherwise podman reuses every layer whose own inputs did not change, so a
call after a code change rebuilds only the small kubetune layer. Stdlib only: it runs before any
virtualenv exists.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kubetune import __version__  # noqa: E402
from kubetune.containers import ContainerError, Podman, check_image, find_podman, source_digest  # noqa: E402
from kubetune.images import CPU_IMAGE, CUDA_IMAGE  # noqa: E402

# command -> the Debian package that has it
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "setfacl": "acl"}
# Bookworm's Python is 3.11, the version requirements.lock was frozen on and the CPU torch wheel is for.
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_MOUNT = "/kubetune-build"  # where the host's CA bundle and wheel folder appear during a build only
IMAGES = {"cpu": CPU_IMAGE, "cuda": CUDA_IMAGE}
CHECKS = {
    "cpu": "import torch, bitsandbytes, peft; print('torch', torch.__version__, '| bitsandbytes', "
           "bitsandbytes.__version__, '| peft', peft.__version__)",
    "cuda": "import torch, bitsandbytes; assert torch.version.cuda, 'not a CUDA build of torch'; "
            "print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| bitsandbytes', "
            "bitsandbytes.__version__, '| GPU visible:', torch.cuda.is_available())",
}


def say(message: str) -> None:
    print(f"images-local: {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------


def ensure_tools() -> None:
    missing = sorted({package for command, package in TOOLS.items() if shutil.which(command) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ContainerError("tools", missing, "these Debian packages are missing and cannot be installed here "
                             f"(needs apt-get as root): install them (`apt-get install -y {' '.join(missing)}`), "
                             "or run in-process: kubetune run")
    say(f"installing {', '.join(missing)} with apt-get (about a minute)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(args, env=env, text=True, capture_output=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ContainerError("tools", missing, f"`{' '.join(args)}` failed ({tail[0]}); install them by hand, "
                                 "or run in-process: kubetune run")


# ------------------------------------------------------------------------------------------------
# The machine's pip settings
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipSettings:
    cert: Optional[Path]  # CA bundle pip verifies PyPI with
    torch_wheels: Optional[Path]  # a folder holding the lock's torch as a CPU wheel for this Python


def read_pip_config(listing: str) -> dict[str, list[str]]:
    """`pip config list` -> key -> values, environment settings first (they win in pip too)."""
    found: dict[str, list[tuple[int, str]]] = {}
    for line in listing.splitlines():
        match = re.match(r"^(:env:|[\w-]+)\.([\w-]+)=(.*)$", line.strip())
        if not match:
            continue
        scope, key, raw = match.groups()
        value = raw.strip().strip("'\"")
        found.setdefault(key, []).append((0 if scope == ":env:" else 1, value))
    return {key: [value for _, value in sorted(values, key=lambda item: item[0])] for key, values in found.items()}


def pip_settings(torch_pin: str, python_tag: str = "cp311") -> PipSettings:
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], text=True, capture_output=True)
    config = read_pip_config(done.stdout if done.returncode == 0 else "")
    cert = next((Path(value) for value in config.get("cert", []) if Path(value).is_file()), None)
    folders = [Path(part) for value in config.get("find-links", []) for part in value.split()
               if "://" not in part or part.startswith("file://")]
    version = torch_pin.split("==", 1)[1]
    wheel = f"torch-{version}+cpu-{python_tag}-{python_tag}-*.whl"
    torch_wheels = next((folder for folder in folders
                         if folder.is_dir() and any(folder.glob(wheel))), None)
    return PipSettings(cert=cert, torch_wheels=torch_wheels)


def lock_pin(name: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.strip()
    raise SystemExit(f"images-local: requirements.lock pins no {name}")


# ------------------------------------------------------------------------------------------------
# The base image from Debian packages
# ------------------------------------------------------------------------------------------------


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt already uses (it is the one that answers here)."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in re.findall(r"^(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, flags=re.M):
            if "security" not in uri and "debian" in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def base_tag() -> str:
    return f"localhost/kubetune-python-base:{SUITE}"


def base_recipe() -> str:
    return hashlib.sha256(f"{SUITE} {' '.join(BASE_PACKAGES)} minbase".encode()).hexdigest()[:12]


def ensure_base(podman: Podman) -> tuple[str, float, bool]:
    """The base image's tag, the seconds it took and whether it was reused."""
    tag = base_tag()
    label = podman.run("image", "inspect", "--format", '{{index .Labels "io.kubetune.base-recipe"}}', tag,
                       check=False)
    if label.returncode == 0 and label.stdout.strip() == base_recipe():
        return tag, 0.0, True
    if os.geteuid() != 0:
        raise ContainerError("base image", tag, "debootstrap needs root to make the Python base image; run "
                             "`make images-local` as root once, or pass an existing Python 3.11 image")
    started = time.monotonic()
    mirror = apt_mirror()
    say(f"making {tag} from Debian {SUITE} packages ({mirror}; about 1.5 minutes, once)")
    work = Path(tempfile.mkdtemp(prefix="kubetune-rootfs-", dir="/var/tmp"))
    try:
        rootfs = work / "rootfs"
        done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                               SUITE, str(rootfs), mirror], text=True, capture_output=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise ContainerError("base image", tag, f"debootstrap failed:\n{tail}")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(podman.argv("import", "--change", 'CMD ["python3"]',
                                              "--change", f"LABEL io.kubetune.base-recipe={base_recipe()}",
                                              "-", tag), stdin=tar.stdout, text=True, capture_output=True)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise ContainerError("base image", tag, f"podman import failed: {imported.stderr.strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tag, time.monotonic() - started, False


# ------------------------------------------------------------------------------------------------
# kubetune's images
# ------------------------------------------------------------------------------------------------


def build_args(flavor: str, base: str, pip: PipSettings) -> list[str]:
    args = ["--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", f"KUBETUNE_VERSION={__version__}"]
    if pip.cert:
        args += ["-v", f"{pip.cert}:{BUILD_MOUNT}/ca-bundle.crt:ro", "--build-arg", f"PIP_CERT={BUILD_MOUNT}/ca-bundle.crt"]
    if flavor == "cpu" and pip.torch_wheels:
        args += ["-v", f"{pip.torch_wheels}:{BUILD_MOUNT}/wheels:ro", "--build-arg", f"TORCH_FIND_LINKS={BUILD_MOUNT}/wheels"]
    return args


INPUTS_LABEL = "io.kubetune.build-inputs"


def context_files(ignorefile: Path) -> list[Path]:
    """The files a build's context holds, read from its allowlist .dockerignore ("*", then "!path"
    lines; "**/name" lines drop matching names anywhere)."""
    lines = [line.strip() for line in ignorefile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    dropped = [line[3:] for line in lines if line.startswith("**/")]
    files = []
    for entry in (line[1:] for line in lines if line.startswith("!")):
        path = ROOT / entry
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            parts = file.relative_to(ROOT).parts
            if file.is_file() and not any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in dropped):
                files.append(file)
    return files


def inputs_digest(dockerfile: Path, args: list[str], base_id: str) -> str:
    """Everything a build reads: the Dockerfile, its context, its arguments and the base image."""
    digest = hashlib.sha256()
    for file in [dockerfile, *context_files(Path(str(dockerfile) + ".dockerignore"))]:
        digest.update(f"{file.relative_to(ROOT)}\0".encode() + file.read_bytes())
    digest.update("\0".join([*args, base_id]).encode())
    return digest.hexdigest()[:16]


def build(podman: Podman, flavor: str, base: str, pip: PipSettings, log_dir: Path) -> dict:
    tag = IMAGES[flavor]
    dockerfile = ROOT / "docker" / f"{flavor}.Dockerfile"
    log_path = log_dir / f"{flavor}.log"
    before = podman.image_id(tag)
    args = build_args(flavor, base, pip)
    inputs = inputs_digest(dockerfile, args, podman.image_id(base) or "")
    label = podman.run("image", "inspect", "--format", f'{{{{index .Labels "{INPUTS_LABEL}"}}}}', tag, check=False)
    if before is not None and label.stdout.strip() == inputs:  # nothing it reads has changed: nothing to do
        return {"flavor": flavor, "tag": tag, "seconds": 0.0, "reused": True, "size": podman.image_size(tag),
                "id": before}
    command = podman.argv("build", "--layers", "--network", "host", *podman.ulimit_args(),
                          "--ignorefile", str(dockerfile) + ".dockerignore", "--file", str(dockerfile),
                          *args, "--build-arg", f"KUBETUNE_BUILD_INPUTS={inputs}",
                          "--label", f"{INPUTS_LABEL}={inputs}", "--tag", tag, str(ROOT))
    say(f"building {tag} (log: {log_path})")
    started = time.monotonic()
    with open(log_path, "w", buffering=1) as log_file:  # line by line: the log can be followed
        log_file.write("$ " + shlex.join(command) + "\n")
        log_file.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log_file.write(line)
            if re.match(r"^(\[\d+/\d+\] )?STEP \d+/\d+: ", line):  # one line per Dockerfile step
                print(f"  {line.rstrip()[:150]}", flush=True)
        returncode = process.wait()
    seconds = time.monotonic() - started
    if returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise SystemExit(f"{tail}\nimages-local: building {tag} failed (exit {returncode}) after {seconds:.0f} s; "
                         f"the whole log is {log_path}; {tag} was not retagged")
    image_id = podman.image_id(tag)
    return {"flavor": flavor, "tag": tag, "seconds": seconds, "reused": image_id == before,
            "size": podman.image_size(tag), "id": image_id}


def checkout_digest() -> str:
    return source_digest({"kubetune": ROOT / "src" / "kubetune", "kubetune.components": ROOT / "components",
                          "kubetune.pipelines": ROOT / "pipelines"})


def check(podman: Podman, flavor: str, tag: str, here: str) -> str:
    """Run the image as a stage would; remove it if it is not what it should be. `here` is the
    source digest of the checkout when its build started."""
    try:
        check_image(podman, tag, source=here)
        return podman.in_image(tag, "python", "-c", CHECKS[flavor]).strip().splitlines()[-1]
    except (ContainerError, subprocess.CalledProcessError) as exc:
        podman.run("rmi", tag, check=False)
        detail = getattr(exc, "stderr", None) or str(exc)
        raise SystemExit(f"images-local: {tag} failed its check and was removed: {detail.strip()[-2000:]}")


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", action="append", choices=sorted(IMAGES), help="cpu and/or cuda (default: both)")
    parser.add_argument("--log-dir", default=str(ROOT / ".kubetune" / "images"), help="where the build logs go")
    args = parser.parse_args(argv)
    flavors = args.flavor or ["cpu", "cuda"]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        ensure_tools()
        podman = find_podman("make images-local")
        base, base_seconds, base_reused = ensure_base(podman)
    except ContainerError as exc:
        print(f"images-local: error: {exc}", file=sys.stderr)
        return exc.exit_code
    pip = pip_settings(lock_pin("torch"))
    say(f"pip settings of this machine: CA bundle {pip.cert or '(pip default)'}, CPU torch wheel from "
        f"{pip.torch_wheels or 'the PyTorch CPU index'}")
    rows = [(base, podman.image_size(base), base_seconds, base_reused, f"Debian {SUITE}, " + ", ".join(BASE_PACKAGES))]
    for flavor in flavors:
        before = checkout_digest()
        built = build(podman, flavor, base, pip, log_dir)
        rows.append((built["tag"], built["size"], built["seconds"], built["reused"],
                     check(podman, flavor, built["tag"], before)))
        if checkout_digest() != before:
            say(f"the checkout changed while {built['tag']} was built: it holds the code from when its build "
                "started; run again to bring it up to date")
    print()
    print(f"{'image':<46} {'size':>8} {'build':>14}  checked inside")
    for tag, size, seconds, reused, note in rows:
        took = "up to date" if reused and seconds == 0 else f"{seconds:.0f} s" + (" (cached)" if reused else "")
        print(f"{tag:<46} {human(size):>8} {took:>14}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
