"""register: the adapter, its tokenizer and a reference to the base model as one MLflow model version.

The base weights are not copied into the registry (a 6.7B base would be 13 GB per version): the
model carries the base model's name, where it was resolved to, and its fingerprint, and loads it
on first use. The new version becomes the `champion` when it beats the current one on the task
kind's registry score.

The version is an MLflow "model from code": kubetune_serving/mlflow_model.py with the
kubetune_serving package beside it (code_paths; it imports no kubetune), plus two artifacts, the
adapter folder and settings.json. So it loads, and `mlflow models serve` serves it, where mlflow,
torch, transformers and peft are installed and kubetune is not; its
requirements pin those (and bitsandbytes for a quantized base), never kubetune. The settings are
an artifact and not pyfunc's model_config: MLflow logs a model_config as params of the active run
(12 un-namespaced ones: `lora`, `quantization`, `task_info/...`), and the run's params are its
config. The signature and the input example say which columns the task kind reads.

MLflow checks the input example by loading the logged model and predicting it once
(pyfunc.log_model has no switch to skip it), so registering loads the base and the adapter once
more, from where the settings say the base is (the register stage in all: 1.2 s for the tests'
tiny Llama on an 8-bit base, on the CPU). A failed check is logged as a warning, not raised.

What MLflow is told, and how, is kubetune.tracking.models; this module decides what a version
holds and whether it becomes the champion (promote_if_better takes any store with aliased() and
set_alias(), so the rule is tested on plain data).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import kubetune_serving
from kubetune_serving.model import DEFAULT_MAX_NEW_TOKENS, LABELS, TEXT
from kubetune_serving.prompts import ALPACA_TEMPLATE

from kubetune import __version__
from kubetune.headline import Headline, model_card, model_description, number, version_description
from kubetune.model_source import resolve_model
from kubetune.tasks import TaskKind
from kubetune.tasks.base import CLASSES
from kubetune.tracking import models

log = logging.getLogger(__name__)

CHAMPION = "champion"
#: The package a registered version is served with, and the file of it MLflow executes (models from code).
SERVING_PACKAGE = Path(kubetune_serving.__file__).parent
SERVED_MODEL_FILE = SERVING_PACKAGE / "mlflow_model.py"
SETTINGS_FILE = "settings.json"
#: Input examples by what the model reads.
EXAMPLE_TEXT = "The battery lasts all day and the screen is lovely."
EXAMPLE_PROMPT = "The best way to learn is"
EXAMPLE_INSTRUCTION = "Is this review positive or negative?"
EXAMPLE_QUESTION = "What makes a good cup of tea?"
#: Significant digits of the eval figures a version is tagged with: readable in the registry's tag
#: list, and what the champion rule compares (a new score is rounded the same way, so a tie stays one).
TAG_DIGITS = 6


def pins(names: list[str]) -> list[str]:
    """name==version as installed, without a local version label: torch's CPU wheel is 2.13.0+cpu,
    which no index but PyTorch's serves, while ==2.13.0 matches it and PyPI's build alike."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def requirements(settings: dict[str, Any]) -> list[str]:
    """What the served model imports, pinned to what trained it; explicit, so MLflow does not
    guess (it otherwise looks for packages such as torchvision). bitsandbytes only for a quantized
    base (the served model loads it unquantized without bitsandbytes); never kubetune."""
    quantized = settings.get("quantization", "none") != "none"
    return pins(["torch", "transformers", "peft", "accelerate", *(["bitsandbytes"] if quantized else [])])


