"""`kubetune export`: a version registered by the stages (tiny Llama, 8-bit base, LoRA) merged
into its base, loaded back with plain transformers, and registered with MLflow's transformers
flavor; against a real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubetune import tracking
from kubetune.cli import main
from kubetune.config import LoraSettings, ModelConfig
from kubetune.errors import ConfigError, ModelError
from kubetune.export import export, model_uri
from kubetune.modeling import load_tuned
from tiny import run_stages, tiny_run_config


@pytest.fixture(scope="module")
def registered(tiny_model_dir, quotes_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = tiny_run_config(tiny_model_dir, quotes_file, tracking={"mlflow_uri": uri, "experiment": "export-test"},
                             storage={"uri": str(root / "storage")}, register={"model_name": "tiny-export"})
    out = run_stages(config, root / "artifacts", through="register")
    return {"uri": uri, "root": root, "tuned": Path(out["tuned"].path), "model_dir": tiny_model_dir}


def test_references_become_model_uris():
    assert model_uri("quotes-lora/3") == "models:/quotes-lora/3"
    assert model_uri("quotes-lora@champion") == "models:/quotes-lora@champion"
    assert model_uri("0123456789abcdef0123456789abcdef") == "runs:/0123456789abcdef0123456789abcdef/model"
    assert model_uri("models:/x/1") == "models:/x/1"
    with pytest.raises(ConfigError, match="--model = 'quotes-lora'"):
        model_uri("quotes-lora")


def test_merged_model_loads_with_plain_transformers_and_equals_the_adapter(registered, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = export(registered["uri"], "tiny-export/1", tmp_path / "merged")
    files = {p.name for p in done.path.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    assert not any(name.startswith("adapter") for name in files)  # merged, not an adapter
    assert json.loads((done.path / "kubetune_export.json").read_text())["source"] == "models:/tiny-export/1"
    merged = AutoModelForCausalLM.from_pretrained(done.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(done.path)
    # The adapter on the same base at full precision: the merge must give the same function.
    cfg = ModelConfig(name_or_path=str(registered["model_dir"]), quantization="none", lora=LoraSettings())
    adapter = load_tuned(registered["model_dir"], registered["tuned"], cfg).eval()
    ids = torch.tensor([tokenizer("The only way to do great work")["input_ids"]])
    with torch.no_grad():
        expected, actual = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(expected, actual, atol=1e-4), (expected - actual).abs().max()
    base = AutoModelForCausalLM.from_pretrained(registered["model_dir"]).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, actual, atol=1e-3)  # the update is in there
    # All parents clean: the work folder beside the target is gone.
    assert [p.name for p in done.path.parent.iterdir()] == ["merged"]


def test_export_refuses_a_non_empty_folder_and_an_unknown_version_and_writes_nothing(registered, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code = main(["export", "--model", "tiny-export/1", "--out", str(taken), "--tracking-uri", registered["uri"]])
    assert code == 2
    assert "--out" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(ModelError, match="--model = 'tiny-export/99'"):
        export(registered["uri"], "tiny-export/99", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_registered_export_loads_without_kubetune(registered, tmp_path):
    done = export(registered["uri"], "tiny-export@champion", tmp_path / "merged", register_as="tiny-export-merged")
    assert done.registered == "tiny-export-merged/1"
    version = tracking.client(registered["uri"]).get_model_version("tiny-export-merged", "1")
    assert version.run_id
    # A process in which `import kubetune` fails: the merged model needs mlflow and transformers only.
    loader = f"""
import importlib.abc, sys
class NoKubetune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kubetune" or name.startswith("kubetune."):
            raise ImportError("kubetune is not installed here")
sys.meta_path.insert(0, NoKubetune())
import mlflow
mlflow.set_tracking_uri({registered['uri']!r}); mlflow.set_registry_uri({registered['uri']!r})
model = mlflow.pyfunc.load_model("models:/tiny-export-merged/1")
print("signature", model.metadata.signature is not None)
print("predicted", model.predict(["The only way"], params={{"max_new_tokens": 4}}))
"""
    done_run = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done_run.returncode == 0, done_run.stderr[-3000:]
    assert "signature True" in done_run.stdout
    assert "predicted" in done_run.stdout and "The only way" in done_run.stdout


def test_settings_come_from_the_settings_artifact_or_from_an_older_versions_model_config(tmp_path):
    """Versions served from kubetune_serving (or served_model.py before it) keep their settings in settings.json; versions
    registered before it kept them in the python_function flavor's config (pyfunc's model_config)."""
    import yaml

    from kubetune.export import registered_parts

    settings = {"base_model": "google/gemma-3-270m", "quantization": "8bit", "lora": True}
    new, old, foreign = tmp_path / "new", tmp_path / "old", tmp_path / "foreign"
    for folder in (new, old, foreign):
        (folder / "artifacts" / "tuned").mkdir(parents=True)
    (new / "artifacts" / "settings.json").write_text(json.dumps(settings))
    (new / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"artifacts": {
        "adapter": {"path": "artifacts/tuned"}, "settings": {"path": "artifacts/settings.json"}}}}}))
    (old / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "artifacts": {"adapter": {"path": "artifacts/tuned"}}, "config": settings}}}))
    (foreign / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"loader_module": "x"}}}))
    assert registered_parts(new) == (new / "artifacts" / "tuned", settings)
    assert registered_parts(old) == (old / "artifacts" / "tuned", settings)
    assert registered_parts(foreign) == (None, {})
