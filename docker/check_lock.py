"""Fail an image build whose Python environment strays from its lock files.

    python check_lock.py requirements.lock [docker/cuda.lock] --kubetune-version 0.1.0

Every installed distribution must be pinned in one of the lock files at exactly the installed
version (a local tag such as torch 2.13.0+cpu counts as the lock's 2.13.0), except kubetune itself,
which must be at --kubetune-version (the image tag, kubetune.__version__), and pip, setuptools and
wheel, which `make lock` leaves out of the lock on purpose. Stdlib only: it runs in the image.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

NOT_LOCKED = ("pip", "setuptools", "wheel")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise SystemExit(f"requirements.lock: not a name==version pin: {raw!r}")
        pins[_normalize(match.group(1))] = match.group(2)
    return pins


def problems(installed: dict[str, str], pins: dict[str, str], kubetune_version: str) -> list[str]:
    """What is wrong with `installed` (name -> version) against the lock `pins`; empty when all is well."""
    found = []
    installed = {_normalize(name): version for name, version in installed.items()}
    if installed.get("kubetune") != kubetune_version:
        found.append(f"kubetune {installed.get('kubetune', 'is not installed')}, expected {kubetune_version}")
    for name, version in sorted(installed.items()):
        if name == "kubetune" or name in NOT_LOCKED:
            continue
        public = version.split("+", 1)[0]
        if name in pins:
            if public != pins[name]:
                found.append(f"{name} {version} is installed, the lock pins {pins[name]}")
        else:
            found.append(f"{name} {version} is installed but not pinned in the lock")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("locks", type=Path, nargs="+", metavar="LOCK")
    parser.add_argument("--kubetune-version", required=True)
    args = parser.parse_args(argv)
    pins = {}
    for lock in args.locks:
        pins.update(read_lock(lock.read_text()))
    installed = {dist.metadata["Name"]: dist.version for dist in md.distributions()}
    found = problems(installed, pins, args.kubetune_version)
    names = " + ".join(lock.name for lock in args.locks)
    if found:
        print(f"the image's environment does not match {names}:", *found, sep="\n  ", file=sys.stderr)
        return 1
    print(f"{len(installed)} distributions match {names} (kubetune {args.kubetune_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
