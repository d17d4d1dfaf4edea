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
