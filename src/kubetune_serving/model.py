"""ServedModel: what a registered version's predict does for its task kind (mlflow_model wraps it in
MLflow's PythonModel; kubetune's tests use it directly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .cells import column, text as cell_text
from .chat import chat_prompt_ids, conversation, turn_end
from .loading import load_model, load_tokenizer
from .loops import class_predictions, generate
from .prompts import build_prompt
from .retrieval import Retriever

#: Rows per forward pass when the served model predicts.
PREDICT_BATCH = 8
DEFAULT_MAX_NEW_TOKENS = 32
#: What predict returns (settings `predicts`): label names of a `text` column, or completions.
LABELS, TEXT = "labels", "text"


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
            rows = self.tokenizer([cell_text(t) for t in column(model_input, "text")], truncation=True)
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
            return [cell_text(p) for p in column(model_input, "prompt")]
        rows = len(model_input)
        fixed = (self.prompt_format.get("instruction") or "").strip()
        instructions = list(model_input["instruction"]) if "instruction" in columns else [fixed] * rows
        inputs = list(model_input["input"]) if "input" in columns else [""] * rows
        return [build_prompt(self.prompt_format["template"], cell_text(instruction) or fixed, cell_text(text),
                             self.prompt_format.get("alpaca_template"))
                for instruction, text in zip(instructions, inputs)]


