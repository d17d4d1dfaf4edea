"""evaluate: the base and the tuned model scored on the same held-out rows, and forgetting on general text.

The task kind says what is scored (its held-out rows, the completions to make) and what the scores
mean (metrics, samples, tables, figures); the scoring itself is kubetune.scoring, the same for
every kind. Forgetting (evaluate.retention_path) is the relative rise of the models' perplexity on
general text: through the LM head for language models, through the checkpoint's masked-LM head for
encoders that ship one. Retrieval (evaluate.rag) scores the same held-out rows again with passages
retrieved from a corpus in front of each prompt, so fine-tuning and retrieval are compared on the
same questions (kubetune.retrieval).

The base model's figures depend only on the base snapshot, how it is loaded and what is scored, so
they are kept (BaseCache, in storage under cache/base-scores/) and a later run that scores the same
rows the same way reuses them: on the demo config the base's held-out and retention passes were 43%
of the evaluate stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kubetune import retrieval
from kubetune.config import EvaluateConfig, RunConfig
from kubetune.errors import DataError, ServiceError
from kubetune.modeling import Variants, masked_lm_model
from kubetune.scoring import (class_predictions, compare, encoder_of, generate, label_losses, masked_lm_losses,
                              pad_id)
from kubetune.sources import general_text_sample
from kubetune.tasks import TaskKind
from kubetune.tasks.base import (IGNORE_INDEX, MASKED_LM, TOKEN_LOSS, Completion, Evaluation, Scores, causal_labels,
                                 change_pct, mean_loss, perplexity)
from kubetune.tasks.answer_tokens import prompt_ids
from kubetune.tasks.causal_lm import CausalLM

log = logging.getLogger(__name__)

#: Share of each retention line's tokens masked for the masked-LM figure (BERT's pretraining rate).
MASK_RATE = 0.15


@dataclass
class Retention:
    """Forgetting figures (eval/retention.*, eval/forgetting_pct) and the general-text lines they were
    measured on, or why they do not apply to this model (empty metrics)."""

    metrics: dict[str, float]
    texts: list[str]
    not_applicable: str = ""


@dataclass
class BaseCache:
    """The base model's scores by a key over everything they depend on: `identity` (the base
    snapshot's fingerprint, quantization, task, seed, kubetune version, scoring batch size) and the
    exact rows scored. Kept in a Store; None as store keeps nothing."""

    store: Any
    identity: dict[str, Any]
    reused: list[str] = field(default_factory=list)

    PREFIX = "cache/base-scores"

    def key(self, what: str, inputs: Any) -> str:
        text = json.dumps({"what": what, **self.identity, "inputs": inputs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, what: str, key: str, decode: Callable[[Any], Any]) -> Optional[Any]:
        if self.store is None:
            return None
        try:
            found = decode(json.loads(self.store.read_bytes(f"{self.PREFIX}/{key}.json")))
        except (FileNotFoundError, ServiceError, ValueError, KeyError, TypeError):
            return None
        self.reused.append(what)
        log.info("evaluate: the base model's %s figures are reused from %s", what, self.store.uri(f"{self.PREFIX}/{key}.json"))
        return found

    def put(self, key: str, value: Any) -> None:
        if self.store is None:
            return
        try:
            self.store.write_bytes(f"{self.PREFIX}/{key}.json", json.dumps(value).encode())
        except ServiceError as exc:  # a cache that cannot be written costs the next run time, not this run
            log.warning("evaluate: the base model's figures could not be kept (%s)", exc)


def _scores_from_json(data: dict[str, Any]) -> Scores:
    return Scores(losses=[(loss, n) for loss, n in data["losses"]], greedy_exact=data["greedy_exact"],
                  classes=data["classes"], texts={int(row): text for row, text in data["texts"].items()})


def _rows_key(rows: list[dict[str, Any]]) -> list[Any]:
    return [{k: list(v) if not isinstance(v, (int, float, str)) else v for k, v in row.items()} for row in rows]


def score(kind: TaskKind, model, rows: list[dict[str, Any]], completions: list[Completion], tokenizer,
          cfg: EvaluateConfig) -> Scores:
    """One model's scores in the kind's scoring mode, and its completions. A completion whose
    labelled answer the model already reproduces greedily is not generated again."""
    scores = Scores()
    if kind.scoring == TOKEN_LOSS:
        results = label_losses(model, rows, pad_id(tokenizer), cfg.batch_size, tail_only=kind.labelled_tail)
        scores.losses = [(loss, tokens) for loss, tokens, _ in results]
        scores.greedy_exact = [exact for _, _, exact in results]
    else:
        scores.classes = class_predictions(model, tokenizer, rows, cfg.batch_size)
    todo = []
    for completion in completions:
        if completion.labelled_answer is not None and scores.greedy_exact and scores.greedy_exact[completion.row]:
            scores.texts[completion.row] = completion.labelled_answer
        else:
            todo.append(completion)
    for (budget, stops), group in itertools.groupby(todo, key=lambda c: (c.max_new_tokens, tuple(c.stop_strings))):
        group = list(group)
        texts = generate(model, tokenizer, [c.prompt_ids for c in group], budget, cfg.batch_size, stops)
        scores.texts.update({c.row: text for c, text in zip(group, texts)})
    return scores


def evaluate(kind: TaskKind, variants: Variants, tokenizer, dataset, info: dict[str, Any],
             cfg: RunConfig, cache: Optional[BaseCache] = None) -> Evaluation:
    """Scores the base and the tuned model on the same held-out rows; the kind reports."""
    cache = cache or BaseCache(None, {})
    rows = kind.heldout_rows(dataset, tokenizer, cfg.evaluate)
    completions = kind.completions(rows, info, tokenizer, cfg.evaluate)
    key = cache.key("held-out", {"rows": _rows_key(rows), "info": info,
                                 "completions": [dataclasses.asdict(c) for c in completions]})
    base = cache.get("held-out", key, _scores_from_json)
    scores = compare(variants, lambda model: score(kind, model, rows, completions, tokenizer, cfg.evaluate), base)
    if base is None:
        cache.put(key, dataclasses.asdict(scores["base"]))
    result = kind.report(rows, scores, completions, info, tokenizer, cfg.evaluate)
    log.info("evaluate on %d held-out examples: %s", len(rows), kind.summary(result.metrics))
    return result


# ---- forgetting --------------------------------------------------------------------------------


def retention_texts(cfg: RunConfig) -> list[str]:
    """A seeded sample of general-text lines (evaluate.retention_path) to measure forgetting on."""
    return general_text_sample(cfg.data, cfg.storage.endpoint_url, "evaluate.retention_path",
                               cfg.evaluate.retention_path, cfg.evaluate.retention_samples, random.Random(cfg.train.seed))


def masked_inputs(tokenizer, texts: list[str], max_length: int, seed: int) -> list[dict[str, list[int]]]:
    """Each text tokenized with MASK_RATE of its (non-special) tokens replaced by the mask token,
    chosen with the seed, so base and tuned are scored on the same masks."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    rows = []
    for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]:
        candidates = [i for i, token in enumerate(ids) if token not in special]
        if not candidates:
            continue
        chosen = set(rng.sample(candidates, max(1, round(MASK_RATE * len(candidates)))))
        rows.append({"input_ids": [tokenizer.mask_token_id if i in chosen else t for i, t in enumerate(ids)],
                     "labels": [t if i in chosen else IGNORE_INDEX for i, t in enumerate(ids)]})
    return rows


