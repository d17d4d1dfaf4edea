"""served_model: the code of every registered version, loaded by MLflow without kubetune.

registry.register logs this file as an MLflow "model from code": the version holds the file, the
`adapter` artifact (the trained LoRA adapter, or the full trained weights without LoRA, with the
tokenizer, and a chat model's template, beside it), the `settings` artifact (settings.json: the
base model, quantization, task info, prompt format, the model class and its config overrides) and,
from a run with evaluate.rag, the `retrieval` artifact (passages and their vectors). MLflow executes the file in
the loading process, so it imports the standard library, mlflow, pandas, torch, transformers and
peft only (bitsandbytes when installed), never kubetune: kubetune is on no package index, and a
CloudPickled kubetune class could not be loaded anywhere kubetune was not installed.

The base model is not in the registry (a 6.7B base would be 13 GB per version). It is loaded from
the first of:

1. $KUBETUNE_BASE_MODEL_PATH, a local folder holding the base snapshot (set it where the base is
   somewhere else than at registration, e.g. a serving container with the base mounted);
2. settings `base_model_path`, the folder the base was resolved to at registration, if it exists;
3. settings `base_model` as configured, when it is a local folder or a hub id (transformers
   downloads it). `package:` and `s3://` bases need kubetune to resolve: set the variable.

A base trained on in 8-bit or 4-bit is loaded that way when bitsandbytes imports, else at full
precision with one warning: the adapter works on either; the predictions then differ from the
evaluated ones by the base's quantization error (see the README's export section for its size).

One implementation: kubetune scores and serves with the functions here. kubetune.scoring
re-exports per_row, pad_id, stop_tokens, class_predictions and generate, and
kubetune.tasks.prompts builds its prompts with build_prompt, so the served model batches,
generates and builds prompts exactly as evaluation did. Two pieces are copies, kept minimal:

- the tokenizer set-up (load_tokenizer, 4 lines of kubetune.tokenization.load_tokenizer): moving it
  means changing kubetune.tokenization, outside the change that made this file; tests/integration/
  test_serving.py checks the two set the same pad token and padding side;
- the model loading of kubetune.modeling.load_base_model / load_tuned (dtype, bitsandbytes config,
  device placement). The task-kind decisions in it (model class, config overrides such as
  id2label and pad_token_id, modules kept out of quantization) come from kubetune's TaskKind, and
  reach this file as data in settings.json, as registration computed them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger(__name__)

#: Where the base model is when it is not where the settings say (see the module docstring).
BASE_MODEL_ENV = "KUBETUNE_BASE_MODEL_PATH"
#: Rows per forward pass when the served model predicts.
PREDICT_BATCH = 8
DEFAULT_MAX_NEW_TOKENS = 32
#: What predict returns (settings `predicts`): label names of a `text` column, or completions.
LABELS, TEXT = "labels", "text"
ALPACA_INPUT_CLAUSE = ", paired with an input that provides further context"


# ---- the scoring loops kubetune evaluates with (re-exported by kubetune.scoring) --------------------

def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _length(row: Any) -> int:
    return len(row["input_ids"]) if isinstance(row, dict) else len(row)


def per_row(model, rows: Sequence[Any], batch_size: int, score_batch: Callable[[Any, list, Any], list]) -> list:
    """score_batch(model, batch_rows, device) -> one result per row, in the rows' order.

    Batches hold rows of similar length (rows sorted by token count), so little of a batch is
    padding: on Gemma's 262k vocabulary every padded position still costs a full row of logits.
    Measured on the demo's evaluate (8-bit Gemma 270M, 2 cores): see kubetune.evaluation."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: _length(rows[i]))
    out: list = [None] * len(rows)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, result in zip(chunk, score_batch(model, [rows[i] for i in chunk], device)):
                out[i] = result
    return out


