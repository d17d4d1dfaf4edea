"""The layering of docs/ARCHITECTURE.md, checked on the source: imports point one way, with no cycle
(function-local imports counted), internal imports sit at module top, no module outgrows a page,
and each outside library with a seam is imported behind it alone: mlflow in kubetune.tracking,
boto3 in kubetune.storage, kubernetes in kubetune.trainjob, kfp.local's private modules in kubetune.launch.kfp_local (that one in
tests/unit/test_kfp_local_seam.py).

Read from the files with `ast`, so nothing is imported and the check takes milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"kubetune": ROOT / "src" / "kubetune", "kubetune.components": ROOT / "components",
           "kubetune.pipelines": ROOT / "pipelines", "kubetune_serving": ROOT / "src" / "kubetune_serving"}
#: Top-level packages whose imports are followed.
OURS = ("kubetune", "kubetune_serving")

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS = [
    # What a registered version runs where kubetune is not installed: it imports no kubetune module.
    ("serving", ["kubetune_serving*"]),
    ("foundation", ["kubetune", "kubetune.errors", "kubetune.faults", "kubetune.paths", "kubetune.strict", "kubetune.overrides", "kubetune.config_fields", "kubetune.config_outputs", "kubetune.config", "kubetune.config_reference",
                    "kubetune.images"]),
    ("I/O", ["kubetune.storage", "kubetune.trainjob", "kubetune.build_cache", "kubetune.tracking*", "kubetune.model_source", "kubetune.shards", "kubetune.sources", "kubetune.disk_shuffle",
             "kubetune.artifacts", "kubetune.console", "kubetune.containers", "kubetune.services"]),
    ("tasks", ["kubetune.tasks*", "kubetune.run_config", "kubetune.run_form"]),
    ("data and tokens", ["kubetune.data", "kubetune.tokenization", "kubetune.retrieval"]),
    ("model", ["kubetune.modeling"]),
    ("scoring, evaluation, training", ["kubetune.headline", "kubetune.scoring", "kubetune.evaluation", "kubetune.training", "kubetune.report", "kubetune.best_checkpoint",
                                       "kubetune.distributed", "kubetune.sharding"]),
    ("preflight, registry and export", ["kubetune.preflight", "kubetune.registry", "kubetune.export", "kubetune.notify",
                                        "kubetune.nodes"]),
    ("stages", ["kubetune.stages", "kubetune.train_worker", "kubetune.train_node"]),
    ("KFP", ["kubetune.components*", "kubetune.pipelines*"]),
    ("launch", ["kubetune.launch*"]),
    ("command line", ["kubetune.cli"]),
]
MAX_LINES = 450
# Function-local imports of kubetune modules that are there on purpose:
# - a KFP lightweight component ships only its function body, so the body imports the library;
# - the command line imports the KFP layer per command (importing the pipeline builds the DAG, ~1.5 s).
LOCAL_IMPORTS_ALLOWED = {"kubetune.components*": {"kubetune.stages"},
                         "kubetune.cli": {"kubetune.launch*", "kubetune.pipelines*"}}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return name == pattern[:-1] or name.startswith(pattern[:-1] + ".")
    return name == pattern


def _layer(name: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(_matches(name, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{name} is in no layer of tests/unit/test_architecture.py: add it where it belongs")


def _target(name: str) -> str:
    """The module an imported name lives in: `kubetune.tasks.base` for `from kubetune.tasks.base
    import X`, `kubetune.artifacts` for `from kubetune import artifacts`."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path, module: str) -> list[tuple[str, bool, int]]:
    """(imported kubetune module, imported inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in child.names]
            else:
                visit(child, nested)
                continue
            for name in names:
                if name.split(".")[0] in OURS:
                    out.append((_target(name), in_function, child.lineno))
    visit(tree, False)
    return out


GRAPH = {module: _imports(path, module) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    for target, _, line in GRAPH[module]:
        assert _layer(target) <= _layer(module), (
            f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} ({LAYERS[_layer(target)][0]}), a layer above "
            f"{module} ({LAYERS[_layer(module)][0]})")


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = walk(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return []

    for module in sorted(edges):
        if module not in state:
            cycle = walk(module)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_counting_function_local_imports():
    edges = {module: {target for target, _, _ in GRAPH[module] if target != module} for module in MODULES}
    cycle = find_cycle(edges)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_internal_imports_sit_at_module_top(module):
    allowed = next((targets for pattern, targets in LOCAL_IMPORTS_ALLOWED.items() if _matches(module, pattern)), set())
    for target, in_function, line in GRAPH[module]:
        if in_function:
            assert any(_matches(target, pattern) for pattern in allowed), (
                f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} inside a function; import it at the "
                "top (only heavy third-party packages are imported late)")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_outgrows_a_page(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines; split it by job"


def _third_party_imports(path: Path) -> set[str]:
    """The top-level packages a module imports, function-local imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_only_storage_imports_boto3():
    """S3 behind one module: its retries, its error messages naming the config field, its ETag pins."""
    importers = sorted(name for name, path in MODULES.items()
                       if {"boto3", "botocore"} & _third_party_imports(path) and name != "kubetune.storage")
    assert not importers, f"{importers} import boto3/botocore; go through kubetune.storage"


def test_only_trainjob_imports_kubernetes():
    importers = sorted(name for name, path in MODULES.items()
                       if "kubernetes" in _third_party_imports(path) and name != "kubetune.trainjob")
    assert not importers, f"{importers} import kubernetes; go through kubetune.trainjob"


def test_only_tracking_imports_mlflow():
    """MLflow behind one package (runs in kubetune.tracking, models in kubetune.tracking.models); the
    serving package's mlflow_model.py is the file MLflow itself executes to load a version."""
    importers = sorted(name for name, path in MODULES.items() if "mlflow" in _third_party_imports(path)
                       and not _matches(name, "kubetune.tracking*") and name != "kubetune_serving.mlflow_model")
    assert not importers, f"{importers} import mlflow; go through kubetune.tracking"


def test_a_run_config_is_built_whole_only_through_run_config():
    """RunConfig.from_dict and read_config check the sections only; kubetune.run_config adds the task
    kind's rules, so every other module builds its config there."""
    builders = []
    for name, path in MODULES.items():
        if name in ("kubetune.config", "kubetune.run_config"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if (isinstance(called, ast.Attribute) and called.attr == "from_dict" and isinstance(called.value, ast.Name)
                    and called.value.id == "RunConfig") or (isinstance(called, ast.Name) and called.id == "read_config"):
                builders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not builders, f"{builders} build a RunConfig without its task kind's rules; use kubetune.run_config"
