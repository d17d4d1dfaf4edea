"""The scoring engine on a causal LM: a loss must not depend on how rows are batched or padded."""

import json
import math

import pytest
import torch

from kubetune.scoring import label_losses
from kubetune.tasks.base import causal_labels, mean_loss
from kubetune.tokenization import load_tokenizer
from tiny import training_texts


@pytest.fixture(scope="module")
def left_padding_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that asks for left padding, as Gemma 3's converted one does."""
    import shutil

    path = tmp_path_factory.mktemp("left_padding") / "model"
    shutil.copytree(tiny_model_dir, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["padding_side"] = "left"
    config_file.write_text(json.dumps(config))
    return path


def test_loaded_tokenizer_pads_on_the_right(left_padding_model_dir):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(left_padding_model_dir).padding_side == "left"
    assert load_tokenizer(left_padding_model_dir).padding_side == "right"


@pytest.mark.parametrize("tail_only", [False, True], ids=["right-padded", "left-padded-tail"])
def test_perplexity_is_the_same_in_padded_batches_and_one_row_at_a_time(left_padding_model_dir, tail_only):
    """Rows of very different lengths: a batch of 8 pads the short ones; the token-weighted loss,
    padded on either side, equals the loss of each row scored alone and the model's own loss."""
    from datasets import Dataset

    from kubetune.modeling import load_base_model

    tokenizer = load_tokenizer(left_padding_model_dir)
    texts = [text for text in training_texts()][:16]
    texts = [text if i % 2 else " ".join(text.split()[:3]) for i, text in enumerate(texts)]  # short and long rows
    dataset = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=48)))
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert max(lengths) >= 2 * min(lengths), "the batch must really be padded"
    model = load_base_model(left_padding_model_dir, "none")
    rows = [{"input_ids": ids, "labels": causal_labels(ids, tokenizer.pad_token_id)} for ids in dataset["input_ids"]]
    batched = label_losses(model, rows, tokenizer.pad_token_id, batch_size=8, tail_only=tail_only)
    alone = label_losses(model, rows, tokenizer.pad_token_id, batch_size=1, tail_only=tail_only)
    tokens = [n for _, n, _ in batched]
    assert tokens == [n for _, n, _ in alone] == [n - 1 for n in lengths]
    loss = mean_loss([(value, n) for value, n, _ in batched])
    assert loss == pytest.approx(mean_loss([(value, n) for value, n, _ in alone]), abs=1e-4)
    with torch.no_grad():
        total = sum(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * (len(ids) - 1)
                    for ids in dataset["input_ids"])
    assert math.exp(loss) == pytest.approx(math.exp(total / sum(tokens)), rel=1e-3)
