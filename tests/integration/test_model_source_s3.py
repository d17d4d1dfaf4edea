"""resolve_model on s3:// snapshots served by a real S3 API (moto's server on loopback): downloaded
once into the cache, refused without config.json. (Local folders, packages, hub ids and the URI
checks that need no server: tests/unit/test_model_source.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.errors import ModelError
from kubetune.model_source import resolve_model


def _tiny_causal_lm(path: Path) -> Path:
    """A 2-layer Llama with hidden size 32 and a word-level tokenizer, as save_pretrained writes them."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "the", "model", "is", "small", "and", "fast"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _upload_dir(client, local: Path, bucket: str, prefix: str) -> None:
    for file in sorted(local.rglob("*")):
        if file.is_file():
            client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(local).as_posix()}")


def test_s3_snapshot_is_downloaded_once_and_loads(kubetune_home, s3_server, s3_bucket, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = _tiny_causal_lm(tmp_path / "tiny")
    client = s3_server.client()
    _upload_dir(client, local, s3_bucket, "models/tiny-llama")
    uri = f"s3://{s3_bucket}/models/tiny-llama"

    path = resolve_model(uri, endpoint_url=s3_server.endpoint_url)
    assert path == kubetune_home / "cache" / "models" / "s3" / s3_bucket / "models" / "tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(path)
    original = AutoModelForCausalLM.from_pretrained(local)
    for (name, value), (_, expected) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(value, expected), name
    assert AutoTokenizer.from_pretrained(path)("the model is small").input_ids == [4, 5, 6, 7]

    # The second resolve is served from the cache: the bucket may be empty by now.
    for item in client.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        client.delete_object(Bucket=s3_bucket, Key=item["Key"])
    assert resolve_model(uri + "/", endpoint_url=s3_server.endpoint_url) == path


def test_s3_prefix_without_config_json_is_refused_and_not_cached(kubetune_home, s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="models/broken/model.safetensors", Body=b"x")
    uri = f"s3://{s3_bucket}/models/broken"
    with pytest.raises(ModelError, match="no config.json under this prefix"):
        resolve_model(uri, endpoint_url=s3_server.endpoint_url)
    assert not (kubetune_home / "cache" / "models" / "s3" / s3_bucket / "models" / "broken").exists()
