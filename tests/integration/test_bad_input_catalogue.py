"""The catalogue of bad input: every case a user has been seen to try, run through `kubetune run`.

Each must stop before any task starts (so before any GPU is asked for) with exit code 2, one
`kubetune: error:` line that starts with the field to fix, no traceback, and nothing recorded: no
MLflow run (so none left RUNNING) and no registered model. Cases are (name, --set overrides, a
function that prepares files and changes the config, the field the message must name).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from kubetune import tracking
from kubetune.cli import main
from kubetune.paths import state_dir
from tiny import tiny_run_config


@dataclass
class Context:
    tmp: Path
    config: dict
    model_dir: Path
    quotes: Path

    def data_file(self, name: str, text: str | bytes) -> str:
        path = self.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def use_data(self, name: str, text: str | bytes, **data) -> None:
        self.config["data"].update(path=self.data_file(name, text), **data)

    def model_copy(self) -> Path:
        copy = self.tmp / "model-copy"
        shutil.copytree(self.model_dir, copy)
        self.config["model"]["name_or_path"] = str(copy)
        return copy

    def classification(self, name: str, text: str) -> None:
        self.config["task"] = "classification"
        self.config["model"].update(quantization="none", lora=None)
        self.use_data(name, text, text_field="text", label_field="label", validation_fraction=0.25)


@dataclass
class Case:
    name: str
    field: str
    sets: list[str] = field(default_factory=list)
    prepare: Optional[Callable[[Context], None]] = None


def rows(count: int, label=lambda i: i % 2) -> list[dict]:
    return [{"text": f"sentence number {i} is here", "label": label(i)} for i in range(count)]


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def sentiment_tsv(count: int = 24) -> str:
    return "text\tlabel\n" + "".join(f"review {i} was {'good' if i % 2 else 'bad'}\t{i % 2}\n" for i in range(count))


def set_model_json(name: str, text: str):
    def prepare(ctx: Context) -> None:
        (ctx.model_copy() / name).write_text(text)
    return prepare


def remove_from_model(*patterns: str):
    def prepare(ctx: Context) -> None:
        copy = ctx.model_copy()
        for pattern in patterns:
            for path in copy.glob(pattern):
                path.unlink()
    return prepare


def instruction_data(ctx: Context, records: list[dict], **data) -> None:
    ctx.config["task"] = "instruction"
    ctx.use_data("instr.jsonl", jsonl(records), label_field="output", instruction_field="instruction",
                 input_field="input", **data)


def instruction_rows(count: int = 24) -> list[dict]:
    return [{"instruction": f"Say {i}", "input": "", "output": f"number {i}"} for i in range(count)]


def config_file(text: str | bytes):
    def prepare(ctx: Context) -> None:
        ctx.config["__file__"] = text
    return prepare


#: A password that must never be shown or recorded (the secrets cases look for it).
PASSWORD = "hunter2-s3cr3t"


def config_file_and(tail: str, without: str = ""):
    """The case's config written out, less the section `without`, with tail (YAML text) after it."""
    def prepare(ctx: Context) -> None:
        ctx.config.pop(without, None)
        ctx.config["__file__"] = yaml.safe_dump(ctx.config) + tail
    return prepare


