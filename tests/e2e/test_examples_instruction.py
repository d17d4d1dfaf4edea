"""The instruction and multitask examples on the real Gemma 3 270M, shortened: slow, run with
`make test-slow` (each takes a few minutes on 2 CPU cores)."""

import pytest

from kubetune.run_config import load_config
from kubetune.launch.local import run_pipeline

pytestmark = pytest.mark.slow

SHORT = ["evaluate.num_generations=1", "evaluate.retention_path=null"]


def run(example: str, tmp_path, *overrides: str) -> dict:
    cfg = load_config(f"examples/{example}", [*SHORT, f"storage.uri={tmp_path / 'storage'}", *overrides])
    return run_pipeline(cfg, progress=False)["eval"]


def test_sentiment_instruction_example_learns_the_answer_words(tmp_path):
    scores = run("instruction-sentiment-gemma-lora.yaml", tmp_path, "train.max_steps=12", "train.save_steps=6",
                 "evaluate.max_samples=48")
    assert scores["eval/tuned_loss"] < scores["eval/base_loss"]
    assert scores["eval/tuned_answer_accuracy"] >= scores["eval/base_answer_accuracy"]
    assert scores["eval/answer_accuracy_samples"] == 48


def test_gpteacher_instruction_example_lowers_the_response_loss(tmp_path):
    scores = run("instruction-gpteacher-gemma-lora.yaml", tmp_path, "train.max_steps=10", "train.save_steps=5",
                 "evaluate.max_samples=16", "evaluate.max_new_tokens=16")
    assert scores["eval/tuned_loss"] < scores["eval/base_loss"]


def test_selfinstruct_multitask_example_lowers_the_answer_loss(tmp_path):
    scores = run("multitask-selfinstruct-gemma-lora.yaml", tmp_path, "train.max_steps=10", "train.save_steps=5",
                 "evaluate.max_new_tokens=16")
    assert scores["eval/tuned_loss"] < scores["eval/base_loss"]
    assert scores["eval/tasks"] >= scores["eval/samples"] - 1  # one instance per seed task (one name twice)
    assert scores["eval/task_macro.tuned_loss"] < scores["eval/task_macro.base_loss"]


def test_progressive_multitask_example_lowers_the_answer_loss(tmp_path):
    scores = run("multitask-selfinstruct-gemma-progressive.yaml", tmp_path, "train.max_steps=10",
                 "train.save_steps=5", "evaluate.max_new_tokens=16")
    assert scores["eval/tuned_loss"] < scores["eval/base_loss"]
    assert scores["eval/task_macro.tuned_loss"] < scores["eval/task_macro.base_loss"]


def test_chat_example_lowers_the_assistant_loss(tmp_path):
    scores = run("chat-roleplay-apps-gemma-lora.yaml", tmp_path, "train.max_steps=8", "train.eval_steps=4",
                 "train.save_steps=4", "evaluate.max_samples=8", "evaluate.max_new_tokens=16")
    assert scores["eval/tuned_loss"] < scores["eval/base_loss"]
    assert scores["eval/samples"] == 8


def test_rag_example_scores_four_ways(tmp_path):
    scores = run("rag-quotes-gemma-lora.yaml", tmp_path, "train.max_steps=10", "train.eval_steps=5",
                 "train.save_steps=5", "evaluate.max_samples=16", "evaluate.max_new_tokens=8")
    for variant in ("base", "tuned", "rag.base", "rag.tuned"):
        assert f"eval/{variant}_short_answer_exact_match" in scores
    assert scores["eval/rag.hit_rate"] >= 0.9  # the quoted text finds its own passage
    assert scores["eval/rag.base_loss"] < scores["eval/base_loss"]  # the author in the context helps
