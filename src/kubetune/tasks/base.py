"""The contract every task kind fulfils; the defaults are the causal-LM behaviour.

Every stage is the same for every kind; where kinds differ, the stage asks the run's TaskKind:
the record schema (prepare_data), what the task learns from the training split and how records
become token ids (tokenize), the model class, head and collator (prepare_model, train), what is
scored on held-out rows and which metrics and samples come out of the scores (evaluate), and the
registry's promotion score and prompt format (register). The scoring itself, the same loops for
every kind, is kubetune.scoring, driven by kubetune.evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from kubetune.config import DataConfig, EvaluateConfig, RunConfig
from kubetune.errors import ConfigError
from kubetune.sources import MISSING_MARKERS, is_missing, require_fields, text_of

if TYPE_CHECKING:  # numpy is imported where it is used
    import numpy as np

#: Label of a token the loss skips (the default ignore_index of PyTorch's cross-entropy and of
#: transformers' models): prompt tokens of instruction data, padding.
IGNORE_INDEX = -100

# How kubetune.evaluation scores a kind's held-out rows.
TOKEN_LOSS = "token_loss"  # cross-entropy on each row's labelled tokens, and whether greedy decoding reproduces them
CLASSES = "classes"  # the class the sequence-classification head predicts for each row

# How forgetting is measured on general text (evaluate.retention_path).
CAUSAL_LM = "causal_lm"  # the model's own LM head: perplexity of the text
MASKED_LM = "masked_lm"  # an encoder read through its checkpoint's masked-LM pretraining head


@dataclass
class Completion:
    """A greedy completion evaluation makes with the base and the tuned model.

    prompt: the prompt as the samples show it. labelled_answer: when the row's labelled tokens are
    the continuation of prompt_ids (an instruction's answer), a model whose greedy choice already
    reproduces every one of them needs no generation: its completion is this text. stop_strings: text
    that ends the completion where the model's stop tokens do not (a chat template's end of turn).
    """

    row: int
    prompt_ids: list[int]
    max_new_tokens: int
    prompt: str = ""
    labelled_answer: Optional[str] = None
    stop_strings: list[str] = field(default_factory=list)  # text that ends the completion (a chat turn's end)


@dataclass
class Scores:
    """One model's scores on the held-out rows, as the kind's scoring mode produces them."""

    losses: list[tuple[float, int]] = field(default_factory=list)  # TOKEN_LOSS: (summed loss, tokens) per row
    greedy_exact: list[bool] = field(default_factory=list)  # TOKEN_LOSS: greedy decoding gives the labels
    classes: list[int] = field(default_factory=list)  # CLASSES: the predicted class id per row
    texts: dict[int, str] = field(default_factory=dict)  # the completions, by row

    @property
    def loss(self) -> float:
        """Token-weighted mean loss: batch size and padding do not change it."""
        return mean_loss(self.losses)


@dataclass
class Evaluation:
    """What evaluate reports: metrics (MLflow and KFP), sample generations, tables too large to be
    metrics (evaluation.json and eval/<name>.json) and figures (artifact file -> matplotlib figure)."""

    metrics: dict[str, Any]
    generations: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def label_markers(cfg: DataConfig) -> frozenset[str]:
    """The strings read as a missing label or answer (data.missing_labels; empty text always is)."""
    if cfg.missing_labels is None:
        return MISSING_MARKERS
    return frozenset({""} | {str(marker).strip().lower() for marker in cfg.missing_labels})


def require_label_field(cfg: RunConfig, holds: str) -> None:
    """A kind that learns from a labelled field (holds: what the field holds) needs data.label_field."""
    if cfg.data.label_field is None:
        raise ConfigError("data.label_field", None, f"task {cfg.task} needs the field that holds the {holds}")


def label_text(value: Any, cfg: DataConfig) -> str:
    """A value of data.label_field (a class, an answer) as text: 1 and 1.0 (from JSON) both "1"; a
    missing value (null, NaN, empty, a data.missing_labels string) is empty."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 from JSON is the label "1"
    return text_of(value, label_markers(cfg))


def mean_loss(pairs: list[tuple[float, int]]) -> float:
    return sum(loss for loss, _ in pairs) / max(1, sum(n for _, n in pairs))


def perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50.0)), 4)


def change_pct(base: float, tuned: float) -> float:
    """The tuned figure's change relative to the base figure, in percent."""
    return round(100 * (tuned / base - 1), 2)


