"""classification: a new classification head on a pretrained encoder or decoder (sentiment, topics).

Records are {"text", "label"} with the label kept as the raw string of data.label_field ("0",
"1", "positive"). The label set comes from the training split; its order fixes the class ids:
numeric labels in numeric order ("2" before "10"), others alphabetically after them. Readable
names come from data.label_names, else from a mapping.txt beside the data (TweetEval ships one:
lines "0<TAB>negative"), else the raw labels; they are stored in the model config (id2label), so
the saved model names its predictions.

The head (BERT's `classifier`, GPT-2/Llama/Gemma's `score`) is freshly initialised: it trains in
full with or without LoRA and stays out of 8-bit/4-bit quantization. Evaluation reports accuracy,
macro-F1, per-class precision/recall/F1 and confusion matrices for the base (untrained head: near
chance) and the tuned model, next to the majority-class baseline from the training labels.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from kubetune.config import DataConfig, EvaluateConfig, RunConfig
from kubetune.errors import ConfigError, DataError, ModelError
from kubetune.sources import label_names_beside, require_fields, text_of
from kubetune.tasks.base import (CLASSES, MASKED_LM, Completion, Evaluation, Scores, TaskKind, label_text,
                                 require_label_field)
from kubetune.tracking import metric_key

log = logging.getLogger(__name__)


def label_order(labels) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), then the others alphabetically."""
    def key(label: str):
        try:
            number = float(label)
        except ValueError:
            number = math.nan
        return (0, number, label) if math.isfinite(number) else (1, 0.0, label)

    return sorted(set(labels), key=key)


def label_names(labels: list[str], cfg: DataConfig) -> list[str]:
    """A readable name per label: data.label_names, else mapping.txt, else the raw label."""
    if cfg.label_names:
        missing = [label for label in labels if label not in cfg.label_names]
        if missing:
            raise DataError("data.label_names", cfg.label_names,
                            f"no name for label(s) {', '.join(missing)}; name every label in the data "
                            f"({', '.join(labels)}), or drop data.label_names to use the raw labels")
        names = [str(cfg.label_names[label]) for label in labels]
        source = "data.label_names"
    else:
        table = label_names_beside(cfg.path)
        names = [table.get(label, label) for label in labels]
        source = "mapping.txt beside the data" if table else "the raw labels"
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise DataError("data.label_names", dict(zip(labels, names)),
                        f"names from {source} are not distinct ({', '.join(duplicated)}); give each label its own name")
    return names


