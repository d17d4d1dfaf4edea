"""Tiny real models for tests: a tokenizer trained on the test text and a few-layer decoder built
from a config, saved like any hub snapshot. This is how transformers and PEFT test their code too.

The helpers every test folder shares live here (tests/conftest.py puts tests/ on sys.path): the
tiny Llama and its run config, the pipeline's stages in order, the tiny sentiment set and BERT of
the classification tests, the instruction tests' shared data, and a small file tree."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import pytest

QUOTES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "quotes" / "quotable_sample_quotes.json"

SHAKESPEARE = QUOTES.parents[1] / "retention" / "tinyshakespeare_input.txt"

SAMPLE_TEXTS = [
    "The only way to do great work is to love what you do.",
    "Life is what happens when you are busy making other plans.",
    "In the middle of difficulty lies opportunity.",
    "Simplicity is the ultimate sophistication.",
    "Well done is better than well said.",
    "The journey of a thousand miles begins with one step.",
    "What we think, we become.",
    "Knowledge speaks, but wisdom listens.",
]


def training_texts() -> list[str]:
    if QUOTES.exists():
        return [row["content"] for row in json.loads(QUOTES.read_text())]
    return SAMPLE_TEXTS * 20


def general_texts() -> list[str]:
    """General English to give the tiny base model some language before it is fine-tuned."""
    if SHAKESPEARE.exists():
        lines = [line for line in SHAKESPEARE.read_text().splitlines() if len(line) > 20]
        return lines[:2000]
    return SAMPLE_TEXTS * 50


def pretrain(model, tokenizer, texts: list[str], steps: int = 150, batch_size: int = 16) -> None:
    """A few hundred full-weight steps, so the base is a language model and not noise."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def write_quotes(path: Path, count: int = 64) -> Path:
    """A JSON array of quote records shaped like the shared quotes file."""
    texts = (training_texts() * 2)[:count]
    path.write_text(json.dumps([{"content": t, "author": "someone", "tags": []} for t in texts]))
    return path