def retention(kind: TaskKind, model_dir: Path, variants: Variants, tokenizer, cfg: RunConfig,
              cache: Optional[BaseCache] = None) -> Retention:
    """Perplexity on general text before and after fine-tuning; forgetting = its relative rise."""
    cache = cache or BaseCache(None, {})
    batch_size = cfg.evaluate.batch_size
    texts = retention_texts(cfg)
    if kind.retention_form == MASKED_LM:
        mlm, why_not = masked_lm_model(model_dir)
        if mlm is None:
            return Retention(metrics={}, texts=texts, not_applicable=why_not)
        rows = masked_inputs(tokenizer, texts, cfg.data.max_length, cfg.train.seed)
        what = "masked-LM perplexity"

        def scored(model):
            return masked_lm_losses(mlm, encoder_of(model.eval()), rows, tokenizer.pad_token_id, batch_size)
    else:
        encoded = CausalLM().encode([{"text": text} for text in texts], tokenizer, cfg.data, {})
        rows = [{"input_ids": ids, "labels": causal_labels(ids, tokenizer.pad_token_id)} for ids in encoded["input_ids"]]
        what = "perplexity"

        def scored(model):
            return [(loss, n) for loss, n, _ in label_losses(model, rows, pad_id(tokenizer), batch_size)]
    key = cache.key("retention", {"form": kind.retention_form, "rows": _rows_key(rows)})
    base = cache.get("retention", key, lambda data: [(loss, n) for loss, n in data])
    losses = compare(variants, scored, base)
    if base is None:
        cache.put(key, losses["base"])
    base, tuned = perplexity(mean_loss(losses["base"])), perplexity(mean_loss(losses["tuned"]))
    log.info("retention: %s %.2f -> %.2f on %d general lines (%d scored tokens)", what, base, tuned, len(rows),
             sum(n for _, n in losses["base"]))
    return Retention(metrics={"eval/retention.base_perplexity": base, "eval/retention.tuned_perplexity": tuned,
                              "eval/retention.samples": len(rows), "eval/forgetting_pct": change_pct(base, tuned)},
                     texts=texts)


