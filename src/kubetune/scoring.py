"""The scoring engine: every batched forward pass and greedy generation that evaluation and serving run.

One loop (`per_row`) holds what every score shares: the model in eval mode, no gradients, rows in
batches, one result per row. On it:

- label_losses: the cross-entropy of each row's labelled tokens (labels != IGNORE_INDEX), and
  whether greedy decoding reproduces them. Causal-LM text (every token labelled), instruction
  answers and the retention text all go through it. Where only the tail is labelled (answers), rows
  are left-padded with their positions counted from their first real token, so the tails line up at
  the end and the LM head runs on those positions only (`logits_to_keep`): with Gemma's 262k
  vocabulary the head costs more than the layers.
- class_predictions: the argmax class of a sequence-classification head, right-padded as in training.
- masked_lm_losses: an encoder read through a masked-LM pretraining head (forgetting of encoders).
- generate: greedy completions of token-id prompts, left-padded in batches (evaluation samples and
  the registered model's predict).
- compare: one score of the base and of the tuned model, each variant entered once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

from kubetune.tasks.base import IGNORE_INDEX

T = TypeVar("T")


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def per_row(model, rows: Sequence[Any], batch_size: int, score_batch: Callable[[Any, list, Any], list]) -> list:
    """score_batch(model, batch_rows, device) -> one result per row, over every batch."""
    import torch

    device = next(model.parameters()).device
    out: list = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            out.extend(score_batch(model, list(rows[start:start + batch_size]), device))
    return out


def compare(variants, score: Callable[[Any], T], base: Optional[T] = None) -> dict[str, T]:
    """{"base": score(base model), "tuned": score(tuned model)} on whatever `score` reads.
    variants.base / variants.tuned are factories of context managers that yield a model. `base`,
    when given (the base model's scores from an earlier run), is used instead of scoring it again."""
    results = {}
    for name, variant in (("base", variants.base), ("tuned", variants.tuned)):
        if name == "base" and base is not None:
            results[name] = base
            continue
        with variant() as model:
            results[name] = score(model)
    return results


def left_padded(rows: list[dict[str, Any]], pad: int):
    """input_ids, attention_mask, position_ids and labels with the padding on the left, so every
    row's labelled tail ends at the last position (positions count real tokens only, as unpadded)."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    gaps = [width - len(row["input_ids"]) for row in rows]
    input_ids = torch.tensor([[pad] * gap + list(row["input_ids"]) for gap, row in zip(gaps, rows)])
    mask = torch.tensor([[0] * gap + [1] * len(row["input_ids"]) for gap, row in zip(gaps, rows)])
    # nothing precedes a row's first token, so its label is never predicted (as in training's shift)
    labels = torch.tensor([[IGNORE_INDEX] * (gap + 1) + list(row["labels"][1:]) for gap, row in zip(gaps, rows)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions, labels


def right_padded(rows: list[dict[str, Any]], pad: int):
    """input_ids, attention_mask and labels (shifted: the label each position predicts) padded on the
    right, exactly as training batches are."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    gaps = [width - len(row["input_ids"]) for row in rows]
    input_ids = torch.tensor([list(row["input_ids"]) + [pad] * gap for gap, row in zip(gaps, rows)])
    mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * gap for gap, row in zip(gaps, rows)])
    labels = torch.tensor([list(row["labels"][1:]) + [IGNORE_INDEX] * (gap + 1) for gap, row in zip(gaps, rows)])
    return input_ids, mask, labels


def token_losses(logits, labels):
    """Cross-entropy per position (0 where the label is IGNORE_INDEX), shaped like labels. The
    softmax runs over contiguous rows of the vocabulary: a strided layout sums Gemma's 262k
    exponentials in another order and moves a loss by about 2e-4."""
    import torch

    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(labels.shape)


def label_losses(model, rows: list[dict[str, Any]], pad: int, batch_size: int,
                 tail_only: bool = False) -> list[tuple[float, int, bool]]:
    """(summed cross-entropy, labelled tokens, greedy-exact) per row. greedy-exact: the argmax at
    every labelled position is the label, i.e. greedy decoding reproduces the labelled tokens.

    tail_only: only the end of each row is labelled (an answer after its prompt); the rows are then
    left-padded and the LM head runs on the labelled tail only. Otherwise rows are padded as training
    pads them. (The two paddings differ in the last digits on quantized models: bitsandbytes' 8-bit
    matmul sees the padding rows too; measured on Gemma 270M 8-bit, 16 quotes: loss 4.0021 one row
    at a time, 3.9919 right-padded and 3.9765 left-padded in batches of 8. Each kind keeps its
    padding, so its figures stay comparable across versions.)"""
    import torch

    def score_batch(model, chunk, device):
        if tail_only:
            input_ids, mask, positions, labels = (t.to(device) for t in left_padded(chunk, pad))
            # the labelled positions plus the one before each (it predicts the first labelled token)
            longest = max(sum(label != IGNORE_INDEX for label in row["labels"]) for row in chunk)
            keep = min(input_ids.shape[1], longest + 1)
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits[:, -keep:-1].float()
            labels = labels[:, -(keep - 1):]
        else:
            input_ids, mask, labels = (t.to(device) for t in right_padded(chunk, pad))
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            labels = labels[:, :-1]
        losses = token_losses(logits, labels)
        exact = ((logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(dim=1)
        return list(zip(losses.sum(dim=1).tolist(), (labels != IGNORE_INDEX).sum(dim=1).tolist(), exact.tolist()))

    return per_row(model, rows, batch_size, score_batch)


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


def encoder_of(model):
    """The bare encoder inside a classification model, PEFT-wrapped or not."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def masked_lm_losses(mlm, encoder, rows: list[dict[str, list[int]]], pad: int,
                     batch_size: int) -> list[tuple[float, int]]:
    """(summed masked-token cross-entropy, masked tokens) per row, of `encoder` read through the
    masked-LM head of `mlm`.

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

    def score_batch(mlm, chunk, device):
        width = max(len(row["input_ids"]) for row in chunk)
        ids = torch.tensor([row["input_ids"] + [pad] * (width - len(row["input_ids"])) for row in chunk])
        labels = torch.tensor([row["labels"] + [IGNORE_INDEX] * (width - len(row["labels"])) for row in chunk])
        mask = torch.arange(width)[None, :] < torch.tensor([len(row["input_ids"]) for row in chunk])[:, None]
        logits = mlm(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits.float()
        labels = labels.to(logits.device)
        losses = token_losses(logits, labels)
        return list(zip(losses.sum(dim=1).tolist(), (labels != IGNORE_INDEX).sum(dim=1).tolist()))

    try:
        return per_row(mlm, rows, batch_size, score_batch)
    finally:
        setattr(mlm, mlm.base_model_prefix, original)
        if tied:
            mlm.get_output_embeddings().weight = head_weight


def stop_tokens(model, tokenizer) -> list[int]:
    """The tokenizer's EOS (what training appends) and whatever the model's own generation config
    stops at (Gemma: <end_of_turn> too)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None})


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of token-id prompts, left-padded in batches; the new text only."""
    import torch

    pad, stop = pad_id(tokenizer), stop_tokens(model, tokenizer)

    def score_batch(model, chunk, device):
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        ids = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=stop)
        return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in ids]

    return per_row(model, prompts, batch_size, score_batch)
