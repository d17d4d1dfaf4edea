"""On a CUDA device: the guide's recipe (8-bit base + LoRA, and 4-bit QLoRA) trains and scores on the GPU;
with 2 or more devices, FSDP against DDP.

What only a GPU shows: bitsandbytes' CUDA kernels, mixed precision picked by train.precision auto
(bf16 where supported, else fp16), the model placed on the device by prepare_model, and the scoring
engine's batched forward and generate on CUDA tensors. Skipped, saying why, without a CUDA device;
run with `pytest -m gpu`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_lora_on_a_quantized_base_trains_and_scores_on_the_gpu(quantization, tiny_model_dir, quotes_file, tmp_path):
    from safetensors.torch import load_file
    from tiny import run_stages, tiny_run_config

    from kubetune import artifacts

    config = tiny_run_config(tiny_model_dir, quotes_file, model={"quantization": quantization},
                             train={"precision": "auto", "max_steps": 8, "save_steps": 4})
    out = run_stages(config, tmp_path, through="evaluate")

    plan = artifacts.read_plan(Path(out["prepared"].path))
    assert plan["device"] == "cuda" and plan["quantization"] == quantization
    summary = artifacts.read_training_summary(Path(out["tuned"].path))
    assert summary["steps"] == 8 and summary["train_loss_last"] is not None
    before = load_file(artifacts.initial_adapter_dir(Path(out["prepared"].path)) / "adapter_model.safetensors")
    after = load_file(Path(out["tuned"].path) / "adapter_model.safetensors")
    changed = [name for name in before if "lora_B" in name and not torch.equal(before[name], after[name])]
    assert changed, "no LoRA weight changed in training"

    metrics = json.loads((Path(out["evaluation"].path) / artifacts.EVALUATION).read_text())["metrics"]
    assert metrics["eval/tuned_perplexity"] < metrics["eval/base_perplexity"]


def test_batched_generate_on_the_gpu_matches_one_prompt_at_a_time(tiny_model_dir):
    """Left padding with the attention mask leaves greedy completions unchanged on CUDA kernels too
    (full precision: 8-bit matmul lets padding rows move the numbers)."""
    from kubetune.modeling import load_base_model
    from kubetune.scoring import generate
    from kubetune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_base_model(tiny_model_dir, "none", "causal_lm")
    assert next(model.parameters()).is_cuda
    prompts = [tokenizer(text)["input_ids"] for text in ("The only way", "Life is what happens when", "Well")]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate(model, tokenizer, [prompt], max_new_tokens=8, batch_size=1)[0] for prompt in prompts]
    assert batched == alone


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sharding needs 2 or more CUDA devices (NCCL allows one "
                    "process per GPU)")
def test_fsdp_on_gpus_matches_ddp_with_a_share_of_the_parameters_each(tiny_model_dir, quotes_file, tmp_path):
    """train.sharding: fsdp with one process per GPU (NCCL): the loss per step as DDP's (bf16/fp16
    autocast on both, so a looser tolerance than the CPU's 1e-4), each process holding about 1/N of
    the parameters, and a normal adapter out."""
    from kfp import dsl
    from tiny import run_stages, tiny_run_config

    from kubetune import artifacts, components

    gpus = torch.cuda.device_count()
    config = tiny_run_config(tiny_model_dir, quotes_file, model={"quantization": "none"},
                             train={"precision": "auto", "max_steps": 6, "save_steps": 3, "eval_steps": 0,
                                    "group_by_length": False, "batch_size": 2, "processes": gpus})
    out = run_stages(config, tmp_path, through="prepare_model")
    summaries = {}
    for sharding in ("ddp", "fsdp"):
        tuned = dsl.Model(name=sharding, uri=str(tmp_path / f"tuned-{sharding}"), metadata={})
        config["train"]["sharding"] = sharding
        config["storage"]["uri"] = str(tmp_path / f"storage-{sharding}")
        components.train.python_func(config_json=json.dumps(config), run_id=out["run_id"], tokenized=out["tokenized"],
                                     prepared_model=out["prepared"], tuned_model=tuned)
        summaries[sharding] = artifacts.read_training_summary(Path(tuned.path))
        assert (Path(tuned.path) / "adapter_model.safetensors").exists()
    ddp, fsdp = ([row["loss"] for row in summaries[name]["history"] if "loss" in row] for name in ("ddp", "fsdp"))
    assert fsdp == pytest.approx(ddp, rel=2e-2)
    share = summaries["fsdp"]["parameter_mb_per_process"] / summaries["ddp"]["parameter_mb_per_process"]
    assert share == pytest.approx(1 / gpus, rel=0.1)