# ---- retrieval beside fine-tuning ------------------------------------------------------------------


@dataclass
class Retrieved:
    """evaluate.rag's figures and samples, and its index with what a served model needs to use it."""

    evaluation: Evaluation
    index: retrieval.Index
    settings: dict[str, Any]


def rag_evaluate(kind: TaskKind, variants: Variants, tokenizer, dataset, info: dict[str, Any],
                 cfg: RunConfig, store: Any = None) -> Retrieved:
    """The held-out rows scored again, base and tuned, with the evaluate.rag.top_k passages nearest
    to each prompt put in front of it (evaluate.rag.template): metrics as evaluate's, named
    eval/rag.*, plus the retrieval's own (answer hit rate, passages, index and query seconds)."""
    rag = cfg.evaluate.rag
    passages = retrieval.load_passages(rag, cfg.data, cfg.storage.endpoint_url)
    embedder = retrieval.load_embedder(rag, cfg.storage.endpoint_url)
    index = retrieval.build_index(passages, embedder, store)
    rows = kind.heldout_rows(dataset, tokenizer, cfg.evaluate)
    prompts = [tokenizer.decode(prompt_ids(row), skip_special_tokens=True) for row in rows]
    found, query_seconds = retrieval.retrieve(index, embedder, prompts, rag.top_k)
    contexts = [[index.passages[i] for i in hits] for hits in found]
    records = [{"prompt": retrieval.with_context(rag.template, context, prompt), "answer": row["answer"],
                "task": row["task"]} for row, context, prompt in zip(rows, contexts, prompts)]
    room = dataclasses.replace(cfg.data, max_length=cfg.data.max_length + rag.context_tokens)
    columns = kind.encode(records, tokenizer, room, info)
    if len(columns["input_ids"]) != len(records):
        raise DataError("evaluate.rag.context_tokens", rag.context_tokens,
                        f"{len(records) - len(columns['input_ids'])} held-out answers no longer fit with their "
                        "passages; raise evaluate.rag.context_tokens or lower evaluate.rag.top_k")
    from datasets import Dataset

    result = evaluate(kind, variants, tokenizer, Dataset.from_dict(columns), info, cfg)
    metrics = {f"eval/rag.{key.split('/', 1)[1]}": value for key, value in result.metrics.items()}
    hits = [retrieval.contains_answer(context, row["answer"]) for context, row in zip(contexts, rows)]
    metrics.update({"eval/rag.hit_rate": round(sum(hits) / max(1, len(hits)), 4), "eval/rag.passages": len(passages),
                    "eval/rag.index_seconds": round(index.build_seconds, 2), "eval/rag.index_reused": int(index.reused),
                    "eval/rag.query_seconds": round(query_seconds, 3)})
    generations = [{**sample, "passages": contexts[i]} for i, sample in enumerate(result.generations)]
    log.info("retrieval: %d passages indexed in %.1f s, %d queries in %.2f s, answer in the passages for %.0f%%: %s",
             len(passages), index.build_seconds, len(prompts), query_seconds, 100 * metrics["eval/rag.hit_rate"],
             kind.summary(result.metrics))
    settings = {"template": rag.template, "top_k": rag.top_k, "embedding_model": rag.embedding_model,
                "embedding_model_path": embedder.location, "corpus": rag.corpus_path or cfg.data.path}
    return Retrieved(Evaluation(metrics=metrics, generations=generations, tables={
        f"rag_{name}": table for name, table in result.tables.items()}), index, settings)
