"""Tiny real models for tests: a tokenizer trained on the test text and a few-layer decoder built
from a config, saved like any hub snapshot. This is how transformers and PEFT test their code too."""

from __future__ import annotations

import json
from pathlib import Path

QUOTES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "quotes" / "quotable_sample_quotes.json"

SHAKESPEARE = QUOTES.parents[1] / "retention" / "tinyshakespeare_input.txt"

SAMPLE_TEXTS = [
    "The only way to do great work is to love what you do.",
    "Life is what happens when you are busy making other plans.",
    "In the middle of difficulty lies opportunity.",
    "Simplicity is the ultimate sophistication.",
    "Well done is better than well said.",
    "The journey of a thousand miles begins with one step.",
    "What we think, we become.",
    "Knowledge speaks, but wisdom listens.",
]


def training_texts() -> list[str]:
    if QUOTES.exists():
        return [row["content"] for row in json.loads(QUOTES.read_text())]
    return SAMPLE_TEXTS * 20


def general_texts() -> list[str]:
    """General English to give the tiny base model some language before it is fine-tuned."""
    if SHAKESPEARE.exists():
        lines = [line for line in SHAKESPEARE.read_text().splitlines() if len(line) > 20]
        return lines[:2000]
    return SAMPLE_TEXTS * 50


def pretrain(model, tokenizer, texts: list[str], steps: int = 150, batch_size: int = 16) -> None:
    """A few hundred full-weight steps, so the base is a language model and not noise."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def write_quotes(path: Path, count: int = 64) -> Path:
    """A JSON array of quote records shaped like the shared quotes file."""
    texts = (training_texts() * 2)[:count]
    path.write_text(json.dumps([{"content": t, "author": "someone", "tags": []} for t in texts]))
    return path


def build_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_tiny_llama(path: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A Llama-architecture causal LM (q_proj/k_proj/v_proj/o_proj like Gemma) with a trained tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(training_texts())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, general_texts())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run_config(model_dir: Path, data_path: Path, **sections) -> dict:
    """A run config sized for tests: 8-bit + LoRA on the tiny model, a dozen steps."""
    config = {
        "task": "causal_lm",
        "model": {"name_or_path": str(model_dir), "quantization": "8bit",
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"path": str(data_path), "text_field": "content", "validation_fraction": 0.2, "max_length": 48},
        "train": {"batch_size": 8, "gradient_accumulation_steps": 1, "warmup_steps": 2, "max_steps": 12,
                  "learning_rate": 1.0e-2, "save_steps": 6, "seed": 0},
        "evaluate": {"max_samples": 16, "batch_size": 8, "num_generations": 2, "max_new_tokens": 6},
        "register": {"model_name": "tiny-lora"},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


def run_stages(config: dict, root: Path, through: str = "evaluate") -> dict:
    """Each component's python_func in pipeline order, with artifacts under root; returns them."""
    from kfp import dsl

    from kubetune import components

    def artifact(kind, name):
        return kind(name=name, uri=str(root / name), metadata={})

    config_json = json.dumps(config)
    out = {"run_id": components.preflight.python_func(config_json=config_json)}
    common = {"config_json": config_json, "run_id": out["run_id"]}
    steps = [
        ("prepare_data", lambda: components.prepare_data.python_func(
            **common, dataset=out.setdefault("dataset", artifact(dsl.Dataset, "dataset")))),
        ("tokenize", lambda: components.tokenize.python_func(
            **common, dataset=out["dataset"], tokenized=out.setdefault("tokenized", artifact(dsl.Dataset, "tokenized")))),
        ("prepare_model", lambda: components.prepare_model.python_func(
            **common, tokenized=out["tokenized"], prepared_model=out.setdefault("prepared", artifact(dsl.Model, "prepared")))),
        ("train", lambda: components.train.python_func(
            **common, tokenized=out["tokenized"], prepared_model=out["prepared"],
            tuned_model=out.setdefault("tuned", artifact(dsl.Model, "tuned")))),
        ("evaluate", lambda: components.evaluate.python_func(
            **common, tokenized=out["tokenized"], tuned_model=out["tuned"],
            evaluation=out.setdefault("evaluation", artifact(dsl.Artifact, "evaluation")),
            metrics=out.setdefault("metrics", artifact(dsl.Metrics, "metrics")))),
        ("register", lambda: out.setdefault("version", components.register.python_func(
            **common, tuned_model=out["tuned"], prepared_model=out["prepared"], evaluation=out["evaluation"]))),
    ]
    for name, step in steps:
        step()
        if name == through:
            break
    return out
