"""Batches that waste nothing: grouping by length changes which examples share a batch, never what a
batch's loss means, and the padding the batches held is counted."""

import pytest
import torch

from kubetune.tasks import get_task
from kubetune.tokenization import load_tokenizer
from kubetune.training import TokenCounter


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_the_loss_of_a_padded_batch_is_the_token_weighted_mean_of_its_examples(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    collator = get_task("causal_lm").collator(tokenizer)
    texts = ["a short one", "a rather longer sentence about the weather today", "mid length text here"]
    features = [{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]]
    with torch.no_grad():
        batch = collator(features)
        batch_loss = float(model(**batch).loss)
        per_example = []
        for feature in features:
            single = collator([feature])
            labelled = int((single["labels"][:, 1:] != -100).sum())  # targets after the shift
            per_example.append((float(model(**single).loss), labelled))
    weighted = sum(loss * n for loss, n in per_example) / sum(n for _, n in per_example)
    assert batch_loss == pytest.approx(weighted, rel=1e-5)
    assert len({n for _, n in per_example}) == 3  # the lengths differ, so padding was there to leak in


def test_padding_is_counted_as_the_model_sees_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    collator = get_task("causal_lm").collator(tokenizer)
    counter = TokenCounter()
    handle = counter.attach(model)
    ids = tokenizer(["one two three four five six", "one"])["input_ids"]
    with torch.no_grad():
        model(**collator([{"input_ids": row} for row in ids]))
    handle.remove()
    longest = max(len(row) for row in ids)
    assert counter.tokens == sum(len(row) for row in ids) and counter.positions == 2 * longest


def test_grouped_batches_hold_similar_lengths():
    """The sampler the Trainer uses under train.group_by_length: on lengths spread like the quotes',
    a batch of 8 pads far less than under random order."""
    import random

    from transformers.trainer_pt_utils import LengthGroupedSampler

    rng = random.Random(0)
    lengths = [rng.randint(8, 64) for _ in range(400)]
    torch.manual_seed(0)
    grouped = list(LengthGroupedSampler(8, lengths=lengths))
    shuffled = rng.sample(range(400), 400)

    def padding(order):
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        positions = sum(8 * max(lengths[i] for i in batch) for batch in batches)
        return 1 - sum(lengths) / positions

    assert sorted(grouped) == list(range(400))
    assert padding(grouped) < 0.1 < padding(shuffled)