def aliases(levels: int) -> list[str]:
    """YAML anchors each nine aliases of the one before: 9**levels values from a few lines."""
    return ["    - &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]


CASES = [
    # ---- config keys, types and ranges ----------------------------------------------------------
    Case("unknown key", "train.epochs", ["train.epochs=3"]),
    Case("unknown section", "trainer", ["trainer.steps=3"]),
    Case("text where a number belongs", "train.batch_size", ["train.batch_size=four"]),
    Case("text where true/false belongs", "model.gradient_checkpointing", ["model.gradient_checkpointing=maybe"]),
    Case("a mapping where a number belongs", "train.max_steps", ["train.max_steps={a: 1}"]),
    Case("LoRA rank zero", "model.lora.r", ["model.lora.r=0"]),
    Case("LoRA alpha zero", "model.lora.alpha", ["model.lora.alpha=0"]),
    Case("LoRA dropout above 1", "model.lora.dropout", ["model.lora.dropout=1.5"]),
    Case("LoRA bias unknown", "model.lora.bias", ["model.lora.bias=some"]),
    Case("no target modules", "model.lora.target_modules", ["model.lora.target_modules=[]"]),
    Case("target module not in the model", "model.lora.target_modules", ["model.lora.target_modules=[query_key_value]"]),
    Case("quantization unknown", "model.quantization", ["model.quantization=3bit"]),
    Case("freeze negative", "model.freeze_layers", ["model.freeze_layers=-1"]),
    Case("freeze more blocks than the model has", "model.freeze_layers", ["model.freeze_layers=99"]),
    Case("full fine-tune of 8-bit weights", "model.quantization", ["model.lora=null"]),
    Case("blank model", "model.name_or_path", ["model.name_or_path=' '"]),
    Case("task unknown", "task", ["task=regression"]),
    Case("classification without label field", "data.label_field", ["task=classification"]),
    Case("instruction without answer field", "data.label_field", ["task=instruction"]),
    Case("learning rate zero", "train.learning_rate", ["train.learning_rate=0"]),
    Case("learning rate above 1", "train.learning_rate", ["train.learning_rate=2"]),
    Case("learning rate negative in e-notation", "train.learning_rate", ["train.learning_rate=-1e-4"]),
    Case("learning rate nan", "train.learning_rate", ["train.learning_rate=nan"]),
    Case("max steps zero", "train.max_steps", ["train.max_steps=0"]),
    Case("batch size negative", "train.batch_size", ["train.batch_size=-1"]),
    Case("accumulation zero", "train.gradient_accumulation_steps", ["train.gradient_accumulation_steps=0"]),
    Case("warm-up negative", "train.warmup_steps", ["train.warmup_steps=-1"]),
    Case("save steps negative", "train.save_steps", ["train.save_steps=-1"]),
    Case("keep no checkpoint", "train.keep_checkpoints", ["train.keep_checkpoints=0"]),
    Case("precision unknown", "train.precision", ["train.precision=fp8"]),
    Case("fp16 without a GPU", "train.precision", ["train.precision=fp16"]),
    Case("bf16 without a GPU", "train.precision", ["train.precision=bf16"]),
    Case("schedule unknown", "train.schedule", ["train.schedule=random"]),
    Case("progressive without general text", "train.schedule", ["train.schedule=progressive"]),
    Case("no training process", "train.processes", ["train.processes=0"]),
    Case("no node", "train.nodes", ["train.nodes=0"]),
    Case("sharding unknown", "train.sharding", ["train.sharding=zero3"]),
    Case("sharding one process", "train.sharding", ["train.sharding=fsdp", "model.quantization=none"]),
    Case("sharding 8-bit weights", "train.sharding", ["train.sharding=fsdp", "train.processes=2"]),
    Case("sharding 4-bit weights", "train.sharding", ["train.sharding=fsdp", "train.processes=2",
                                                       "model.quantization=4bit"]),
    Case("several nodes, local storage", "storage.uri", ["train.nodes=2"]),
    Case("logging steps zero", "train.logging_steps", ["train.logging_steps=0"]),
    Case("validation share too large", "data.validation_fraction", ["data.validation_fraction=0.9"]),
    Case("max length too short", "data.max_length", ["data.max_length=4"]),
    Case("max rows too few", "data.max_rows", ["data.max_rows=2"]),
    Case("replay share too large", "data.replay_fraction", ["data.replay_fraction=0.95"]),
    Case("replay without general text", "data.replay_fraction", ["data.replay_fraction=0.1"]),
    Case("minimum train rows zero", "data.min_train_rows", ["data.min_train_rows=0"]),
    Case("evaluate nothing", "evaluate.max_samples", ["evaluate.max_samples=0"]),
    Case("generations negative", "evaluate.num_generations", ["evaluate.num_generations=-1"]),
    Case("retention samples zero", "evaluate.retention_samples", ["evaluate.retention_samples=0"]),
    Case("model name with a slash", "register.model_name", ["register.model_name=a/b"]),
    Case("blank experiment", "tracking.experiment", ["tracking.experiment=' '"]),
    Case("storage scheme unknown", "storage.uri", ["storage.uri=gs://bucket/x"]),
    Case("storage retries negative", "storage.retry_seconds", ["storage.retry_seconds=-1"]),
    # ---- the command line and the config file ----------------------------------------------------
    Case("--set without =", "--set", ["train.max_steps"]),
    Case("--set value that is not YAML", "--set data.instruction", ["data.instruction=[a"]),
    Case("config file missing", "--config", prepare=config_file(None)),
    Case("config file a list", "--config", prepare=config_file("- a\n- b\n")),
    Case("config file not YAML", "--config", prepare=config_file("train: [1, 2\n")),
    Case("config file not UTF-8", "--config", prepare=config_file(b"train:\n  seed: \xff\xfe\n")),
    # ---- data -------------------------------------------------------------------------------------
    Case("data path missing", "data.path", ["data.path=/nonexistent/quotes.json"]),
    Case("data format unknown", "data.path", prepare=lambda c: c.use_data("d.parquet", "x")),
    Case("data folder without data files", "data.path",
         prepare=lambda c: c.config["data"].update(path=str(Path(c.data_file("notes.md", "x")).parent))),
    Case("JSON not valid", "data.path", prepare=lambda c: c.use_data("d.json", "[{\"content\": 1,,]")),
    Case("JSONL line not valid", "data.path", prepare=lambda c: c.use_data("d.jsonl", "{\"content\": \"a\"}\n{oops\n")),
    Case("JSON a number", "data.path", prepare=lambda c: c.use_data("d.json", "42")),
    Case("JSON records that are strings", "data.path", prepare=lambda c: c.use_data("d.json", "[\"a\", \"b\"]")),
    Case("text field not in the data", "data.text_field", ["data.text_field=quote"]),
    Case("null text", "data.text_field", prepare=lambda c: c.use_data(
        "d.jsonl", jsonl([{"content": None}] + [{"content": f"text {i}"} for i in range(30)]))),
    Case("NaN text", "data.text_field", prepare=lambda c: c.use_data(
        "d.jsonl", "{\"content\": NaN}\n" + jsonl([{"content": f"text {i}"} for i in range(30)]))),
    Case("text that is a list", "data.text_field", prepare=lambda c: c.use_data(
        "d.jsonl", jsonl([{"content": ["a", "b"]}] + [{"content": f"text {i}"} for i in range(30)]))),
    Case("NaN label in JSONL", "data.label_field", prepare=lambda c: c.classification(
        "d.jsonl", "{\"text\": \"odd one\", \"label\": NaN}\n" + jsonl(rows(24)))),
    Case("null label in JSONL", "data.label_field", prepare=lambda c: c.classification(
        "d.jsonl", jsonl(rows(24) + [{"text": "no label", "label": None}]))),
    Case("NaN label in CSV", "data.label_field", prepare=lambda c: c.classification(
        "d.csv", "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(24)) + "odd one,NaN\n")),
    Case("empty label in TSV", "data.label_field", prepare=lambda c: c.classification(
        "d.tsv", sentiment_tsv() + "no label here\t\n")),
    Case("TSV line with a field too many", "data.path", prepare=lambda c: c.classification(
        "d.tsv", sentiment_tsv() + "a\tb\t1\n")),
    Case("data not UTF-8", "data.path", prepare=lambda c: c.use_data("d.txt", "caf\xe9 au lait\n".encode("latin-1"))),
    Case("gzip data cut off", "data.path", prepare=lambda c: c.use_data(
        "d.jsonl.gz", gzip.compress(jsonl([{"content": "a"}] * 40).encode())[:30])),
    Case("gzip data of another format named .jsonl", "data.path", prepare=lambda c: c.use_data(
        "d.jsonl", gzip.compress(b"just some words, not JSON\n"))),
    Case("two rows", "data.path", prepare=lambda c: c.use_data(
        "d.jsonl", jsonl([{"content": "one"}, {"content": "two"}]), validation_fraction=0.5)),
    Case("validation split too small", "data.validation_fraction", prepare=lambda c: c.use_data(
        "d.jsonl", jsonl([{"content": f"text {i}"} for i in range(12)]), validation_fraction=0.05)),
    Case("one class only", "data.label_field", prepare=lambda c: c.classification(
        "d.jsonl", jsonl(rows(24, label=lambda i: 1)))),
    Case("label names not distinct", "data.label_names", ["data.label_names={0: same, 1: same}"],
         prepare=lambda c: c.classification("d.jsonl", jsonl(rows(24)))),
    Case("test file missing", "data.test_path", ["data.test_path=/nonexistent/test.json"]),
    Case("replay file missing", "data.replay_path", ["data.replay_path=/nonexistent/wiki.txt", "data.replay_fraction=0.1"]),
    Case("retention file missing", "evaluate.retention_path", ["evaluate.retention_path=/nonexistent/wiki.txt"]),
    Case("retention text without sentences", "evaluate.retention_path", prepare=lambda c: c.config["evaluate"].update(
        retention_path=c.data_file("short.txt", "a heading\nanother\n"))),
    Case("template without placeholders", "data.template", ["data.template=no placeholders here"],
         prepare=lambda c: instruction_data(c, instruction_rows())),
    Case("task weight for a task not in the data", "data.task_weights.nosuch", ["task=multitask",
                                                                               "data.task_weights={nosuch: 2}"],
         prepare=lambda c: instruction_data(c, [{**r, "task": f"t{i % 2}"} for i, r in enumerate(instruction_rows())])),
    Case("null answer", "data.label_field",
         prepare=lambda c: instruction_data(c, instruction_rows() + [{"instruction": "Say", "input": "", "output": None}])),
    # ---- model ------------------------------------------------------------------------------------
    Case("model folder missing", "model.name_or_path", ["model.name_or_path=/nonexistent/model"]),
    Case("model folder without config.json", "model.name_or_path", prepare=remove_from_model("config.json")),
    Case("model config.json corrupt", "model.name_or_path", prepare=set_model_json("config.json", "{\"model_type\": ")),
    Case("model config.json without model_type", "model.name_or_path", prepare=set_model_json("config.json", "{}")),
    Case("model without weights", "model.name_or_path", prepare=remove_from_model("*.safetensors", "*.bin")),
    Case("model without tokenizer", "model.name_or_path",
         prepare=remove_from_model("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model")),
    Case("tokenizer.json cut off", "model.name_or_path",
         prepare=lambda c: (lambda p: p.write_text(p.read_text()[:-200]) if p.stat().st_size > (1 << 20) else
                            p.write_text("{\"version\": ")) (c.model_copy() / "tokenizer.json")),
    Case("package that is not installed", "model.name_or_path", ["model.name_or_path=package:no-such-weights"]),
    # ---- services ---------------------------------------------------------------------------------
    Case("tracking store under a file", "tracking.mlflow_uri",
         prepare=lambda c: c.config["tracking"].update(mlflow_uri=f"sqlite:///{c.data_file('plain', 'x')}/sub/mlflow.db")),
    Case("tracking server not answering", "tracking.mlflow_uri", ["tracking.mlflow_uri=http://127.0.0.1:9"]),
    Case("storage folder under a file", "storage.uri",
         prepare=lambda c: c.config["storage"].update(uri=f"{c.data_file('plain2', 'x')}/storage")),
    # ---- secrets, size and the config file (issue 23) ----------------------------------------------
    Case("tracking URI with user:password", "tracking.mlflow_uri",
         [f"tracking.mlflow_uri=http://alice:{PASSWORD}@127.0.0.1:9"]),
    Case("tracking URI with a token", "tracking.mlflow_uri", [f"tracking.mlflow_uri=https://{PASSWORD}@127.0.0.1:9"]),
    Case("storage endpoint with keys", "storage.endpoint_url",
         [f"storage.endpoint_url=http://KEY:{PASSWORD}@127.0.0.1:9"]),
    Case("config key given twice", "train.max_steps",
         prepare=lambda c: config_file_and(yaml.safe_dump({"train": c.config["train"]}) + "  max_steps: 50\n",
                                           without="train")(c)),
    Case("config section given twice", "train", prepare=config_file_and("train:\n  seed: 1\n")),
    Case("YAML alias bomb", "--config",
         prepare=config_file_and("bomb:\n" + "\n".join(aliases(7)) + "\n")),
    Case("large aliased value where a number belongs", "train.max_steps",
         prepare=config_file_and("train:\n  max_steps:\n" + "\n".join(aliases(5)) + "\n", without="train")),
    Case("config nested too deeply", "--config",
         prepare=config_file_and("bomb: " + "[" * 5000 + "]" * 5000 + "\n")),
    Case("a value 100,000 characters long", "train.precision", ["train.precision=" + "x" * 100_000]),
    # ---- data that looked fine (issue 23) ----------------------------------------------------------
    Case("a named pipe as the data file", "data.path",
         prepare=lambda c: (os.mkfifo(c.tmp / "pipe.jsonl"), c.config["data"].update(path=str(c.tmp / "pipe.jsonl")))),
    Case("a label none that is a class, dropped as missing", "data.label_field", ["data.drop_invalid=true"],
         prepare=lambda c: c.classification("none.jsonl", jsonl(rows(45, label=lambda i: ["pos", "neg", "none"][i % 3])))),
    Case("storage at the filesystem root", "storage.uri", ["storage.uri=file:///"]),
    # ---- the model and the machine (issue 23) ------------------------------------------------------
    Case("max length beyond the model's positions, with a long row", "data.max_length", ["data.max_length=100000"],
         prepare=lambda c: c.use_data("long.jsonl", jsonl([{"content": "word " * 3000}] +
                                                          [{"content": f"text {i}"} for i in range(40)]))),
    Case("seed negative", "train.seed", ["train.seed=-5"]),
    Case("seed beyond 32 bits", "train.seed", ["train.seed=4294967296"]),
    Case("model name MLflow refuses", "register.model_name", ["register.model_name='..\\x'"]),
    Case("a billion new tokens", "evaluate.max_new_tokens", ["evaluate.max_new_tokens=1000000000"]),
    Case("a trillion steps", "train.max_steps", ["train.max_steps=1000000000000"]),
    Case("a notification event that does not exist", "notify.events", ["notify.events=[failure]"]),
    Case("a webhook without its scheme", "notify.webhook_url", ["notify.webhook_url=hooks.slack.com/services/T/B/x"]),
    Case("a webhook timeout of zero", "notify.timeout_seconds", ["notify.timeout_seconds=0"]),
    Case("weights only in a pickle of more than tensors", "model.name_or_path",
         prepare=lambda c: pickle_only_weights(c.model_copy())),
    Case("custom code with an unknown model_type", "model.name_or_path",
         prepare=lambda c: custom_code_model(c.model_copy())),
]


def pickle_only_weights(model: Path) -> None:
    """pytorch_model.bin only, a pickle that holds training arguments beside the tensors."""
    import argparse

    import torch
    from safetensors.torch import load_file

    weights = load_file(model / "model.safetensors")
    torch.save({**weights, "args": argparse.Namespace(lr=0.1)}, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


def custom_code_model(model: Path) -> None:
    """A model_type transformers does not know, with the model's own code beside it (never run)."""
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mytiny", auto_map={"AutoModelForCausalLM": "modeling_mytiny.MyTinyForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_mytiny.py").write_text("raise SystemExit('the model's own code ran')\n")


@pytest.fixture
def context(tiny_model_dir, quotes_file, tmp_path):
    config = tiny_run_config(tiny_model_dir, quotes_file,
                             tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                             storage={"uri": str(tmp_path / "storage")})
    return Context(tmp=tmp_path, config=config, model_dir=tiny_model_dir, quotes=quotes_file)


def test_the_catalogue_is_large():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_stops_before_any_task(case, context, capsys, tmp_path):
    if case.prepare is not None:
        case.prepare(context)
    config_text = context.config.pop("__file__", "")
    config_path = tmp_path / "run.yaml"
    if config_text is None:
        config_path = tmp_path / "no-such-config.yaml"
    elif config_text:
        config_path.write_bytes(config_text if isinstance(config_text, bytes) else config_text.encode())
    else:
        config_path.write_text(yaml.safe_dump(context.config))
    args = ["run", "--no-progress", "--config", str(config_path)]
    for override in case.sets:
        args += ["--set", override]
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kubetune: error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"kubetune: error: {case.field} "), errors[0]
    assert len(errors[0]) < 2000, errors[0][:3000]
    with capsys.disabled():
        print(f"\n  {case.name}: {errors[0]}", end="")  # shown with pytest -s: the catalogue's messages
    assert "Traceback" not in err
    assert not list((tmp_path / "storage").glob("runs/*")), "storage was written"
    store = tmp_path / "mlflow.db"
    if store.exists():
        client = tracking.client(f"sqlite:///{store}")
        assert client.search_registered_models() == []
        assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


@pytest.mark.parametrize("sets, field", [
    ([f"tracking.mlflow_uri=http://alice:{PASSWORD}@127.0.0.1:9"], "tracking.mlflow_uri"),  # refused as config
    ([f"data.path=https://reader:{PASSWORD}@127.0.0.1:9/quotes.json"], "data.path"),  # refused by preflight
])
def test_a_password_in_a_uri_is_never_shown_or_logged(sets, field, context, capsys, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(context.config))
    logs = state_dir() / "logs"
    before = set(logs.glob("*")) if logs.exists() else set()
    args = ["run", "--no-progress", "--config", str(tmp_path / "run.yaml")]
    assert main([*args, *(item for override in sets for item in ("--set", override))]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("kubetune: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"kubetune: error: {field} ") and ":***@127.0.0.1:9" in errors[0]
    written = [path.read_text(errors="replace") for path in set(logs.glob("*")) - before if path.is_file()]
    assert PASSWORD not in out + err and not [text for text in written if PASSWORD in text]
    assert written or field == "tracking.mlflow_uri", "preflight ran without a run log"


def test_a_missing_s3_data_bucket_names_data_path(context, s3_server, capsys, tmp_path):
    context.config["data"]["path"] = "s3://no-such-data-bucket/quotes.json"
    context.config["storage"]["endpoint_url"] = s3_server.endpoint_url
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(context.config))
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kubetune: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "kubetune: error: data.path = 's3://no-such-data-bucket/quotes.json': bucket 'no-such-data-bucket' does not exist")
