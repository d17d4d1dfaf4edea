"""Held-out evaluation: the base and the tuned model scored on the same examples, plus generations."""

from __future__ import annotations

import logging
import math
from typing import Any

from kubetune.config import EvaluateConfig, RunConfig

log = logging.getLogger(__name__)


def heldout_loss(model, tokenizer, dataset, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy per predicted token over the dataset, and its perplexity.

    Token-weighted (not a mean of batch means), so batch size and padding do not change the figure.
    """
    import torch
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                       labels.reshape(-1), ignore_index=-100, reduction="sum")
            total_loss += losses.item()
            total_tokens += int((labels != -100).sum())
    loss = total_loss / max(total_tokens, 1)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 4), "tokens": total_tokens}


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions, one prompt at a time (no padding side effects)."""
    import torch

    device = next(model.parameters()).device
    outputs = []
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            ids = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outputs.append(tokenizer.decode(ids[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs


def prompts_from(dataset, tokenizer, cfg: EvaluateConfig) -> list[str]:
    """The first few tokens of the first held-out texts."""
    prompts = []
    for i in range(min(cfg.num_generations, len(dataset))):
        ids = [t for t in dataset[i]["input_ids"] if t not in tokenizer.all_special_ids][: cfg.prompt_tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def evaluate(base_model, tuned_model, tokenizer, dataset, cfg: EvaluateConfig) -> dict[str, Any]:
    """Scores the base and the tuned model on the same held-out examples.

    base_model and tuned_model are context managers that yield a model, so one PeftModel can serve
    both (the base is the same model inside `disable_adapter()`) and nothing is loaded twice.
    """
    subset = dataset.select(range(min(cfg.max_samples, len(dataset))))
    prompts = prompts_from(subset, tokenizer, cfg)
    scores, texts = {}, {}
    for name, variant in (("base", base_model), ("tuned", tuned_model)):
        with variant as model:
            scores[name] = heldout_loss(model, tokenizer, subset, cfg.batch_size)
            texts[name] = generate(model, tokenizer, prompts, cfg.max_new_tokens)
    base, tuned = scores["base"], scores["tuned"]
    metrics = {"eval.samples": len(subset), "eval.tokens": base["tokens"],
               "eval.base_loss": base["loss"], "eval.base_perplexity": base["perplexity"],
               "eval.tuned_loss": tuned["loss"], "eval.tuned_perplexity": tuned["perplexity"],
               "eval.perplexity_change_pct": round(100 * (tuned["perplexity"] / base["perplexity"] - 1), 2)}
    generations = [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, texts["base"], texts["tuned"])]
    log.info("evaluate: base perplexity %.2f -> tuned %.2f", base["perplexity"], tuned["perplexity"])
    return {"metrics": metrics, "generations": generations}


def retention_texts(cfg: RunConfig) -> list[str]:
    """A seeded sample of general-text lines (evaluate.retention_path) to measure forgetting on."""
    import random

    from kubetune.data import general_text_lines

    usable = general_text_lines(cfg.data, cfg.storage.endpoint_url, "evaluate.retention_path",
                                cfg.evaluate.retention_path)
    return random.Random(cfg.train.seed).sample(usable, min(cfg.evaluate.retention_samples, len(usable)))


def retention(base_model, tuned_model, tokenizer, cfg: RunConfig) -> dict[str, float]:
    """Perplexity on general text before and after fine-tuning; forgetting = its relative rise."""
    from datasets import Dataset

    from kubetune.tasks.causal_lm import CausalLM

    records = [{"text": text} for text in retention_texts(cfg)]
    dataset = Dataset.from_dict(CausalLM().encode(records, tokenizer, cfg.data, {}))
    scores = {}
    for name, variant in (("base", base_model), ("tuned", tuned_model)):
        with variant as model:
            scores[name] = heldout_loss(model, tokenizer, dataset, cfg.evaluate.batch_size)
    base, tuned = scores["base"]["perplexity"], scores["tuned"]["perplexity"]
    log.info("retention: perplexity %.2f -> %.2f on %d general lines", base, tuned, len(records))
    return {"eval.retention.base_perplexity": base, "eval.retention.tuned_perplexity": tuned,
            "eval.retention.samples": len(records), "eval.forgetting_pct": round(100 * (tuned / base - 1), 2)}


#: Share of each retention line's tokens masked for the masked-LM figure (BERT's pretraining rate).
MASK_RATE = 0.15


def masked_lm_model(model_dir) -> tuple[Any, str]:
    """(the checkpoint as a masked-LM: encoder + its pretraining head, "") or (None, why not): the
    checkpoint may not ship that head (sentence encoders such as all-MiniLM-L6-v2 do not) or its
    architecture may have no masked-LM form (decoders)."""
    import transformers
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(model_dir)
    if type(config) not in AutoModelForMaskedLM._model_mapping:
        return None, f"{config.model_type} has no masked-LM form, and a classification model keeps no LM head"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the missing-head warning is expected; it is what we check
    try:
        model, loading = AutoModelForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    encoder = model.base_model_prefix + "."
    missing = sorted(key for key in loading["missing_keys"] if not key.startswith(encoder))
    if missing:
        return None, (f"the checkpoint ships no masked-LM head ({missing[0]} and {len(missing) - 1} more missing), "
                      "so the encoder's general-language skill cannot be scored")
    return model.eval(), ""


def masked_inputs(tokenizer, texts: list[str], max_length: int, seed: int) -> list[dict[str, list[int]]]:
    """Each text tokenized with MASK_RATE of its (non-special) tokens replaced by the mask token,
    chosen with the seed, so base and tuned are scored on the same masks."""
    import random

    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    rows = []
    for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]:
        candidates = [i for i, token in enumerate(ids) if token not in special]
        if not candidates:
            continue
        chosen = set(rng.sample(candidates, max(1, round(MASK_RATE * len(candidates)))))
        rows.append({"input_ids": [tokenizer.mask_token_id if i in chosen else t for i, t in enumerate(ids)],
                     "labels": [t if i in chosen else -100 for i, t in enumerate(ids)]})
    return rows


def _encoder_of(model):
    """The bare encoder inside a classification model, PEFT-wrapped or not."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def masked_lm_loss(mlm, encoder, rows: list[dict[str, list[int]]], pad: int, batch_size: int) -> dict[str, float]:
    """Masked-token cross-entropy of `encoder` read through the checkpoint's masked-LM head.

    The encoder (base, or tuned: adapters, unfrozen blocks, or full weights) replaces the masked-LM
    model's own; a head tied to the input embeddings is re-tied to the encoder's, which full
    fine-tuning may have changed."""
    import torch

    original = getattr(mlm, mlm.base_model_prefix)
    tied = mlm.get_output_embeddings() is not None and \
        mlm.get_output_embeddings().weight is original.get_input_embeddings().weight
    head_weight = mlm.get_output_embeddings().weight if tied else None
    embeddings = encoder.get_input_embeddings().weight
    mlm.to(device=embeddings.device, dtype=embeddings.dtype)
    setattr(mlm, mlm.base_model_prefix, encoder)
    if tied:
        mlm.get_output_embeddings().weight = embeddings
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                width = max(len(row["input_ids"]) for row in chunk)
                ids = torch.tensor([row["input_ids"] + [pad] * (width - len(row["input_ids"])) for row in chunk])
                labels = torch.tensor([row["labels"] + [-100] * (width - len(row["labels"])) for row in chunk])
                mask = (torch.arange(width)[None, :] < torch.tensor([len(r["input_ids"]) for r in chunk])[:, None])
                logits = mlm(input_ids=ids.to(embeddings.device),
                             attention_mask=mask.long().to(embeddings.device)).logits.float()
                total_loss += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), labels.to(logits.device).reshape(-1),
                    ignore_index=-100, reduction="sum").item()
                total_tokens += int((labels != -100).sum())
    finally:
        setattr(mlm, mlm.base_model_prefix, original)
        if tied:
            mlm.get_output_embeddings().weight = head_weight
    loss = total_loss / max(total_tokens, 1)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 4), "tokens": total_tokens}


def masked_lm_retention(mlm, base_model, tuned_model, tokenizer, cfg: RunConfig) -> dict[str, float]:
    """Forgetting for an encoder: masked-LM perplexity on general text through the checkpoint's
    pretraining head, with the encoder before and after fine-tuning."""
    rows = masked_inputs(tokenizer, retention_texts(cfg), cfg.data.max_length, cfg.train.seed)
    scores = {}
    for name, variant in (("base", base_model), ("tuned", tuned_model)):
        with variant as model:
            model.eval()
            scores[name] = masked_lm_loss(mlm, _encoder_of(model), rows, tokenizer.pad_token_id,
                                          cfg.evaluate.batch_size)
    base, tuned = scores["base"]["perplexity"], scores["tuned"]["perplexity"]
    log.info("retention: masked-LM perplexity %.2f -> %.2f on %d general lines (%d masked tokens)", base, tuned,
             len(rows), scores["base"]["tokens"])
    return {"eval.retention.base_perplexity": base, "eval.retention.tuned_perplexity": tuned,
            "eval.retention.samples": len(rows), "eval.forgetting_pct": round(100 * (tuned / base - 1), 2)}