def build_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_tiny_llama(path: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A Llama-architecture causal LM (q_proj/k_proj/v_proj/o_proj like Gemma) with a trained tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(training_texts())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, general_texts())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run_config(model_dir: Path, data_path: Path, **sections) -> dict:
    """A run config sized for tests: 8-bit + LoRA on the tiny model, a dozen steps."""
    config = {
        "task": "causal_lm",
        "model": {"name_or_path": str(model_dir), "quantization": "8bit",
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"path": str(data_path), "text_field": "content", "validation_fraction": 0.2, "max_length": 48},
        "train": {"batch_size": 8, "gradient_accumulation_steps": 1, "warmup_steps": 2, "max_steps": 12,
                  "learning_rate": 1.0e-2, "save_steps": 6, "eval_steps": 10, "seed": 0},
        "evaluate": {"max_samples": 16, "batch_size": 8, "num_generations": 2, "max_new_tokens": 6},
        "register": {"model_name": "tiny-lora"},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


def preflight(config_json: str, lineage) -> str:
    """The preflight component as the pipeline calls it (GPU stages get one accelerator); its run id."""
    from kubetune import components

    return components.preflight.python_func(config_json=config_json, accelerator_count=1, lineage=lineage).run_id


def run_stages(config: dict, root: Path, through: str = "evaluate") -> dict:
    """Each component's python_func in pipeline order, with artifacts under root; returns them."""
    from kfp import dsl

    from kubetune import components

    def artifact(kind, name):
        return kind(name=name, uri=str(root / name), metadata={})

    config_json = json.dumps(config)
    out = {"run_id": preflight(config_json, out_lineage := artifact(dsl.Artifact, "lineage")), "lineage": out_lineage}
    common = {"config_json": config_json, "run_id": out["run_id"]}
    steps = [
        ("prepare_data", lambda: components.prepare_data.python_func(
            **common, dataset=out.setdefault("dataset", artifact(dsl.Dataset, "dataset")))),
        ("tokenize", lambda: components.tokenize.python_func(
            **common, dataset=out["dataset"], tokenized=out.setdefault("tokenized", artifact(dsl.Dataset, "tokenized")))),
        ("prepare_model", lambda: components.prepare_model.python_func(
            **common, tokenized=out["tokenized"], prepared_model=out.setdefault("prepared", artifact(dsl.Model, "prepared")))),
        ("train", lambda: components.train.python_func(
            **common, tokenized=out["tokenized"], prepared_model=out["prepared"],
            tuned_model=out.setdefault("tuned", artifact(dsl.Model, "tuned")))),
        ("evaluate", lambda: components.evaluate.python_func(
            **common, tokenized=out["tokenized"], tuned_model=out["tuned"],
            evaluation=out.setdefault("evaluation", artifact(dsl.Artifact, "evaluation")),
            metrics=out.setdefault("metrics", artifact(dsl.Metrics, "metrics")),
            confusion_matrix=out.setdefault("confusion_matrix", artifact(dsl.ClassificationMetrics, "confusion")),
            report=out.setdefault("report", artifact(dsl.HTML, "report")))),
        ("register", lambda: components.register.python_func(
            **common, lineage=out["lineage"], tokenized=out["tokenized"], prepared_model=out["prepared"],
            tuned_model=out["tuned"], evaluation=out["evaluation"],
            registered_model=out.setdefault("registered", artifact(dsl.Model, "registered")))),
    ]
    for name, step in steps:
        step()
        if name == "register":
            out["version"] = "{model_name}/{version}".format(**out["registered"].metadata)
        if name == through:
            break
    return out


def train_again(prepared: dict, storage_uri: str, node_settings: Optional[dict] = None, **train_settings) -> dict:
    """The train component as the pipeline calls it, on prepared's (run_stages') tokenized data and
    prepared model, with train_settings over prepared["config"]'s and storage at storage_uri; returns
    its training summary, with the tuned model's folder as "path". node_settings: a TrainJob's nodes
    (CPU ones: no accelerator type)."""
    from kfp import dsl

    from kubetune import components

    config = json.loads(json.dumps(prepared["config"]))
    config["train"].update(train_settings)
    config["storage"]["uri"] = storage_uri
    tuned = dsl.Model(name="tuned", uri=str(prepared["root"] / f"tuned-{time.monotonic_ns()}"), metadata={})
    components.train.python_func(config_json=json.dumps(config), run_id=prepared["run_id"],
                                 tokenized=prepared["tokenized"], prepared_model=prepared["prepared"], tuned_model=tuned,
                                 accelerator_type="", node_settings=node_settings or {})
    summary = json.loads((Path(tuned.path) / "training_summary.json").read_text())
    return {**summary, "path": Path(tuned.path)}


def losses(summary: dict) -> list[float]:
    """The training loss per logged step of a training summary."""
    return [row["loss"] for row in summary["history"] if "loss" in row]


# ---- classification: a tiny three-class sentiment set and a 2-block BERT ----------------------------

NEGATIVE = ["bad", "awful", "terrible", "poor", "boring", "broken"]
NEUTRAL = ["okay", "average", "ordinary", "plain", "standard", "usual"]
POSITIVE = ["great", "excellent", "wonderful", "superb", "lovely", "brilliant"]
NOUNS = ["film", "phone", "meal", "service", "story", "battery", "screen", "plot", "room", "staff"]
NAMES = {"0": "negative", "1": "neutral", "2": "positive"}


def sentiment_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Short reviews whose class is the sentiment word in them; labels "0"/"1"/"2" as in TweetEval."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % 3
        word = rng.choice((NEGATIVE, NEUTRAL, POSITIVE)[label])
        a, b = rng.sample(NOUNS, 2)
        text = rng.choice([f"the {a} was {word}", f"{word} {a} and a {b}", f"my {a} is {word} , the {b} too",
                           f"i found the {a} {word}"])
        rows.append({"review": text, "score": str(label)})
    return rows


def write_tsv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("review\tscore\n" + "".join(f"{r['review']}\t{r['score']}\n" for r in rows))
    return path


def build_wordpiece_tokenizer(texts: list[str], vocab_size: int = 200):
    """A BERT-style tokenizer ([CLS] text [SEP], lower-cased WordPiece) trained on texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def build_tiny_bert(path: Path) -> Path:
    """A 2-block BERT encoder saved without a task head (as all-MiniLM-L6-v2 is), with its pooler.

    Weights set by hand as a stand-in for pretraining: uniform attention, identity value and
    pooler maps make [CLS] an average of the text's word embeddings. A randomly initialised BERT's
    [CLS] barely depends on the input (its variation across texts is ~0.3% of its size), so no
    head could learn anything from it in a test's few dozen steps.
    """
    import torch
    from transformers import BertConfig, BertModel

    texts = [row["review"] for row in sentiment_rows(300)]
    tokenizer = build_wordpiece_tokenizer(texts)
    hidden = 32
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertModel(config)
    eye = torch.eye(hidden)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.normal_(0, 1)
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.zero_()  # keys stay random, so LoRA on query can learn
            layer.attention.self.value.weight.copy_(eye)
            layer.attention.output.dense.weight.copy_(3 * eye)
        model.pooler.dense.weight.copy_(eye)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- instruction and multitask: the shared data of ../shared/data, and a tiny multitask set ---------

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
YELP = SHARED / "sentiment" / "binary" / "yelp_labelled.tsv"
SEED_TASKS = SHARED / "instruction" / "multitask" / "self_instruct_seed_tasks.jsonl"
SHORT_TEMPLATE = "{instruction}\n{input}\nAnswer:\n"
GUIDE = {"text_field": "reviews", "label_field": "sentiment", "instruction": "Positive or negative?",
         "label_names": {"0": "negative", "1": "positive"}, "template": SHORT_TEMPLATE}

needs_shared = pytest.mark.skipif(not YELP.exists() or not SEED_TASKS.exists(), reason="../shared/data not present")


def multitask_rows(per_task: int = 12) -> list[dict]:
    """Self-instruct-shaped tasks with several instances each; `sentiment` has a closed answer set."""
    words = ["good", "bad", "great", "awful", "fine", "poor"]
    return [
        {"name": "sentiment", "instruction": "Is this positive or negative?",
         "instances": [{"input": f"The food was {w}.", "output": "positive" if w in ("good", "great", "fine")
                        else "negative"} for w in (words * per_task)[:per_task]]},
        {"name": "double", "instruction": "Double the number.",
         "instances": [{"input": str(i), "output": str(2 * i)} for i in range(per_task)]},
        {"name": "echo", "instruction": "Repeat the words.",
         "instances": [{"input": f"word {i} here", "output": f"word {i} here"} for i in range(per_task)]},
    ]


# ---- storage: a small file tree -------------------------------------------------------------------


def make_tree(root: Path) -> dict[str, bytes]:
    """A few files in nested folders, as an adapter or model folder holds them; {relative path: bytes}."""
    files = {"adapter_config.json": b'{"r": 8}', "weights/part-0.bin": bytes(range(256)) * 40,
             "weights/deep/x.txt": b"x"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


class SwitchableProxy:
    """A TCP proxy on loopback in front of a server, which can be switched off for a while: its
    listening socket and every open connection close, so clients get "connection refused" (and
    kept-alive connections are cut) as from a server that is down."""

    def __init__(self, target_url: str):
        parsed = urlparse(target_url)
        self.target = (parsed.hostname, parsed.port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: Optional[socket.socket] = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (close alone does not)
            listener.close()

    def down_for(self, seconds: float) -> None:
        """Down now, up again after `seconds` (in the background)."""
        self.down()
        threading.Timer(seconds, self.up).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the proxy is down
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open.update((client, upstream))
            for source, dest in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, dest), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, dest):
                with contextlib.suppress(OSError):
                    end.close()


# ---- chat: the tiny sentiment set as conversations ------------------------------------------------

def chat_rows(count: int, seed: int = 0, sharegpt: bool = False) -> list[dict]:
    """Conversations of two turns: the user gives a review, the assistant names its sentiment.
    OpenAI's {role, content} messages, or ShareGPT's {from, value}."""
    reviews = sentiment_rows(2 * count, seed)
    out = []
    for first, second in zip(reviews[::2], reviews[1::2]):
        turns = [("system", "Name the sentiment of each review.")]
        for review in (first, second):
            turns += [("user", review["review"]), ("assistant", NAMES[review["score"]])]
        if sharegpt:
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            out.append({"conversations": [{"from": names[role], "value": text} for role, text in turns]})
        else:
            out.append({"messages": [{"role": role, "content": text} for role, text in turns]})
    return out


# ---- a webhook receiver: a real HTTP server on loopback that records what it is sent -------------------


class WebhookReceiver:
    """Answers POSTs on 127.0.0.1 as an incoming webhook does and keeps each JSON body. `answers`:
    the HTTP statuses of the next replies, in order (then 200); `delay`: seconds before each reply."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[dict] = []
        self.headers: list[dict] = []
        self.answers: list[int] = []
        self.delay = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append(json.loads(body))
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                time.sleep(receiver.delay)
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/webhook-s3cr3t"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def events(self) -> list[str]:
        return [body["kubetune"]["event"] for body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