class Classification(TaskKind):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    scoring = CLASSES
    retention_form = MASKED_LM
    registry_score = ("eval/tuned_macro_f1", True)
    headline_metrics = ("eval/base_accuracy", "eval/tuned_accuracy", "eval/base_macro_f1", "eval/tuned_macro_f1",
                        "eval/majority_accuracy", "eval/majority_macro_f1")

    def check_config(self, cfg: RunConfig) -> None:
        require_label_field(cfg, "label")
        if cfg.data.replay_fraction != 0:
            raise ConfigError("data.replay_fraction", cfg.data.replay_fraction, "replay mixes general text into "
                              "language-model training; a classifier has no use for it")

    # ---- prepare_data -----------------------------------------------------------------------
    record_columns = {"text": "string", "label": "string"}

    def required_fields(self, cfg: DataConfig) -> list[tuple[str, str]]:
        return [("data.text_field", cfg.text_field), ("data.label_field", cfg.label_field)]

    def check_fields(self, rows: Iterable[dict[str, Any]], cfg: DataConfig) -> None:
        require_fields(rows, cfg, [("data.text_field", cfg.text_field), ("data.label_field", cfg.label_field)])
        if all(not label_text(row.get(cfg.label_field), cfg) for row in rows):
            raise DataError("data.label_field", cfg.label_field, "every record has an empty value in this field")

    def normalise(self, rows: list[dict[str, Any]], cfg: DataConfig, whole: bool = True) -> list[dict[str, Any]]:
        """{"text", "label"}; whitespace runs become one space (the UCI IMDb file holds U+0085
        line breaks, which a line-based reader would split records on)."""
        out = []
        for row in rows:
            text, label = " ".join(text_of(row.get(cfg.text_field)).split()), label_text(row.get(cfg.label_field), cfg)
            if text and label:
                out.append({"text": text, "label": label})
        return out

    def check_splits(self, examples: Path, train, validation, cfg: DataConfig) -> None:
        """Classes too small for the split. A class with no row in validation is never scored: a
        warning names such classes (at most NAMED_CLASSES, then how many more) with their example
        counts; one with a single example cannot be both trained on and validated. A class only in
        validation cannot be learned: DataError now rather than at tokenize. Counted from the label
        column a batch at a time, with one byte a row saying its split."""
        trained, held_out = split_label_counts(examples, train, validation)
        if trained is None or len(trained) > max(20, int(sum(trained.values())) // 2):
            return  # too many distinct labels: info refuses the field as free text
        unlearned = [label for label in label_order(held_out) if not trained.get(label)]
        if unlearned:
            raise DataError("data.label_field", cfg.label_field,
                            f"label(s) {named(unlearned, held_out)} have all their examples in the validation "
                            "split and none in training, so the model cannot learn them; add examples of them (a "
                            "class needs 2 to be both trained on and validated) or drop those rows")
        unscored = [label for label in label_order(trained) if not held_out.get(label)]
        if unscored:
            single = " (a class with a single example cannot be both trained on and validated)" \
                if any(trained[label] == 1 for label in unscored) else ""
            log.warning("data: %d class(es) have no row in the validation split, so their scores are never "
                        "measured: %s%s; add examples of them, or raise data.validation_fraction", len(unscored),
                        named(unscored, trained), single)

    def info(self, train: Iterable[dict[str, Any]], cfg: DataConfig,
             heldout: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        """The label set of the training split, its names and counts (for the majority baseline).

        heldout (validation/test records), when given, may only hold labels seen in training.
        """
        counts: dict[str, int] = {}
        for row in train:
            counts[row["label"]] = counts.get(row["label"], 0) + 1
        labels = label_order(counts)
        if len(labels) < 2:
            raise DataError("data.label_field", cfg.label_field,
                            f"the training data holds only the label(s) {labels}; classification needs at "
                            "least two classes")
        rows = sum(counts.values())
        if len(labels) > max(20, rows // 2):
            raise DataError("data.label_field", cfg.label_field,
                            f"{len(labels)} distinct labels in {rows} training rows: this looks like a "
                            "free-text field; name the field that holds the class")
        if heldout:
            check_known_labels(heldout, labels, cfg)
        names = label_names(labels, cfg)
        return {"labels": labels,
                "id2label": {str(i): name for i, name in enumerate(names)},
                "label2id": {name: i for i, name in enumerate(names)},
                "label_counts": {label: counts[label] for label in labels}}

    # ---- tokenize ---------------------------------------------------------------------------
    def check_split(self, dataset, info: dict[str, Any], cfg: DataConfig) -> None:
        """Every label of a held-out split was seen in training (Arrow's distinct values, no pass in Python)."""
        check_known_labels([{"label": label} for label in dataset.unique("label")], info["labels"], cfg)

    def encode(self, records: list[dict[str, Any]], tokenizer, cfg: DataConfig,
               info: dict[str, Any], whole: bool = True) -> dict[str, list]:
        """Token ids (truncated to data.max_length, the tokenizer's own special tokens) and the
        class id of each record as an int: the loss needs ids, never the label strings."""
        check_known_labels(records, info["labels"], cfg)
        ids = {label: i for i, label in enumerate(info["labels"])}
        encoded = tokenizer([row["text"] for row in records], truncation=True, max_length=cfg.max_length)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": [ids[row["label"]] for row in records]}

    # ---- prepare_model / train --------------------------------------------------------------
    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, info: dict[str, Any]) -> dict[str, Any]:
        """Config overrides: the head's size and label names (saved with the model), and the pad
        id the collator pads with (GPT-2/Llama configs have none; the model needs it to find the
        last real token of each row)."""
        if not info:
            return {}
        id2label = {int(i): name for i, name in info["id2label"].items()}
        kwargs: dict[str, Any] = {"num_labels": len(id2label), "id2label": id2label,
                                  "label2id": {name: i for i, name in id2label.items()},
                                  "problem_type": "single_label_classification"}
        if info.get("pad_token_id") is not None:
            kwargs["pad_token_id"] = info["pad_token_id"]
        return kwargs

    def trained_head(self, model) -> Optional[list[str]]:
        """The modules outside the pretrained base model (model.base_model_prefix): BERT's
        `classifier`, GPT-2/Llama/Gemma's `score`, RoBERTa's `classifier` (dense + out_proj),
        DeBERTa's `pooler` and `classifier`. Without a base-model prefix: the top-level module that
        holds the output layer (a Linear with num_labels outputs)."""
        import torch

        if hasattr(model, "get_base_model"):  # a PeftModel
            model = model.get_base_model()
        base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
        if isinstance(base, torch.nn.Module) and base is not model:
            head = [name for name, child in model.named_children()
                    if child is not base and next(child.parameters(), None) is not None]
        else:
            num_labels = getattr(model.config, "num_labels", None)
            head = sorted({name.split(".", 1)[0] for name, module in model.named_modules()
                           if isinstance(module, torch.nn.Linear) and module.out_features == num_labels})
        if not head:
            raise ModelError("task", self.name, f"could not find the classification head of {type(model).__name__}; "
                             "use a model that AutoModelForSequenceClassification supports")
        return head

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer=tokenizer)

    def training_metrics(self):
        def accuracy(prediction) -> dict[str, float]:
            import numpy as np

            predicted = np.asarray(prediction.predictions).argmax(-1)
            return {"accuracy": round(float((predicted == np.asarray(prediction.label_ids)).mean()), 4)}

        return accuracy

    # ---- evaluate ---------------------------------------------------------------------------
    def heldout_rows(self, dataset, tokenizer, cfg: EvaluateConfig) -> list[dict[str, Any]]:
        subset = dataset.select(range(min(cfg.max_samples, len(dataset))))
        return [{"input_ids": list(row["input_ids"]), "attention_mask": list(row["attention_mask"]),
                 "labels": int(row["labels"])} for row in subset]

    def completions(self, rows, info, tokenizer, cfg: EvaluateConfig) -> list[Completion]:
        return []

    def report(self, rows: list[dict[str, Any]], scores: dict[str, Scores], completions: list[Completion],
               info: dict[str, Any], tokenizer, cfg: EvaluateConfig) -> Evaluation:
        """Base and tuned predictions scored against the truth and against always predicting the
        most frequent training label."""
        import numpy as np

        names = [info["id2label"][str(i)] for i in range(len(info["labels"]))]
        truth = np.asarray([row["labels"] for row in rows], dtype=np.int64)
        predicted = {variant: np.asarray(scores[variant].classes, dtype=np.int64) for variant in ("base", "tuned")}
        counts = info["label_counts"]
        majority = max(range(len(info["labels"])), key=lambda i: counts[info["labels"][i]])
        predicted["majority"] = np.full_like(truth, majority)

        measured = {k: scores_from(confusion_matrix(truth, v, len(names))) for k, v in predicted.items()}
        metrics: dict[str, float] = {"eval/samples": len(rows)}
        for variant in ("base", "tuned", "majority"):
            metrics[f"eval/{variant}_accuracy"] = measured[variant]["accuracy"]
            metrics[f"eval/{variant}_macro_f1"] = measured[variant]["macro_f1"]
        for variant in ("base", "tuned"):
            for measure in ("precision", "recall", "f1"):
                for name, value in zip(names, measured[variant][measure]):
                    metrics[f"eval/{variant}_{measure}.{metric_key(name)}"] = value
        for name, value in zip(names, measured["tuned"]["support"]):
            metrics[f"eval/support.{metric_key(name)}"] = value

        examples = [{"text": tokenizer.decode(rows[i]["input_ids"], skip_special_tokens=True),
                     "label": names[truth[i]], "base": names[predicted["base"][i]],
                     "tuned": names[predicted["tuned"][i]]}
                    for i in range(min(cfg.num_generations, len(rows)))]
        figures = {f"plots/confusion_matrix_{v}.png": confusion_figure(measured[v]["confusion"], names, v,
                                                                       measured[v]["accuracy"])
                   for v in ("base", "tuned")}
        confusion = {"labels": names, "rows": "true label", "columns": "predicted label",
                     **{v: measured[v]["confusion"].tolist() for v in ("base", "tuned")}}
        return Evaluation(metrics=metrics, generations=examples, tables={"confusion_matrix": confusion},
                          figures=figures)


#: A warning names at most this many classes, then says how many more.
NAMED_CLASSES = 5
#: Distinct labels split_label_counts counts before it gives up (a free-text field, which info refuses).
COUNTED_LABELS = 10_000


def named(labels: list[str], counts: dict[str, int]) -> str:
    """'a' (1 example), 'b' (3 examples) ... and N more."""
    shown = ", ".join(f"{label!r} ({counts[label]} example{'s' if counts[label] != 1 else ''})"
                      for label in labels[:NAMED_CLASSES])
    return shown + (f" and {len(labels) - NAMED_CLASSES} more" if len(labels) > NAMED_CLASSES else "")


def split_label_counts(examples: Path, train, validation) -> tuple[Optional[dict[str, int]], dict[str, int]]:
    """Rows per label in the training and the validation positions of the prepared records' Arrow
    file, read a batch at a time; (None, {}) beyond COUNTED_LABELS distinct labels."""
    import numpy as np
    import pyarrow as pa

    rows = int(max(train.max(initial=-1), validation.max(initial=-1))) + 1
    split = np.zeros(rows, dtype=np.int8)  # 1: train, 2: validation
    split[train], split[validation] = 1, 2
    codes: dict[str, int] = {}
    counts = np.zeros((3, 0), dtype=np.int64)  # rows per (split, label code)
    start = 0
    with pa.OSFile(str(examples)) as source:
        for batch in pa.ipc.open_stream(source):
            if start >= rows:
                break
            encoded = batch.column("label").dictionary_encode()
            into = np.asarray([codes.setdefault(label, len(codes)) for label in encoded.dictionary.to_pylist()]
                              + [-1], dtype=np.int64)  # the batch's codes -> ours; a null label (-1) -> -1
            if len(codes) > COUNTED_LABELS:
                return None, {}
            label = into[encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)]
            where = np.zeros(len(label), dtype=np.int64)
            part = split[start:start + len(label)]
            where[: len(part)] = part
            start += len(label)
            keep, width = (label >= 0) & (where > 0), len(codes)
            counts = np.pad(counts, ((0, 0), (0, width - counts.shape[1])))
            counts += np.bincount(where[keep] * width + label[keep], minlength=3 * width).reshape(3, width)
    labels = list(codes)
    return ({labels[i]: int(n) for i, n in enumerate(counts[1]) if n},
            {labels[i]: int(n) for i, n in enumerate(counts[2]) if n})


