"""The contract every task kind fulfils. Defaults here are the causal-LM behaviour."""

from __future__ import annotations

from typing import Any, Optional

from kubetune.config import DataConfig, RunConfig


class TaskKind:
    """One kind of fine-tuning task.

    `info` is what a task learns from the training data and every later stage needs (for
    classification: the label set). prepare_data writes it beside the splits as task_info.json;
    tokenize copies it into the tokenized artifact, which every later stage reads.
    """

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"

    # ---- prepare_data -----------------------------------------------------------------------
    def check_fields(self, rows: list[dict[str, Any]], cfg: DataConfig) -> None:
        """Raise DataError when the records lack a field the config names."""
        from kubetune.data import require_fields

        require_fields(rows, cfg, [("data.text_field", cfg.text_field)])

    def normalise(self, rows: list[dict[str, Any]], cfg: DataConfig) -> list[dict[str, Any]]:
        """Records in this kind's schema; unusable rows dropped."""
        out = []
        for row in rows:
            text = str(row.get(cfg.text_field) or "").strip()
            if text:
                out.append({"text": text})
        return out

    def info(self, train: list[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
        return {}

    def replay_record(self, text: str) -> dict[str, Any]:
        """A line of general text (data.replay_path) as a training record of this kind."""
        return {"text": text}

    # ---- tokenize ---------------------------------------------------------------------------
    def encode(self, records: list[dict[str, Any]], tokenizer, cfg: DataConfig,
               info: dict[str, Any]) -> dict[str, list]:
        """Token ids per text, with EOS appended so the model learns where a text ends."""
        texts = [row["text"] for row in records]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length - len(eos), add_special_tokens=True)
        ids = [row + eos for row in encoded["input_ids"]]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}

    # ---- prepare_model / train --------------------------------------------------------------
    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self, info: dict[str, Any]) -> dict[str, Any]:
        return {}

    def trained_head(self, model) -> Optional[list[str]]:
        """Names of freshly initialised modules that must train in full (and never be quantized)."""
        return None

    def collator(self, tokenizer):
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)

    def train_order(self, dataset, cfg: RunConfig) -> Optional[list[int]]:
        """Indices of the tokenized train split in the order training must read them, or None to
        let the Trainer shuffle (kinds with task weights or a schedule return an order)."""
        return None

    # ---- evaluate ---------------------------------------------------------------------------
    def evaluate(self, base_model, tuned_model, tokenizer, dataset, info: dict[str, Any],
                 cfg: RunConfig) -> dict[str, Any]:
        """{"metrics": {...}, "generations": [...], "figures": {artifact_file: matplotlib figure}}"""
        from kubetune.evaluation import evaluate

        return evaluate(base_model, tuned_model, tokenizer, dataset, cfg.evaluate)

    def retention(self, model_dir, base_model, tuned_model, tokenizer, cfg: RunConfig) -> dict[str, float] | str:
        """Forgetting: the base and tuned models scored on general text (evaluate.retention_path),
        or why that does not apply to this model. base_model/tuned_model are context managers."""
        from kubetune.evaluation import retention

        return retention(base_model, tuned_model, tokenizer, cfg)
