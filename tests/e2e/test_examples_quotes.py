"""The quotes examples beyond the demo (freezing, 4-bit QLoRA, replay) on the real Gemma 3 270M,
shortened: slow, run with `make test-slow` (a few minutes each on 2 CPU cores)."""

import pytest

from kubetune.run_config import load_config
from kubetune.launch.local import run_pipeline

pytestmark = pytest.mark.slow

SHORT = ["train.max_steps=12", "train.save_steps=6", "evaluate.max_samples=24", "evaluate.num_generations=1",
         "evaluate.retention_samples=16"]


def run(example: str, tmp_path) -> dict:
    cfg = load_config(f"examples/{example}.yaml", [*SHORT, f"storage.uri={tmp_path / 'storage'}"])
    return run_pipeline(cfg, progress=False)


def test_freezing_trains_only_the_top_blocks_and_lowers_perplexity(tmp_path):
    result = run("quotes-gemma-freeze", tmp_path)
    # embeddings (tied to the output) and blocks 0-13 frozen: blocks 14-17 train, 8.3% of the weights
    assert result["trainable_line"] == "trainable params: 22,295,168 || all params: 268,098,176 || trainable%: 8.3160"
    assert result["eval"]["eval/tuned_perplexity"] < 0.9 * result["eval"]["eval/base_perplexity"]
    assert "eval/forgetting_pct" in result["eval"]


def test_4bit_qlora_lowers_perplexity(tmp_path):
    result = run("quotes-gemma-4bit-qlora", tmp_path)
    assert result["trainable_line"].startswith("trainable params: 737,280 ||")
    assert result["eval"]["eval/tuned_perplexity"] < 0.9 * result["eval"]["eval/base_perplexity"]


def test_replay_mixes_general_text_and_reports_forgetting(tmp_path):
    result = run("quotes-gemma-replay", tmp_path)
    scores = result["eval"]
    assert scores["eval/tuned_perplexity"] < 0.9 * scores["eval/base_perplexity"]
    assert scores["eval/retention.samples"] == 16
    assert scores["eval/forgetting_pct"] < 5, "LoRA with replay must not forget the general text"
