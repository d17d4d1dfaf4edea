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

The loop, class_predictions and generate live in kubetune_serving.loops, the package a registered
version is served with where kubetune is not installed, and are re-exported here: a served model
predicts with the very code evaluation scored it with.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from kubetune_serving.loops import class_predictions, generate, pad_id, per_row, stop_tokens  # noqa: F401 (re-exported)

from kubetune.tasks.base import IGNORE_INDEX, first_labelled

T = TypeVar("T")


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

    tail_only: only the end of each row is labelled (an answer after its prompt; a chat's answers
    after its first prompt); the rows are then left-padded and the LM head runs on that tail only.
    Otherwise rows are padded as training pads them. (The two paddings differ in the last digits on quantized models: bitsandbytes' 8-bit
    matmul sees the padding rows too; measured on Gemma 270M 8-bit, 16 quotes: loss 4.0021 one row
    at a time, 3.9919 right-padded and 3.9765 left-padded in batches of 8. Each kind keeps its
    padding, so its figures stay comparable across versions.)"""
    import torch

    def score_batch(model, chunk, device):
        if tail_only:
            input_ids, mask, positions, labels = (t.to(device) for t in left_padded(chunk, pad))
            # from the one before the first labelled position (it predicts the first labelled token)
            # to the end; a chat row's unlabelled user turns between its answers are in that tail
            longest = max(len(row["labels"]) - first_labelled(row["labels"]) for row in chunk)
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