def model_config(plan: dict[str, Any], kind: TaskKind, info: dict[str, Any],
                 prompt_format: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What the served model (kubetune_serving) needs to load and serve the model. The task
    kind's decisions travel as data: the model class, its config overrides (head size, label
    names, pad id), and what predict returns. An `alpaca` prompt format carries the Alpaca text, so
    a version keeps the prompt it was trained on whatever later kubetune versions change."""
    if prompt_format and prompt_format.get("template") == "alpaca":
        prompt_format = {**prompt_format, "alpaca_template": ALPACA_TEMPLATE}
    source = plan.get("source") or {}
    return {"base_model": plan["name_or_path"],
            "base_model_path": source.get("path") or str(resolve_model(plan["name_or_path"])),
            "quantization": plan["quantization"], "task": kind.name, "task_info": info,
            "lora": plan["lora"] is not None, "base_fingerprint": source.get("fingerprint", ""),
            "prompt_format": prompt_format, "model_class": kind.auto_model_class().__name__,
            "model_kwargs": kind.model_kwargs(info), "predicts": LABELS if kind.scoring == CLASSES else TEXT,
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}


def unquantized_modules(settings: dict[str, Any], adapter_dir: Path) -> Optional[list[str]]:
    """The modules training kept out of 8-bit/4-bit quantization (a new task head), for the served
    model to keep out too: the adapter's modules_to_save, the fully trained modules it holds
    (prepare_for_training puts the head there; PEFT adds its own guesses for the task type, such
    as `score` next to BERT's `classifier`, which name nothing in a model without them). A
    quantized base always trains with LoRA: full fine-tuning needs quantization none."""
    if settings["quantization"] == "none" or not settings["lora"]:
        return None
    saved = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save")
    return sorted(set(saved)) if saved else None


def signature(settings: dict[str, Any]):
    """Classification reads `text`; the language models read `prompt`, instruction models also
    `instruction` and `input`, chat models `messages` (lists of {role, content}; each column then
    optional); every model returns one string a row."""
    if settings["predicts"] == LABELS:
        return models.signature([("text", "string", True)], [])
    if (settings.get("prompt_format") or {}).get("chat"):
        inputs = [("messages", models.MESSAGES, False), ("prompt", "string", False)]
    elif settings.get("prompt_format"):
        inputs = [(name, "string", False) for name in ("prompt", "instruction", "input")]
    else:
        inputs = [("prompt", "string", True)]
    params = [("max_new_tokens", "long", settings["max_new_tokens"]),
              *([("retrieve", "boolean", True)] if settings.get("retrieval") else [])]
    return models.signature(inputs, params)


def input_example(settings: dict[str, Any]):
    import pandas as pd

    if settings["predicts"] == LABELS:
        return pd.DataFrame({"text": [EXAMPLE_TEXT]})
    prompt_format = settings.get("prompt_format")
    if prompt_format and prompt_format.get("chat"):
        return pd.DataFrame({"messages": [[{"role": "user", "content": EXAMPLE_QUESTION}]]})
    if prompt_format:
        return pd.DataFrame({"instruction": [prompt_format.get("instruction") or EXAMPLE_INSTRUCTION],
                             "input": [EXAMPLE_TEXT]})
    return pd.DataFrame({"prompt": [EXAMPLE_PROMPT]})


def served_code(work: Path) -> Path:
    """A clean copy of the serving package to log with the version (no __pycache__ or editor files)."""
    return Path(shutil.copytree(SERVING_PACKAGE, work / SERVING_PACKAGE.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*")))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)  # the adapter's files are only read: a link costs no copy of the weights
    except OSError:
        shutil.copy2(source, target)


def carded_adapter(adapter_dir: Path, work: Path, card: str) -> Path:
    """The adapter folder as logged: its files (linked where the file system allows, else copied)
    with README.md replaced by the run's model card; the train stage's folder is not changed."""
    folder = work / "adapter"
    shutil.copytree(adapter_dir, folder, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("README.md"))
    (folder / "README.md").write_text(card)
    return folder


def tag_value(value: float) -> str:
    return f"{value:.{TAG_DIGITS}g}"


def serving_example(settings: dict[str, Any]) -> str:
    """The predict call the model card shows, for what the version reads."""
    columns = {column: list(values) for column, values in input_example(settings).to_dict("list").items()}
    params = "" if settings["predicts"] == LABELS else ", params={\"max_new_tokens\": 32}"
    return f"model.predict(pd.DataFrame({json.dumps(columns)}){params})"


LIMITS = ("The figures above come from the held-out rows of this run's data; other data can score differently.",
          "The base model is not part of this version; load it from where it was at registration or set "
          "$KUBETUNE_BASE_MODEL_PATH. A base trained on in 8-bit or 4-bit loads unquantized without bitsandbytes, "
          "and its predictions then differ by the quantization error.",
          "Greedy decoding, as evaluation scored it; sampling changes what it writes.")


def register(tracking_uri: str, run_id: str, model_name: str, adapter_dir: Path, settings: dict[str, Any],
             metrics: dict[str, float], lineage: dict[str, str], score: tuple[str, bool], summary: Headline,
             headline_keys: tuple[str, ...] = (), retrieval: Optional[tuple[Path, dict[str, Any]]] = None,
             run_link: str = "") -> dict[str, Any]:
    """Logs the model into the run, registers a new version tagged with its lineage and headline
    figures, moves the champion alias to it when it beats the current champion on score (metric,
    higher is better), and describes the model and the version (why it is or is not the champion).
    retrieval: evaluate.rag's index folder and settings; the version then retrieves as evaluation
    did (its passages and vectors travel with it; the embedding model is referenced)."""
    settings = {**settings, "unquantized_modules": unquantized_modules(settings, adapter_dir),
                **({"retrieval": retrieval[1]} if retrieval else {})}
    store = models.ModelStore(tracking_uri)
    score_key, higher_is_better = score
    decision = decide_champion(store, model_name, score_key, metrics.get(score_key), higher_is_better)
    with tempfile.TemporaryDirectory(prefix="kubetune-register-") as work:
        settings_file = Path(work) / SETTINGS_FILE
        settings_file.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        code = served_code(Path(work))
        card = model_card(summary, decision.line(model_name, "this version"),
                          f"runs:/{run_id}/model",
                          serving_example(settings), LIMITS)
        files = {"adapter": str(carded_adapter(adapter_dir, Path(work), card)),
                 **({"retrieval": str(retrieval[0])} if retrieval else {})}
        version, model_uri = models.log_code_model(
            tracking_uri, run_id, model_name, code_file=code / SERVED_MODEL_FILE.name, code_paths=[code],
            # the tokenizer is saved beside the adapter
            artifacts={**files, "settings": str(settings_file)},
            signature=signature(settings), input_example=input_example(settings),
            requirements=requirements(settings))
    figures = {key: tag_value(metrics[key]) for key in (*headline_keys, score_key) if key in metrics}
    store.tag_version(model_name, version, {**lineage, "run_id": run_id, "base_model": settings["base_model"],
                                            "kubetune_version": __version__, **figures})
    if decision.promoted:
        store.set_alias(model_name, CHAMPION, version)
    line = decision.line(model_name, version)
    store.describe_version(model_name, version, version_description(summary, line, run_link or f"run {run_id}"))
    champion = store.aliased(model_name, CHAMPION)
    store.describe_model(model_name, model_description(summary.facts, score_key, higher_is_better,
                                                       champion[0] if champion else None,
                                                       champion[1].get(score_key) if champion else None))
    log.info("registered %s version %s: %s", model_name, version, line)
    return {"model_name": model_name, "version": version, "model_uri": model_uri, "champion": decision.promoted,
            "decision": line, "previous_champion": decision.champion}


class Versions(Protocol):
    """What the champion rule reads: kubetune.tracking.models.ModelStore, or a stand-in."""

    def aliased(self, name: str, alias: str) -> Optional[tuple[str, dict[str, str]]]: ...


def beats(score: float, best: Optional[str], higher_is_better: bool) -> bool:
    """The new version's score against the champion's recorded one (a version tag, TAG_DIGITS
    significant digits, so the new score is rounded alike); a champion without the score
    (registered before the metric existed) is beaten by any score. A tie keeps the champion:
    moving the alias for no gain would change what serves for nothing."""
    if best is None:
        return True
    score = float(tag_value(score))
    return score > float(best) if higher_is_better else score < float(best)


@dataclass(frozen=True)
class Decision:
    """Whether a new version becomes the champion, and against what."""
    promoted: bool
    metric: str
    higher_is_better: bool
    score: Optional[float]
    champion: Optional[str] = None  # the version holding the alias before this one
    champion_score: Optional[str] = None  # its recorded score (a tag)

    def line(self, model_name: str, version: str) -> str:
        name = self.metric.split("/", 1)[-1].replace("_", " ")
        who = f"{model_name}/{version}" if version.isdigit() else version
        rule = f"{'higher' if self.higher_is_better else 'lower'} is better"
        if self.score is None:
            return f"{who} is not the champion: the run has no {name} to compare"
        if self.champion is None:
            return f"{who} is the champion: the first version with a {name} ({number(self.score)})"
        held = (f"{number(float(self.champion_score))} of version {self.champion}" if self.champion_score is not None
                else f"version {self.champion}, which recorded no {name}")
        if self.promoted:
            return f"{who} is the new champion: {name} {number(self.score)} beats {held} ({rule})"
        return f"{who} is not the champion: {name} {number(self.score)} does not beat {held}, which stays champion ({rule})"


def decide_champion(store: Versions, model_name: str, score_key: str, score: Optional[float],
                    higher_is_better: bool) -> Decision:
    """Whether a version scoring `score` takes the champion alias from the current champion."""
    if score is None:
        return Decision(False, score_key, higher_is_better, None)
    current = store.aliased(model_name, CHAMPION)
    if current is None:
        return Decision(True, score_key, higher_is_better, score)
    best = current[1].get(score_key)
    return Decision(beats(score, best, higher_is_better), score_key, higher_is_better, score, current[0], best)


DATA_TAG = "kubetune.data_sha256"  # lineage: the content hash of the data a version was trained on


def trained_on(store: Versions, model_name: str, data_sha256: str) -> Optional[str]:
    """The champion's version when it was trained on exactly this data (the content hash preflight
    computes while it reads the data for its checks, so no second read), else None: then a run
    with when_data_changes trains. Only the data counts: a new base model or new settings on the
    same data is a run without when_data_changes."""
    champion = store.aliased(model_name, CHAMPION)
    if champion is None or champion[1].get(DATA_TAG) != data_sha256:
        return None
    return champion[0]


def skip_reason(tracking_uri: str, model_name: str, data_sha256: str) -> str:
    """Why a when_data_changes run trains nothing ("skipped: data unchanged since version N ..."), or
    "" when the data is new to the champion (or there is none)."""
    version = trained_on(models.ModelStore(tracking_uri), model_name, data_sha256)
    if version is None:
        return ""
    return (f"skipped: data unchanged since version {version} ({model_name}/{version}, the champion, was trained on "
            f"the same data, sha256 {data_sha256[:12]}); nothing trained")


def version_figures(tracking_uri: str, model_name: str, version: str) -> dict[str, str]:
    """A version's tags (its headline figures among them), {} when it cannot be read."""
    try:
        return models.ModelStore(tracking_uri).version_tags(model_name, version)
    except Exception:  # the message that wants them goes out without the comparison
        return {}
