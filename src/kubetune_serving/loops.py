"""The scoring loops kubetune evaluates with and a registered model predicts with (kubetune.scoring
re-exports them): rows in batches of similar length, a classifier's argmax, greedy generation."""

from __future__ import annotations

from typing import Any, Callable, Sequence


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