def class_predictions(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> list[int]:
    """The argmax class id of each row, padded like training."""
    from transformers import DataCollatorWithPadding

    config = model.config
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id  # a decoder's head finds the last real token by it
    collator = DataCollatorWithPadding(tokenizer=tokenizer)

    def score_batch(model, chunk, device):
        batch = collator([{"input_ids": row["input_ids"], "attention_mask": row["attention_mask"]} for row in chunk])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        return logits.argmax(-1).tolist()

    return per_row(model, rows, batch_size, score_batch)


def stop_tokens(model, tokenizer) -> list[int]:
    """The tokenizer's EOS (what training appends) and whatever the model's own generation config
    stops at (Gemma: <end_of_turn> too)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None})


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             stop_strings: Sequence[str] = ()) -> list[str]:
    """Greedy completions of token-id prompts, left-padded in batches; the new text only, cut at the
    first of stop_strings (a chat template's end of turn that is no single stop token)."""
    import torch

    pad, stop = pad_id(tokenizer), stop_tokens(model, tokenizer)
    stops = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}

    def score_batch(model, chunk, device):
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        ids = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=stop, **stops)
        return [_cut(tokenizer.decode(row[width:], skip_special_tokens=True), stop_strings) for row in ids]

    return per_row(model, prompts, batch_size, score_batch)


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    for marker in stop_strings:
        text = text.split(marker, 1)[0]
    return text


# ---- chat: conversations as training labelled them and as a served model prompts with them ---------

ASSISTANT = "assistant"
#: Message roles as chat templates know them, from OpenAI's (role) and ShareGPT's (from) names.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": ASSISTANT, "gpt": ASSISTANT,
         "model": ASSISTANT, "bot": ASSISTANT}
_PROBE = "kubetune-turn-probe-7f3a"


def message(item: Any) -> dict[str, str]:
    """One message as {role, content}, from OpenAI's {role, content} or ShareGPT's {from, value};
    content given as parts ([{type: text, text}]) is joined. ValueError names an unknown role."""
    if not isinstance(item, dict):
        raise ValueError(f"a message must be a mapping with role and content, not {type(item).__name__}")
    role = str(item.get("role", item.get("from", ""))).strip().lower()
    if role not in ROLES:
        raise ValueError(f"message role {role!r} is none of {', '.join(ROLES)}")
    content = item.get("content", item.get("value"))
    if isinstance(content, dict):
        raise ValueError("a message's content must be text (or a list of text parts), not a mapping")
    if isinstance(content, list):
        content = "".join(part.get("text") or "" if isinstance(part, dict) else str(part) for part in content)
    return {"role": ROLES[role], "content": _text(content).strip()}


