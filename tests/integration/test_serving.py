"""A registered version served without kubetune: versions registered by the real stages (the tiny
Llama on an 8-bit base with LoRA; the tiny BERT classifier) load with `mlflow.pyfunc.load_model`
and serve with `mlflow models serve` in processes where neither `import kubetune` nor the installed
`kubetune_serving` can be imported (the version runs the copy of kubetune_serving logged with it),
and predict what kubetune's own loader and scoring predict. Registering adds no params to the run; a classification
version exports to a folder plain transformers loads, with the same predictions."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import _free_port, _start, _stop
import kubetune_serving
from kubetune_serving import loading
from kubetune_serving.model import ServedModel

from kubetune import tracking
from kubetune.artifacts import read_task_info
from tiny import NAMES, run_stages, sentiment_rows, tiny_run_config, write_tsv

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

PROMPTS = ["The only way", "Life is"]
REVIEWS = ["the film was great", "awful phone and a poor battery", "my meal is plain , the staff too",
           "i found the screen superb"]
# What the serving package may import: the standard library and these (bitsandbytes only if present).
SERVED_IMPORTS = {"mlflow", "pandas", "numpy", "torch", "transformers", "peft", "bitsandbytes"}
SERVING_SOURCE = Path(kubetune_serving.__file__).parent
# Installed first on sys.meta_path of a process: `import kubetune` fails there, as where it is not
# installed, and so does the installed kubetune_serving (a version imports its own logged copy under
# a name of its own, kubetune_serving_<hash>).
NO_KUBETUNE = """
import importlib.abc, sys
class NoKubetune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("kubetune", "kubetune_serving"):
            raise ImportError(f"{name.split('.')[0]} is not installed here")
sys.meta_path.insert(0, NoKubetune())
"""


def _register_after_evaluate(config: dict, root: Path) -> dict:
    """The stages through train as tiny.run_stages runs them, then the evaluate and register stages
    themselves, with the run's params read before and after registering."""
    from kubetune import stages

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root.parent)  # a sqlite store's experiments keep their artifacts in ./mlruns
        out = run_stages(config, root, through="train")
        config_json, run_id = json.dumps(config), out["run_id"]
        evaluation = root / "evaluation"
        stages.evaluate(config_json, run_id, out["tokenized"].path, out["tuned"].path, str(evaluation))
        client = tracking.client(config["tracking"]["mlflow_uri"])
        before = dict(client.get_run(run_id).data.params)
        result = stages.register(config_json, run_id, out["lineage"].path, out["tokenized"].path,
                                 out["prepared"].path, out["tuned"].path, str(evaluation))
    return {"uri": config["tracking"]["mlflow_uri"], "name": config["register"]["model_name"],
            "version": f"{result['model_name']}/{result['version']}", "run_id": run_id,
            "tuned": Path(out["tuned"].path), "info": read_task_info(Path(out["tokenized"].path)),
            "params_before": before, "params_after": dict(client.get_run(run_id).data.params)}


