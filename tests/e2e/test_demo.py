"""The demo's real model and data, shortened: slow, run with `make test-slow`."""

import pytest

from kubetune.run_config import load_config
from kubetune.launch.local import run_pipeline

pytestmark = pytest.mark.slow


def test_demo_config_fine_tunes_gemma_and_lowers_perplexity(tmp_path):
    cfg = load_config("examples/quotes-gemma-8bit-lora.yaml",
                      ["train.max_steps=12", "train.save_steps=6", "evaluate.max_samples=24",
                       "evaluate.num_generations=1", f"storage.uri={tmp_path / 'storage'}"])
    result = run_pipeline(cfg, progress=False)
    assert result["trainable_line"] == "trainable params: 737,280 || all params: 268,835,456 || trainable%: 0.2742"
    assert result["eval"]["eval/tuned_perplexity"] < 0.9 * result["eval"]["eval/base_perplexity"]