def first_labelled(labels: list[int]) -> int:
    """The position of the first token the loss reads (len(labels) when there is none)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def causal_labels(input_ids: list[int], pad_token_id: Optional[int]) -> list[int]:
    """Every token is learned except padding (as transformers' causal-LM collator labels them)."""
    return [IGNORE_INDEX if token == pad_token_id else token for token in input_ids]


class TaskKind:
    """One kind of fine-tuning task. Subclasses override what differs."""

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    scoring = TOKEN_LOSS
    #: TOKEN_LOSS rows labelled only at their end (an answer after its prompt): scored left-padded,
    #: the LM head on the tail only (kubetune.scoring.label_losses).
    labelled_tail = False
    retention_form = CAUSAL_LM
    #: Whether evaluate.rag applies: held-out rows are a prompt and its answer, and passages can go
    #: in front of the prompt.
    retrieval = False
    #: The registry's promotion gate: the metric a new version must beat, and whether higher is better.
    registry_score = ("eval/tuned_perplexity", False)
    #: What the end-of-run summary shows (those of them the run produced), after the retention figures.
    headline_metrics = ("eval/base_perplexity", "eval/tuned_perplexity", "eval/perplexity_change_pct")

    # ---- the run's config ---------------------------------------------------------------------
    def check_config(self, cfg: RunConfig) -> None:
        """Raise ConfigError where the config asks of this kind what it cannot do. Run after each
        section's own checks (kubetune.run_config); a causal LM takes any valid config."""

    # ---- prepare_data -----------------------------------------------------------------------
    #: The columns of a prepared record (and of a replayed one): pyarrow type names, see record_schema.
    record_columns: dict[str, str] = {"text": "string"}

    def record_schema(self):
        """The Arrow schema prepared records are stored in between prepare_data and tokenize; a
        column a record does not have is null there and missing again when the record is read."""
        import pyarrow as pa

        types = {"string": pa.string(),
                 "messages": pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))}
        return pa.schema([(name, types[kind]) for name, kind in self.record_columns.items()])

    def expand(self, located: Iterable[tuple[dict[str, Any], str]]) -> Iterator[tuple[dict[str, Any], str]]:
        """The source's records as this kind's examples (one each, by default), with their origins."""
        return iter(located)

    def required_fields(self, cfg: DataConfig) -> list[tuple[str, str]]:
        """(config key, field) pairs every example must hold a value in: the data contract
        (kubetune.data) rejects or drops an example with a missing, null or NaN value there."""
        return [("data.text_field", cfg.text_field)]

    def unusable(self, key: str, value: Any, cfg: DataConfig) -> bool:
        """Whether a required field's value (key: its config key) makes no example: missing
        (kubetune.sources.is_missing; for data.label_field, data.missing_labels), or a list or
        mapping where text belongs. A number or boolean is text (kubetune.sources.text_of)."""
        markers = label_markers(cfg) if key == "data.label_field" else MISSING_MARKERS
        return is_missing(value, markers) or isinstance(value, (list, dict))

    def check_fields(self, rows: Iterable[dict[str, Any]], cfg: DataConfig) -> None:
        """Raise DataError when the records lack a field the config names. rows: a list, or a
        re-iterable source (every loop a new pass over it, never held whole)."""
        require_fields(rows, cfg, [("data.text_field", cfg.text_field)])

    def normalise(self, rows: list[dict[str, Any]], cfg: DataConfig, whole: bool = True) -> list[dict[str, Any]]:
        """Records in this kind's schema; unusable rows dropped. whole: rows are all the records (not
        one batch of many), so a kind may refuse a source none of whose records it can use."""
        out = []
        for row in rows:
            text = text_of(row.get(cfg.text_field))
            if text:
                out.append({"text": text})
        return out

    def replay_record(self, text: str) -> dict[str, Any]:
        """A line of general text (data.replay_path) as a training record of this kind."""
        return {"text": text}

    def check_splits(self, examples: Path, train: np.ndarray, validation: np.ndarray, cfg: DataConfig) -> None:
        """What only the kind can judge of how the examples fell into the splits (classification: classes
        too small to be both trained on and validated): a warning, or DataError for a split a later stage
        would refuse. examples: the Arrow file of prepared records (kubetune.artifacts.RecordWriter);
        train, validation: positions of records in it (train without replayed text)."""

    # ---- tokenize ---------------------------------------------------------------------------
    def info(self, train: Iterable[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
        """What the task learns from the training split and every later stage needs (for
        classification: the label set), in one pass over it (`train` may be a stream). Replayed
        general-text records may be among `train`; a kind whose info depends on the rows leaves them out."""
        return {}

    def encode(self, records: list[dict[str, Any]], tokenizer, cfg: DataConfig,
               info: dict[str, Any], whole: bool = True) -> dict[str, list]:
        """Token ids per text, with EOS appended so the model learns where a text ends. whole: the
        records are a whole split, so a kind may refuse one none of whose records fits (tokenize
        encodes a batch at a time and asks none_encoded once the split is done)."""
        texts = [row["text"] for row in records]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length - len(eos), add_special_tokens=True)
        ids = [row + eos for row in encoded["input_ids"]]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}

    def none_encoded(self, records: int, cfg: DataConfig) -> Optional[Exception]:
        """The error for a split of `records` records none of which encode, or None when that cannot be."""
        return None

    def check_split(self, dataset, info: dict[str, Any], cfg: DataConfig) -> None:
        """Checks of a whole prepared split (a datasets.Dataset) against the task info, before it is encoded."""

    def prepare_tokenizer(self, tokenizer, cfg: DataConfig) -> None:
        """Set up the base model's tokenizer before encoding; it is saved with the tokenized data, so
        every later stage and the served model use it as set up (chat: the chat template)."""

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

    def training_metrics(self):
        """The Trainer's compute_metrics for evaluations during training: the task's own figure where
        it is cheap from the logits, else None (the validation loss alone; no logits are gathered)."""
        return None

    # ---- evaluate ---------------------------------------------------------------------------
    def heldout_rows(self, dataset, tokenizer, cfg: EvaluateConfig) -> list[dict[str, Any]]:
        """The held-out rows evaluation scores (the first evaluate.max_samples), each with
        input_ids and, for TOKEN_LOSS, labels."""
        subset = dataset.select(range(min(cfg.max_samples, len(dataset))))
        return [{"input_ids": list(row["input_ids"]), "labels": causal_labels(row["input_ids"], tokenizer.pad_token_id)}
                for row in subset]

    def completions(self, rows: list[dict[str, Any]], info: dict[str, Any], tokenizer,
                    cfg: EvaluateConfig) -> list[Completion]:
        """Samples: the first evaluate.prompt_tokens tokens of the first held-out texts, continued."""
        out = []
        special = set(tokenizer.all_special_ids)
        for i in range(min(cfg.num_generations, len(rows))):
            prompt = tokenizer.decode([t for t in rows[i]["input_ids"] if t not in special][: cfg.prompt_tokens])
            out.append(Completion(row=i, prompt_ids=tokenizer(prompt)["input_ids"], max_new_tokens=cfg.max_new_tokens,
                                  prompt=prompt))
        return out

    def report(self, rows: list[dict[str, Any]], scores: dict[str, Scores], completions: list[Completion],
               info: dict[str, Any], tokenizer, cfg: EvaluateConfig) -> Evaluation:
        """Perplexity of both models on the same held-out tokens, and the sample continuations."""
        base, tuned = scores["base"], scores["tuned"]
        metrics = {"eval/samples": len(rows), "eval/tokens": sum(n for _, n in base.losses),
                   "eval/base_loss": round(base.loss, 5), "eval/base_perplexity": perplexity(base.loss),
                   "eval/tuned_loss": round(tuned.loss, 5), "eval/tuned_perplexity": perplexity(tuned.loss)}
        metrics["eval/perplexity_change_pct"] = change_pct(metrics["eval/base_perplexity"],
                                                          metrics["eval/tuned_perplexity"])
        generations = [{"prompt": c.prompt, "base": base.texts[c.row], "tuned": tuned.texts[c.row]} for c in completions]
        return Evaluation(metrics=metrics, generations=generations)

    def summary(self, metrics: dict[str, Any]) -> str:
        """One log line of the headline figures."""
        return ", ".join(f"{key.split('/', 1)[1]} {metrics[key]}" for key in self.headline_metrics if key in metrics)

    # ---- register ---------------------------------------------------------------------------
    def prompt_format(self, cfg: DataConfig) -> Optional[dict[str, Any]]:
        """How a served model builds prompts from its inputs, or None when it takes them as they are."""
        return None