@pytest.fixture(scope="module")
def causal(tiny_model_dir, quotes_file, tmp_path_factory):
    """The tiny default: Llama, 8-bit base, LoRA on q/v."""
    root = tmp_path_factory.mktemp("serving_causal")
    config = tiny_run_config(tiny_model_dir, quotes_file,
                             evaluate={"retention_path": None, "num_generations": 0},
                             tracking={"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "serving"},
                             storage={"uri": str(root / "storage")}, register={"model_name": "tiny-serving"})
    return {**_register_after_evaluate(config, root / "artifacts"), "base": tiny_model_dir, "quantization": "8bit",
            "task": "causal_lm"}


def _classification_config(bert_dir: Path, root: Path, quantization: str) -> dict:
    """The tiny BERT with a three-class head, LoRA on query/value (as test_classification_stages)."""
    (root / "data").mkdir()
    (root / "data" / "mapping.txt").write_text("".join(f"{k}\t{v}\n" for k, v in NAMES.items()))
    data = write_tsv(root / "data" / "reviews.tsv", sentiment_rows(240))
    return tiny_run_config(
        bert_dir, data, task="classification",
        model={"quantization": quantization, "gradient_checkpointing": False,
               "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]}},
        data={"text_field": "review", "label_field": "score", "max_length": 32},
        train={"batch_size": 16, "max_steps": 30, "warmup_steps": 3, "learning_rate": 3e-2, "save_steps": 0},
        evaluate={"max_samples": 48, "batch_size": 16, "num_generations": 0, "retention_path": None},
        register={"model_name": f"tiny-serving-sentiment-{quantization}"},
        tracking={"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "serving"},
        storage={"uri": str(root / "storage")})


@pytest.fixture(scope="module")
def classification(bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_classification")
    return {**_register_after_evaluate(_classification_config(bert_dir, root, "none"), root / "artifacts"),
            "base": bert_dir, "quantization": "none", "task": "classification"}


@pytest.fixture(scope="module")
def classification_8bit(bert_dir, tmp_path_factory):
    """On an 8-bit base: the new head stays out of quantization, in training and when served."""
    root = tmp_path_factory.mktemp("serving_classification_8bit")
    return {**_register_after_evaluate(_classification_config(bert_dir, root, "8bit"), root / "artifacts"),
            "base": bert_dir, "quantization": "8bit", "task": "classification"}


def _kubetune_predictions(registered: dict) -> list[str]:
    """What kubetune itself predicts with the tuned adapter: its loader, tokenizer and scoring."""
    from kubetune.config import LoraSettings, ModelConfig
    from kubetune.modeling import load_tuned
    from kubetune.scoring import class_predictions, generate
    from kubetune.tokenization import load_tokenizer

    cfg = ModelConfig(name_or_path=str(registered["base"]), quantization=registered["quantization"],
                      lora=LoraSettings())
    task, tokenizer = registered["task"], load_tokenizer(registered["tuned"])
    if task == "classification":
        model = load_tuned(registered["base"], registered["tuned"], cfg, task, registered["info"])
        rows = tokenizer(REVIEWS, truncation=True)
        ids = class_predictions(model, tokenizer, [{"input_ids": i, "attention_mask": m} for i, m in
                                                   zip(rows["input_ids"], rows["attention_mask"])], 8)
        return [NAMES[str(i)] for i in ids]
    model = load_tuned(registered["base"], registered["tuned"], cfg, task)
    return generate(model, tokenizer, [tokenizer(p)["input_ids"] for p in PROMPTS], 4, 8)


def _download(registered: dict, dest: Path) -> Path:
    from kubetune.tracking import models

    return models.download(registered["uri"], f"models:/{registered['name']}/1", dest, "--model", registered["name"])


# ---- the serving package ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(SERVING_SOURCE.glob("*.py")), ids=lambda path: path.name)
def test_the_serving_package_imports_only_the_serving_stack_and_itself_relatively(path):
    tree = ast.parse(path.read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert roots - set(sys.stdlib_module_names) <= SERVED_IMPORTS, roots - set(sys.stdlib_module_names)
    assert not roots & {"kubetune", "kubetune_serving"}, "import the package's own modules relatively (from .loops ...)"
    assert ("mlflow" in roots) == (path.name == "mlflow_model.py"), "only mlflow_model.py imports mlflow"


def test_the_base_model_comes_from_the_variable_then_the_recorded_folder_then_the_configured_name(
        tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(loading.BASE_MODEL_ENV, raising=False)
    location = loading.base_model_location
    gone = str(tmp_path / "gone")
    assert location({"base_model": "google/gemma-3-270m", "base_model_path": str(tiny_model_dir)}) == str(tiny_model_dir)
    assert location({"base_model": "google/gemma-3-270m", "base_model_path": gone}) == "google/gemma-3-270m"
    assert location({"base_model": str(tiny_model_dir), "base_model_path": gone}) == str(tiny_model_dir)
    for fetched_by_kubetune in ("package:kubetune-demo-models/gemma", "s3://models/gemma", str(tmp_path / "nowhere")):
        with pytest.raises(FileNotFoundError, match=loading.BASE_MODEL_ENV):
            location({"base_model": fetched_by_kubetune, "base_model_path": gone})
    monkeypatch.setenv(loading.BASE_MODEL_ENV, str(tiny_model_dir))
    assert location({"base_model": "s3://models/gemma", "base_model_path": gone}) == str(tiny_model_dir)
    monkeypatch.setenv(loading.BASE_MODEL_ENV, gone)
    with pytest.raises(FileNotFoundError, match=f"{loading.BASE_MODEL_ENV}={gone} is not a model folder"):
        location({"base_model": "s3://models/gemma", "base_model_path": str(tiny_model_dir)})


def test_training_and_serving_load_tokenizers_and_quantize_with_the_same_code():
    from kubetune import modeling, tokenization

    assert tokenization.load_tokenizer is loading.load_tokenizer
    assert (modeling.quantization_config, modeling.compute_dtype) == (loading.quantization_config, loading.compute_dtype)


def test_an_alpaca_instruction_model_carries_its_prompt_text_and_reads_instruction_and_input(tiny_model_dir):
    """The settings as registration writes them (through JSON): the served model builds the Alpaca
    prompt kubetune trained on, and the signature takes the example and a lone `input` column."""
    import mlflow.models
    import pandas as pd

    from kubetune import registry
    from kubetune.tasks import get_task
    from kubetune.tasks.prompts import build_prompt

    plan = {"name_or_path": str(tiny_model_dir), "quantization": "none", "lora": {"r": 8},
            "source": {"path": str(tiny_model_dir), "fingerprint": "sha256:x"}}
    settings = json.loads(json.dumps(registry.model_config(
        plan, get_task("instruction"), {}, {"template": "alpaca", "instruction": "Name the colour."})))
    served = ServedModel()
    served.prompt_format = settings["prompt_format"]
    rows = pd.DataFrame({"input": ["The sky on a clear day", None]})
    assert served.prompts(rows) == [build_prompt("alpaca", "Name the colour.", "The sky on a clear day"),
                                    build_prompt("alpaca", "Name the colour.", "")]
    example = registry.input_example(settings)
    assert list(example.columns) == ["instruction", "input"]
    for data in (example, rows, pd.DataFrame({"prompt": ["as it is"]})):
        mlflow.models.validate_schema(data, registry.signature(settings).inputs)


# ---- registration ---------------------------------------------------------------------------------

def test_registering_adds_no_params_to_the_run(causal, classification):
    for registered in (causal, classification):
        assert registered["version"] == f"{registered['name']}/1"
        assert registered["params_before"]  # the run config's, logged by preflight
        assert registered["params_after"] == registered["params_before"]
        assert "lora" not in registered["params_after"] and not any(k.startswith("task_info") for k in
                                                                    registered["params_after"])


@pytest.mark.parametrize("kind", ["causal", "classification", "classification_8bit"])
def test_a_version_carries_signature_example_and_requirements_without_kubetune(kind, request, tmp_path):
    import mlflow.models

    registered = request.getfixturevalue(kind)
    classifies = registered["task"] == "classification"
    local = _download(registered, tmp_path)
    model = mlflow.models.Model.load(local)
    columns = model.signature.inputs.input_names()
    assert columns == (["text"] if classifies else ["prompt"])
    example = model.load_input_example(local)
    assert list(example.columns) == columns and len(example) == 1
    assert (model.signature.params is not None) == (not classifies)
    for name in ("requirements.txt", "python_env.yaml", "conda.yaml"):
        text = (local / name).read_text()
        assert "kubetune" not in text, f"{name} names kubetune:\n{text}"
    requirements = (local / "requirements.txt").read_text()
    assert all(f"{name}==" in requirements for name in ("torch", "transformers", "peft", "accelerate"))
    assert "+cpu" not in requirements  # local version labels are on no public index
    assert ("bitsandbytes==" in requirements) == (registered["quantization"] != "none")
    flavor = model.flavors["python_function"]
    assert "config" not in flavor
    settings = json.loads((local / flavor["artifacts"]["settings"]["path"]).read_text())
    assert Path(settings["base_model_path"]) == registered["base"].resolve()
    # the new head stays out of 8-bit quantization when served, as in training
    assert ("classifier" in (settings["unquantized_modules"] or [])) == (kind == "classification_8bit")
    assert (local / "mlflow_model.py").read_text() == (SERVING_SOURCE / "mlflow_model.py").read_text()
    logged = local / "code" / "kubetune_serving"
    assert sorted(p.name for p in logged.iterdir()) == sorted(p.name for p in SERVING_SOURCE.glob("*.py"))
    assert all((logged / p.name).read_text() == p.read_text() for p in SERVING_SOURCE.glob("*.py"))


def test_a_version_runs_the_code_logged_with_it_in_a_process_that_imported_kubetune_serving(causal, tmp_path):
    """MLflow only puts a version's code/ first on sys.path, which does not replace a module already
    imported: the version imports its logged copy under a name of its own."""
    import mlflow.pyfunc

    with tracking.process_uris(causal["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{causal['name']}/1")
    served_class = next(cls for cls in type(model.unwrap_python_model()).__mro__ if cls.__name__ == "ServedModel")
    module = sys.modules[served_class.__module__]
    assert served_class is not ServedModel and served_class.__module__.startswith("kubetune_serving_")
    assert Path(module.__file__).parent.name == "kubetune_serving" and Path(module.__file__).parent != SERVING_SOURCE


# ---- loading and serving without kubetune ---------------------------------------------------------

def test_versions_load_and_predict_where_kubetune_cannot_be_imported(causal, classification, classification_8bit):
    """One process loads the three versions (importing torch, transformers and mlflow takes most of
    a process's 12 s) and predicts what kubetune predicts with the same adapters; without
    bitsandbytes, the 8-bit version loads its base unquantized, with a warning."""
    versions = {"causal": causal, "classification": classification, "classification_8bit": classification_8bit}
    requests = {kind: {"uri": registered["uri"], "model": f"models:/{registered['name']}/1",
                       "input": {"text": REVIEWS} if registered["task"] == "classification" else {"prompt": PROMPTS},
                       "params": None if registered["task"] == "classification" else {"max_new_tokens": 4}}
                for kind, registered in versions.items()}
    loader = NO_KUBETUNE + f"""
import json
import mlflow, pandas as pd
predicted = {{}}
for kind, asked in {requests!r}.items():
    mlflow.set_tracking_uri(asked["uri"]); mlflow.set_registry_uri(asked["uri"])
    model = mlflow.pyfunc.load_model(asked["model"])
    predicted[kind] = list(model.predict(pd.DataFrame(asked["input"]), params=asked["params"]))
sys.modules["bitsandbytes"] = None  # from here on `import bitsandbytes` fails, as where it is not installed
asked = {requests!r}["causal"]
mlflow.set_tracking_uri(asked["uri"]); mlflow.set_registry_uri(asked["uri"])
model = mlflow.pyfunc.load_model(asked["model"])
predicted["causal, no bitsandbytes"] = list(model.predict(pd.DataFrame(asked["input"]), params=asked["params"]))
try:
    import kubetune
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({{"predicted": predicted, "blocked": blocked,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("kubetune", "kubetune_serving")),
                  "logged": sorted({{sys.modules[m].__file__ for m in sys.modules if m.startswith("kubetune_serving_")}})}}))
"""
    done = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["blocked"] and result["loaded"] == []
    assert result["logged"] and not any(path.startswith(str(SERVING_SOURCE)) for path in result["logged"])
    for kind, registered in versions.items():
        predicted = result["predicted"][kind]
        assert predicted == _kubetune_predictions(registered), kind
        if registered["task"] == "classification":
            assert len(predicted) == len(REVIEWS) and set(predicted) <= set(NAMES.values()), kind
        else:
            assert len(predicted) == len(PROMPTS) and all(isinstance(text, str) for text in predicted)
    unquantized = result["predicted"]["causal, no bitsandbytes"]
    assert len(unquantized) == len(PROMPTS) and all(isinstance(text, str) for text in unquantized)
    assert done.stderr.count("bitsandbytes is not installed: loading the base at full precision") == 1


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    with opener.open(request, timeout=120) as response:
        return json.loads(response.read())


def _wait_for_ping(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer {url} in {timeout} s:\n{log_path.read_text()[-3000:]}")


# About 15 s each: the server takes 10-12 s to answer /ping (measured on 2 busy cores).
@pytest.mark.parametrize("kind", ["causal", "classification"])
def test_mlflow_models_serve_serves_a_version_without_kubetune(kind, request, tmp_path):
    registered = request.getfixturevalue(kind)
    blocker = tmp_path / "no_kubetune"
    blocker.mkdir()
    # sitecustomize runs at the start of every Python process with it on the path: the CLI and the
    # server's worker alike. Each writes its pid, so the test sees that the block was in effect.
    (blocker / "sitecustomize.py").write_text(
        NO_KUBETUNE + "import os\nwith open(os.environ['NO_KUBETUNE_LOG'], 'a') as log:\n"
                      "    log.write(f'{os.getpid()}\\n')\n")
    pids = tmp_path / "blocked_pids.txt"
    path = lambda *folders: os.pathsep.join(filter(None, folders))  # noqa: E731
    env = {**os.environ, "PYTHONPATH": path(str(blocker), os.environ.get("PYTHONPATH")),
           # the server runs `uvicorn` from PATH: this interpreter's, as in an activated environment
           "PATH": path(str(Path(sys.executable).parent), os.environ.get("PATH")),
           "NO_KUBETUNE_LOG": str(pids), "MLFLOW_TRACKING_URI": registered["uri"],
           "MLFLOW_REGISTRY_URI": registered["uri"], "PYTHONWARNINGS": "ignore"}
    check = subprocess.run([sys.executable, "-c", "import kubetune"], capture_output=True, text=True, env=env)
    assert check.returncode != 0 and "kubetune is not installed here" in check.stderr
    pids.unlink()

    port = _free_port()
    log_path = tmp_path / "serve.log"
    server = _start([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{registered['name']}/1",
                     "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"], log_path, env)
    try:
        _wait_for_ping(f"http://127.0.0.1:{port}/ping", server, log_path, timeout=240)
        if kind == "classification":
            body = {"dataframe_split": {"columns": ["text"], "data": [[text] for text in REVIEWS]}}
        else:
            body = {"dataframe_split": {"columns": ["prompt"], "data": [[prompt] for prompt in PROMPTS]},
                    "params": {"max_new_tokens": 4}}
        predictions = _post(f"http://127.0.0.1:{port}/invocations", body)["predictions"]
    finally:
        _stop(server)
    assert predictions == _kubetune_predictions(registered)
    if kind == "classification":
        assert len(predictions) == len(REVIEWS) and set(predictions) <= set(NAMES.values())
    else:
        assert len(predictions) == len(PROMPTS) and all(isinstance(text, str) for text in predictions)
    assert len(set(pids.read_text().split())) >= 2, "the CLI and the server's worker both ran with kubetune blocked"


# ---- export of a classification version -----------------------------------------------------------

def test_an_exported_classifier_loads_with_plain_transformers_and_predicts_as_registered(classification, tmp_path):
    import mlflow
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune.export import export

    done = export(classification["uri"], f"{classification['name']}/1", tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(done.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(done.path)
    assert {str(i): name for i, name in model.config.id2label.items()} == NAMES
    batch = tokenizer(REVIEWS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        exported = [model.config.id2label[i] for i in model(**batch).logits.argmax(-1).tolist()]
    with tracking.process_uris(classification["uri"]):
        registered = mlflow.pyfunc.load_model(f"models:/{classification['name']}/1").predict(
            pd.DataFrame({"text": REVIEWS}))
    assert exported == list(registered)


# ---- what a person sees first: the run's and the registry's descriptions, the model card ----------

def test_the_run_and_the_registry_lead_with_the_headline(causal, tmp_path):
    from kubetune import registry
    from kubetune.tracking.models import ModelStore

    client = tracking.client(causal["uri"])
    run = client.get_run(causal["run_id"])
    description = run.data.tags[tracking.DESCRIPTION_TAG]
    assert description.startswith("**tiny-serving**: causal_lm on ")
    assert "| perplexity (held-out) |" in description and "**Loss**: validation loss" in description
    assert "**Registry**: tiny-serving/1 is the champion: the first version with a tuned perplexity" in description
    assert "[tiny-serving/1](#/models/tiny-serving/versions/1)" in description
    # flags and counts are tags; params are what the config set (no nulls)
    assert not {"eval/base_reused", "eval/split_validation", "inputs/tokens_reused", "train/processes"} & set(run.data.metrics)
    assert run.data.tags["kubetune.heldout_split"] == "validation" and "kubetune.train_processes" not in run.data.tags
    assert run.data.tags["kubetune.champion"] == "yes"
    assert "null" not in run.data.params.values() and "model.lora.r" in run.data.params

    version = client.get_model_version("tiny-serving", "1")
    assert version.description.startswith("tiny-serving/1 is the champion")
    assert "| perplexity (held-out) |" in version.description
    figures = {key: value for key, value in version.tags.items() if key.startswith("eval/")}
    assert "eval/tuned_perplexity" in figures and "eval/base_loss" not in figures  # the headline, not every figure
    assert all(len(value.replace(".", "").lstrip("-0")) <= 6 for value in figures.values()), figures
    assert "version 1, tuned perplexity" in client.get_registered_model("tiny-serving").description

    local = _download(causal, tmp_path / "v1")
    text = next(local.rglob("README.md")).read_text()
    assert text.startswith("# tiny-serving") and "## Results" in text and "More Information Needed" not in text
    assert f'mlflow.pyfunc.load_model("runs:/{causal["run_id"]}/model")' in text

    # a second version that scores worse says so, and the champion stays
    metrics = {key: float(value) for key, value in run.data.metrics.items() if key.startswith("eval/")}
    worse = {**metrics, "eval/tuned_perplexity": metrics["eval/tuned_perplexity"] * 2}
    from kubetune.headline import Facts, Headline

    summary = Headline(Facts("tiny-serving", "causal_lm", str(causal["base"]), "8bit+lora"), "", "no loss was logged")
    settings = json.loads(next(local.rglob("settings.json")).read_text())
    second = registry.register(causal["uri"], causal["run_id"], "tiny-serving", causal["tuned"], settings, worse, {},
                               ("eval/tuned_perplexity", False), summary)
    assert not second["champion"] and "does not beat" in second["decision"] and "of version 1" in second["decision"]
    assert ModelStore(causal["uri"]).aliased("tiny-serving", registry.CHAMPION)[0] == "1"
    assert client.get_model_version("tiny-serving", second["version"]).description.startswith(second["decision"])
