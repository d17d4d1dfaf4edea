"""The sentiment examples on the real all-MiniLM-L6-v2, shortened: slow, run with `make test-slow`.

Each runs the whole pipeline (kfp.local) and checks that the tuned head beats the untrained one
and the majority-class baseline on held-out data, and that PEFT counts the parameters we expect.
"""

import pytest

from kubetune.run_config import load_config
from kubetune.launch.local import run_pipeline

pytestmark = pytest.mark.slow

# (example, overrides that shorten it, trainable parameters as PEFT counts them); the UCI examples
# are short already (60 steps).
EXAMPLES = {
    "sentiment-uci-minilm-lora": ([],
                                  "trainable params: 74,498 || all params: 22,788,484 || trainable%: 0.3269"),
    "sentiment-uci-minilm-8bit-lora": ([],
                                       "trainable params: 74,498 || all params: 22,788,484 || trainable%: 0.3269"),
    "sentiment-uci-minilm-full": ([],
                                  "trainable params: 22,713,986 || all params: 22,713,986 || trainable%: 100.0000"),
    "sentiment-tweeteval-minilm-lora": (["train.max_steps=100", "evaluate.max_samples=300"],
                                        "trainable params: 74,883 || all params: 22,789,254 || trainable%: 0.3286"),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_sentiment_example_beats_the_untrained_head_and_the_majority_class(name, tmp_path):
    overrides, trainable_line = EXAMPLES[name]
    cfg = load_config(f"examples/{name}.yaml", [*overrides, "train.save_steps=0", "evaluate.num_generations=2",
                                                f"storage.uri={tmp_path / 'storage'}"])
    result = run_pipeline(cfg, progress=False)
    scores = result["eval"]
    assert result["trainable_line"] == trainable_line
    assert scores["eval/tuned_macro_f1"] > scores["eval/base_macro_f1"] + 0.15
    assert scores["eval/tuned_macro_f1"] > scores["eval/majority_macro_f1"] + 0.15
    assert scores["eval/tuned_accuracy"] > scores["eval/majority_accuracy"]
    if "uci" in name:
        assert scores["eval/tuned_accuracy"] >= 0.8
