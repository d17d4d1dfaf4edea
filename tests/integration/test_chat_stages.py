"""The chat pipeline's stages in order, in this process, on the tiny model: the tuned model learns
the assistant's answers, generation stops at the template's end of turn, and the registered model
answers a `messages` conversation with the template it was trained with. (The task kind itself:
tests/unit/test_chat.py.)"""

import json
from pathlib import Path

import pytest

from kubetune_serving.chat import chat_prompt_ids
from tiny import chat_rows, run_stages, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# A template of the test's own whose turns end in EOS: the 2-block model learns a label word and
# EOS in a few dozen steps, where ChatML's <|im_end|>, a dozen characters to this tokenizer, takes
# hundreds (the built-in templates: tests/unit/test_chat.py).
ANSWER_EOS = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Answer: ' + m['content'] + eos_token }}"
              "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}Answer: {% endif %}")


def test_chat_stages_learn_the_answers_and_serve_conversations(tiny_model_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(120)))
    config = tiny_run_config(
        tiny_model_dir, path, task="chat",
        data={"chat_template": ANSWER_EOS, "max_length": 96, "validation_fraction": 0.2},
        model={"quantization": "none", "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}},
        train={"max_steps": 60, "save_steps": 30, "eval_steps": 30},
        evaluate={"max_samples": 16, "batch_size": 8, "num_generations": 2, "max_new_tokens": 8,
                  "retention_path": None},
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "chat"},
        storage={"uri": str(tmp_path / "storage")})
    out = run_stages(config, tmp_path, through="register")
    result = json.loads((Path(out["evaluation"].path) / "evaluation.json").read_text())
    metrics = result["metrics"]
    assert metrics["eval/tuned_loss"] < 0.5 * metrics["eval/base_loss"]
    assert metrics["eval/tuned_answer_accuracy"] > metrics["eval/base_answer_accuracy"]
    assert metrics["eval/answer_accuracy_samples"] == metrics["eval/samples"] == 16
    sample = result["generations"][0]
    assert sample["expected"] in ("negative", "neutral", "positive")
    assert "</s>" not in sample["tuned"] and "Answer:" not in sample["tuned"]
    assert sample["prompt"].endswith(sample["expected"] + "\nAnswer: ") is False  # the last answer is not given
    assert sample["prompt"].rstrip().endswith("Answer:")

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(config["tracking"]["mlflow_uri"])
    mlflow.set_registry_uri(config["tracking"]["mlflow_uri"])
    served = mlflow.pyfunc.load_model(f"models:/{out['version']}")
    model = served.unwrap_python_model()
    talk = [{"role": "system", "content": "Name the sentiment of each review."},
            {"role": "user", "content": "the film was awful"}]
    # the template travelled with the tokenizer, so the served prompt is the one evaluation generated from
    assert model.tokenizer.chat_template == ANSWER_EOS
    assert model.tokenizer.decode(chat_prompt_ids(model.tokenizer, talk)).endswith("Answer: ")
    answers = served.predict(pd.DataFrame({"messages": [talk, [talk[1]]]}), params={"max_new_tokens": 8})
    assert len(answers) == 2 and answers[0].strip() in ("negative", "neutral", "positive")
    # a REST request's JSON goes through the signature's Array(Object) column as the server parses it
    (tmp_path / "request.json").write_text(json.dumps({"dataframe_records": [{"messages": talk}],
                                                       "params": {"max_new_tokens": 8}}))
    mlflow.models.predict(f"models:/{out['version']}", input_path=str(tmp_path / "request.json"), content_type="json",
                          output_path=str(tmp_path / "rest.json"), env_manager="local")
    assert json.loads((tmp_path / "rest.json").read_text())["predictions"] == answers[:1]