def check_known_labels(records: list[dict[str, Any]], labels: list[str], cfg: DataConfig) -> None:
    unknown = label_order({row["label"] for row in records} - set(labels))
    if unknown:
        raise DataError("data.label_field", cfg.label_field,
                        f"label(s) {', '.join(unknown)} appear in the held-out data but not in the training "
                        f"data (labels {', '.join(labels)}); the model cannot learn them: add training examples "
                        "of them or drop those rows")


# ---- metrics: a few lines of numpy instead of a scikit-learn dependency --------------------------
def confusion_matrix(truth, predicted, num_classes: int):
    """Counts: row = true class, column = predicted class."""
    import numpy as np

    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def scores_from(matrix) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and macro-F1 from a confusion matrix.

    A ratio with a zero denominator counts as 0 (as scikit-learn's zero_division=0). Macro-F1
    averages over the classes that occur in the truth or the predictions (scikit-learn's default
    label set), so a class absent from a small evaluation set does not count as a failure.
    """
    import numpy as np

    matrix = np.asarray(matrix, dtype=np.float64)
    hits, predicted, actual = np.diag(matrix), matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    seen = (predicted + actual) > 0
    total = matrix.sum()

    def rounded(values):
        return [round(float(v), 5) for v in values]

    return {"accuracy": round(float(hits.sum() / total), 5) if total else 0.0,
            "macro_f1": round(float(f1[seen].mean()), 5) if seen.any() else 0.0,
            "precision": rounded(precision), "recall": rounded(recall), "f1": rounded(f1),
            "support": [int(v) for v in actual], "confusion": matrix.astype(np.int64)}


def confusion_figure(matrix, names: list[str], variant: str, accuracy: float):
    """A labelled heat map with the count in every cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.6 * len(names)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    ticks = range(len(names))
    axis.set_xticks(ticks, names, rotation=45 if max(len(n) for n in names) > 6 else 0, ha="right")
    axis.set_yticks(ticks, names)
    axis.set_xlabel("predicted label")
    axis.set_ylabel("true label")
    axis.set_title(f"Confusion matrix, {variant} (accuracy {accuracy:.3f})")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in ticks:
        for col in ticks:
            axis.text(col, row, str(int(matrix[row, col])), ha="center", va="center",
                      color="white" if matrix[row, col] > threshold else "black")
    figure.tight_layout()
    return figure