def conversation(value: Any) -> list[dict[str, str]]:
    """A conversation cell as a list of messages: a list (or array) of messages, or its JSON text."""
    if isinstance(value, str):
        value = json.loads(value)
    if value is None or isinstance(value, (dict, str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"a conversation must be a list of messages, not {type(value).__name__}")
    return [message(item) for item in value]


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_pieces(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
                ) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, learned) pieces: what the template writes
    before the first message, then one piece per message, each assistant message preceded by its
    generation prompt (the "model\n" header). Learned are the assistant messages, with the template's
    end of turn, so a model learns to answer and to stop. Each piece is the difference between the
    renderings of two prefixes of the conversation; ValueError when a template renders a prefix as
    something other than the start of the longer conversation."""
    try:
        done = render_chat(tokenizer, [])
    except Exception:  # templates that read messages[0]
        done = ""
    pieces = [(done, False)] if done else []

    def extend(text: str, learned: bool, through: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise ValueError(f"the chat template's rendering of the first {through} messages does not start with its "
                             "rendering of fewer, so the turns cannot be told apart")
        if len(text) > len(done):
            pieces.append((text[len(done):], learned))
        done = text

    for i, message in enumerate(messages):
        if message["role"] == ASSISTANT:
            extend(render_chat(tokenizer, messages[:i], add_generation_prompt=True), False, i)
        extend(render_chat(tokenizer, messages[: i + 1]), message["role"] == ASSISTANT, i + 1)
    if add_generation_prompt:
        extend(render_chat(tokenizer, messages, add_generation_prompt=True), False, len(messages))
    return pieces


def chat_ids(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(token ids, index of the piece each token comes from). Each piece is tokenized alone, adding
    no special tokens (the template writes its own), so a turn's tokens never merge with the next
    turn's; BOS goes first where the tokenizer starts every text with it and the template did not."""
    ids: list[int] = []
    owner: list[int] = []
    for number, (text, _) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        owner.extend([number] * len(piece))
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids, owner = [bos, *ids], [-1, *owner]
    return ids, owner


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation's token ids followed by the generation prompt of the assistant's next turn."""
    return chat_ids(tokenizer, chat_pieces(tokenizer, messages, add_generation_prompt=True))[0]


def turn_end(tokenizer) -> Optional[str]:
    """What the chat template writes after an assistant message (ChatML: <|im_end|>), or None."""
    text = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": ASSISTANT, "content": _PROBE}])
    end = text[text.index(_PROBE) + len(_PROBE):].strip() if _PROBE in text else ""
    return end or None


def build_prompt(template: str, instruction: str, input_text: str, alpaca_template: Optional[str] = None) -> str:
    """The prompt the answer follows. `alpaca` is the Stanford Alpaca prompt (alpaca_template, with
    {instruction}, {input_clause} and {input_block}), with its input block only when there is an
    input; any other template is a format string of {instruction} and {input}."""
    if template == "alpaca":
        if alpaca_template is None:
            raise ValueError("the `alpaca` template needs the Alpaca prompt text (settings prompt_format.alpaca_template)")
        if input_text:
            return alpaca_template.format(instruction=instruction, input_clause=ALPACA_INPUT_CLAUSE,
                                          input_block=f"### Input:\n{input_text}\n\n")
        return alpaca_template.format(instruction=instruction, input_clause="", input_block="")
    return template.format(instruction=instruction, input=input_text)


# ---- retrieval: what evaluate.rag measured, served the same way ----------------------------------

#: Texts per forward pass of the embedding model.
EMBED_BATCH = 64
#: Where the embedding model is when it is not where the settings say (as BASE_MODEL_ENV).
EMBEDDING_MODEL_ENV = "KUBETUNE_EMBEDDING_MODEL_PATH"


class Embedder:
    """Sentence embeddings with a transformers encoder: pooled over real tokens, L2-normalised."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.location = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        pooling = model_dir / "1_Pooling" / "config.json"
        settings = json.loads(pooling.read_text()) if pooling.is_file() else {}
        self.cls = bool(settings.get("pooling_mode_cls_token"))
        bert = model_dir / "sentence_bert_config.json"
        limit = json.loads(bert.read_text()).get("max_seq_length") if bert.is_file() else None
        self.max_length = int(limit or min(512, getattr(self.model.config, "max_position_embeddings", 512)))

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        out = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like length: little padding
        with torch.no_grad():
            for start in range(0, len(texts), EMBED_BATCH):
                batch = self.tokenizer([texts[i] for i in order[start:start + EMBED_BATCH]], padding=True,
                                       truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                if self.cls:
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        vectors = np.empty((len(texts), out[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(out)
        return vectors


def nearest(queries, vectors, k: int) -> list[list[int]]:
    """The k rows of vectors nearest each query (dot product: cosine for normalised rows), nearest first."""
    import numpy as np

    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k].tolist()


def with_context(template: str, passages: list[str], prompt: str) -> str:
    """The prompt with its retrieved passages (one a line) in front, as evaluate.rag.template says."""
    return template.format(passages="\n".join(passages), prompt=prompt)


class Retriever:
    """A registered version's retrieval: its passages and their vectors (the `retrieval` artifact, as
    evaluation indexed them) and the embedding model, from $KUBETUNE_EMBEDDING_MODEL_PATH or where it
    was at registration."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        import numpy as np

        self.passages = json.loads((folder / "passages.json").read_text())
        self.vectors = np.load(folder / "vectors.npy")
        self.template, self.top_k = settings["template"], int(settings["top_k"])
        location = os.environ.get(EMBEDDING_MODEL_ENV, "").strip() or settings["embedding_model_path"]
        if not (Path(location).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"the embedding model is not at {location!r}; set {EMBEDDING_MODEL_ENV} to a local "
                                    f"folder holding {settings.get('embedding_model')!r}")
        self.embedder = Embedder(Path(location).expanduser())

    def __call__(self, prompts: list[str]) -> list[str]:
        found = nearest(self.embedder(prompts), self.vectors, self.top_k)
        return [with_context(self.template, [self.passages[i] for i in hits], prompt)
                for hits, prompt in zip(found, prompts)]


# ---- loading ------------------------------------------------------------------------------------

def load_tokenizer(folder: Path):
    """As kubetune.tokenization.load_tokenizer: EOS pads when the tokenizer has no pad token, and
    padding is on the right as in training (scoring and generation pass their own positions)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _is_hub_id(value: str) -> bool:
    # As kubetune.model_source: hub ids are `name` or `org/name`; anything else is a path or a URI.
    return bool(value) and ":" not in value and value.count("/") <= 1 and not value.startswith((".", "~", "/"))


def base_model_location(settings: dict[str, Any]) -> str:
    """The local folder (or hub id) to load the base model from: see the module docstring."""
    override = os.environ.get(BASE_MODEL_ENV, "").strip()
    if override:
        if not (Path(override).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"{BASE_MODEL_ENV}={override} is not a model folder (no config.json there); "
                                    f"point it at the base model {settings.get('base_model')!r}")
        return str(Path(override).expanduser())
    recorded = settings.get("base_model_path")
    if recorded and (Path(recorded) / "config.json").is_file():
        return recorded
    configured = str(settings.get("base_model", "")).strip()
    if configured and (Path(configured).expanduser() / "config.json").is_file():
        return str(Path(configured).expanduser())
    if _is_hub_id(configured):
        return configured
    raise FileNotFoundError(
        f"the base model {configured!r} is not here (at registration it was at {recorded!r}); set {BASE_MODEL_ENV} "
        "to a local folder holding it (a `package:` or `s3://` base needs kubetune to fetch it)")


def _load_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained's arguments: the task's config overrides and, as training loaded the base,
    the quantization (fp32 compute on the CPU, bf16 or fp16 on a GPU) with the task head kept out."""
    import torch

    kwargs: dict[str, Any] = {"dtype": torch.float32, **(settings.get("model_kwargs") or {})}
    quantization = settings.get("quantization", "none")
    if quantization not in ("8bit", "4bit"):
        return kwargs
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        log.warning("bitsandbytes is not installed: loading the base at full precision, not %s as trained (the "
                    "adapter works on it; predictions differ by the base's quantization error)", quantization)
        return kwargs
    from transformers import BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    compute = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    skip = settings.get("unquantized_modules")
    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    return {**kwargs, "dtype": compute, "quantization_config": config, "device_map": {"": 0 if cuda else "cpu"}}


def load_model(settings: dict[str, Any], adapter_dir: Path):
    """The base plus the adapter (PeftModel), or the full trained weights when trained without LoRA."""
    import torch
    import transformers

    auto = getattr(transformers, settings.get("model_class", "AutoModelForCausalLM"))
    kwargs = _load_kwargs(settings)
    if not settings.get("lora", True):
        model = auto.from_pretrained(adapter_dir, **kwargs)
    else:
        base = base_model_location(settings)
        try:
            model = auto.from_pretrained(base, **kwargs)
        except OSError as exc:  # a hub id that is neither cached nor reachable
            raise OSError(f"could not load the base model {base!r} ({exc}); set {BASE_MODEL_ENV} to a local folder "
                          "holding it") from exc
    if "quantization_config" not in kwargs:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    if settings.get("lora", True):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def _column(model_input, name: str) -> list:
    """A DataFrame's column, or a plain list of strings as it is."""
    return list(model_input[name]) if hasattr(model_input, "columns") else list(model_input)


def _text(value: Any) -> str:
    """A cell as text; a missing cell (None, NaN from JSON null) is empty; a number or boolean is the
    text JSON writes for it (42, 0.5, true), as training read it (kubetune.sources.text_of)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (bool, float)):
        return json.dumps(value)
    return str(value)


class ServedModel:
    """The registered model: classification returns the label name of each string in a `text`
    column; the language-model kinds complete the strings in a `prompt` column, instruction models
    also take `instruction` (and optional `input`) columns and build the prompt with the template
    they were trained on, and chat models answer the conversation in each `messages` cell with the
    chat template they were trained with. The `max_new_tokens` param bounds each completion. A
    version registered from a run with evaluate.rag retrieves as evaluation did: the passages
    nearest each prompt go in front of it (the `retrieve` param, true by default, turns it off)."""

    retriever: Optional[Retriever] = None

    def load(self, artifacts: dict[str, str]) -> None:
        """artifacts: MLflow's local paths of the `adapter` folder, the `settings` file and, with
        retrieval, the `retrieval` folder."""
        self.settings = json.loads(Path(artifacts["settings"]).read_text())
        adapter = Path(artifacts["adapter"])
        self.tokenizer = load_tokenizer(adapter)
        self.model = load_model(self.settings, adapter)
        self.predicts = self.settings.get("predicts", TEXT)
        self.id2label = (self.settings.get("task_info") or {}).get("id2label", {})
        self.max_new_tokens = int(self.settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.prompt_format = self.settings.get("prompt_format")
        retrieval = self.settings.get("retrieval")
        self.retriever = Retriever(Path(artifacts["retrieval"]), retrieval) if retrieval else None

    @property
    def chat(self) -> bool:
        """A chat model: it answers `messages` conversations with its chat template."""
        return bool((self.prompt_format or {}).get("chat"))

    def serve(self, model_input, params: Optional[dict[str, Any]] = None) -> list[str]:
        if self.predicts == LABELS:
            rows = self.tokenizer([_text(t) for t in _column(model_input, "text")], truncation=True)
            ids = class_predictions(self.model, self.tokenizer, [
                {"input_ids": ids, "attention_mask": mask} for ids, mask in zip(rows["input_ids"], rows["attention_mask"])
            ], PREDICT_BATCH)
            return [self.id2label.get(str(i), str(i)) for i in ids]
        limit = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        if self.chat and "messages" in set(getattr(model_input, "columns", [])):
            prompts = [chat_prompt_ids(self.tokenizer, conversation(cell)) for cell in model_input["messages"]]
            end = turn_end(self.tokenizer)
            return generate(self.model, self.tokenizer, prompts, limit, PREDICT_BATCH, [end] if end else [])
        texts = self.prompts(model_input)
        if self.retriever is not None and (params or {}).get("retrieve", True):
            texts = self.retriever(texts)
        prompts = [self.tokenizer(prompt)["input_ids"] for prompt in texts]
        return generate(self.model, self.tokenizer, prompts, limit, PREDICT_BATCH)

    def prompts(self, model_input) -> list[str]:
        columns = set(getattr(model_input, "columns", []))
        if not self.prompt_format or self.chat or "prompt" in columns or not columns & {"instruction", "input"}:
            return [_text(p) for p in _column(model_input, "prompt")]
        rows = len(model_input)
        fixed = (self.prompt_format.get("instruction") or "").strip()
        instructions = list(model_input["instruction"]) if "instruction" in columns else [fixed] * rows
        inputs = list(model_input["input"]) if "input" in columns else [""] * rows
        return [build_prompt(self.prompt_format["template"], _text(instruction) or fixed, _text(text),
                             self.prompt_format.get("alpaca_template"))
                for instruction, text in zip(instructions, inputs)]


# kubetune imports this module for the functions above, and there neither mlflow may be imported
# (building the CLI's parser imports no heavy library) nor MLflow's model global be set. MLflow
# executes the file under a module name of its own (code_model_<uuid>): only then is the model set.
if __name__ != "kubetune.served_model":
    import mlflow.models
    import mlflow.pyfunc
    import pandas as pd

    class MlflowServedModel(ServedModel, mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.load(context.artifacts)

        # A DataFrame hint: MLflow infers no signature from it (registration gives one) and stops
        # asking for type hints.
        def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> list[str]:
            return self.serve(model_input, params)

    mlflow.models.set_model(MlflowServedModel())
