"""Print the requirements of a wheel (its Requires-Dist), one per line, for `pip install -r`.

The image builds install third-party dependencies from this list (pinned by requirements.lock as
constraints) in a layer of their own: the list changes only when pyproject.toml's dependencies do,
so a code change rebuilds only the small layer that installs the kubetune wheel itself.

    python wheel_requirements.py dist/kubetune-0.1.0-py3-none-any.whl [--extra server ...]

Requirements of extras not asked for are left out; those of extras asked for lose their
`extra == "..."` marker (pip rejects extra markers in a requirements file). Stdlib only: it runs
in a bare python image.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

_EXTRA = re.compile(r"""^\s*extra\s*==\s*['"]([^'"]+)['"]\s*$""")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(metadata: str, extras: tuple[str, ...] = ()) -> list[str]:
    """Requires-Dist lines of a METADATA text for the base install plus `extras`."""
    wanted = {_normalize(extra) for extra in extras}
    message = Parser().parsestr(metadata)
    missing = wanted - {_normalize(extra) for extra in message.get_all("Provides-Extra") or []}
    if missing:
        raise SystemExit(f"the wheel has no extra {sorted(missing)}: declare it in pyproject.toml")
    lines = []
    for raw in message.get_all("Requires-Dist") or []:
        spec, _, marker = raw.partition(";")
        marker = marker.strip()
        if not marker:
            lines.append(spec.strip())
            continue
        match = _EXTRA.match(marker)
        if match:
            if _normalize(match.group(1)) in wanted:
                lines.append(spec.strip())
            continue
        if "extra" in marker:  # an extra combined with another marker: not something we write
            raise SystemExit(f"cannot translate the marker of {raw!r}; simplify it in pyproject.toml")
        lines.append(f"{spec.strip()} ; {marker}")
    return lines


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise SystemExit(f"{wheel}: expected one *.dist-info/METADATA, found {names}")
        return archive.read(names[0]).decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="also the requirements of this extra")
    args = parser.parse_args(argv)
    for line in requirements(wheel_metadata(args.wheel), tuple(args.extra)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
