"""evaluate.rag on the tiny model: the held-out questions scored four ways (base, base + retrieval,
tuned, tuned + retrieval) with the real all-MiniLM-L6-v2 retrieving from a corpus that holds the
answers, and preflight stopping bad retrieval settings before any training. (Retrieval itself:
tests/unit/test_retrieval.py.)"""

import json
from pathlib import Path

import pytest

from kubetune.config import RunConfig
from kubetune.errors import ConfigError, DataError
from kubetune.preflight import check_rag
from tiny import SHORT_TEMPLATE, run_stages, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["kettle", "bicycle", "umbrella", "guitar", "lamp", "tent", "camera", "teapot", "scarf", "canoe"]


def facts() -> list[dict[str, str]]:
    """80 facts, one owner per thing (a colour and an object): only the sentence naming both holds
    the answer."""
    return [{"thing": f"{colour} {thing}", "owner": NAMES[(i + j) % len(NAMES)],
             "fact": f"The {colour} {thing} belongs to {NAMES[(i + j) % len(NAMES)]}."}
            for i, colour in enumerate(COLOURS) for j, thing in enumerate(THINGS)]


def questions(rows) -> list[dict[str, str]]:
    return [{"instruction": f"Who owns the {row['thing']}?", "input": "", "output": row["owner"]} for row in rows]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def rag_run(tiny_model_dir, tmp_path):
    known = facts()
    corpus = write_jsonl(tmp_path / "facts.jsonl", known)
    train = write_jsonl(tmp_path / "train.jsonl", questions(known[:60]))
    test = write_jsonl(tmp_path / "test.jsonl", questions(known[60:]))
    return tiny_run_config(
        tiny_model_dir, train, task="instruction",
        data={"instruction_field": "instruction", "input_field": "input", "label_field": "output",
              "template": SHORT_TEMPLATE, "test_path": str(test), "max_length": 48, "validation_fraction": 0.2},
        model={"quantization": "none"},
        train={"max_steps": 8, "save_steps": 8},
        evaluate={"max_samples": 16, "batch_size": 8, "num_generations": 2, "max_new_tokens": 4,
                  "retention_path": None,
                  "rag": {"corpus_path": str(corpus), "fields": ["fact"], "top_k": 2, "context_tokens": 48}},
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "rag"},
        storage={"uri": str(tmp_path / "storage")})


def test_rag_scores_the_held_out_questions_four_ways(rag_run, tmp_path):
    out = run_stages(rag_run, tmp_path, through="register")
    result = json.loads((Path(out["evaluation"].path) / "evaluation.json").read_text())
    metrics = result["metrics"]
    for variant in ("base", "tuned", "rag.base", "rag.tuned"):
        assert f"eval/{variant}_loss" in metrics and f"eval/{variant}_answer_accuracy" in metrics  # 10 names: a closed set
    assert metrics["eval/rag.samples"] == metrics["eval/samples"] == 16
    assert metrics["eval/rag.passages"] == 80
    # MiniLM finds the sentence naming the thing asked about
    assert metrics["eval/rag.hit_rate"] >= 0.9
    assert metrics["eval/rag.index_seconds"] > 0 and metrics["eval/rag.query_seconds"] > 0
    # the answer in the context makes it likelier: the base's answer loss falls with the passages
    assert metrics["eval/rag.base_loss"] < metrics["eval/base_loss"]
    import mlflow

    mlflow.set_tracking_uri(rag_run["tracking"]["mlflow_uri"])
    samples = json.loads(Path(mlflow.MlflowClient().download_artifacts(
        out["run_id"], "eval/rag_generations.json", str(tmp_path))).read_text())
    assert len(samples[0]["passages"]) == 2 and samples[0]["prompt"].startswith("Context:\n")
    assert samples[0]["passages"][0] in samples[0]["prompt"]

    # the registered version retrieves as evaluation did: same passages, same template, on by default
    import pandas as pd

    mlflow.set_registry_uri(rag_run["tracking"]["mlflow_uri"])
    served = mlflow.pyfunc.load_model(f"models:/{out['version']}")
    retriever = served.unwrap_python_model().retriever
    question = "Who owns the green canoe?"
    prompt = retriever([question])[0]
    assert prompt.startswith("Context:\nThe green canoe belongs to Bo.\n") and prompt.endswith("\n\n" + question)
    asked = pd.DataFrame({"instruction": [question]})
    assert len(served.predict(asked, params={"max_new_tokens": 3})) == 1
    assert len(served.predict(asked, params={"max_new_tokens": 3, "retrieve": False})) == 1


def test_bad_retrieval_settings_stop_in_preflight(rag_run, tmp_path):
    def checked(**rag):
        config = json.loads(json.dumps(rag_run))
        config["evaluate"]["rag"].update(rag)
        check_rag(RunConfig.from_dict(config))

    checked()  # the good settings pass
    with pytest.raises(ConfigError, match="evaluate.rag.top_k = 81: the corpus holds only 80 passages"):
        checked(top_k=81)
    with pytest.raises(DataError, match="evaluate.rag.corpus_path.*no such file"):
        checked(corpus_path=str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"fact": ""}) + "\n")
    with pytest.raises(DataError, match="evaluate.rag.corpus_path.*holds no text"):
        checked(corpus_path=str(tmp_path / "empty.jsonl"))
    with pytest.raises(ConfigError, match="evaluate.rag.embedding_model"):
        checked(embedding_model=str(tmp_path))
    with pytest.raises(ConfigError, match="evaluate.rag.top_k = 0"):
        checked(top_k=0)
    causal = json.loads(json.dumps(rag_run))
    causal["task"] = "causal_lm"
    with pytest.raises(ConfigError, match="task = 'causal_lm': evaluate.rag"):
        check_rag(RunConfig.from_dict(causal))
