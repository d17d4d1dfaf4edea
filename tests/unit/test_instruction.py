"""instruction and multitask task kinds: prompts from templates, exact answer-only labels,
truncation that keeps the answer, the guide's form, self-instruct expansion, task weights, the
progressive order, per-task metrics, and the Trainer reading rows in order. The instruction pipeline's
stages on a tiny model: tests/integration/test_instruction_stages.py."""

import contextlib
import json
from collections import Counter
from pathlib import Path

import pytest

from kubetune_serving.prompts import ALPACA_TEMPLATE

from kubetune import data, sources
from kubetune.config import DataConfig, RunConfig
from kubetune.errors import ConfigError, DataError
from kubetune.tasks import get_task
from kubetune.scoring import label_losses
from kubetune.tasks.answer_tokens import prompt_ids
from kubetune.tasks.base import IGNORE_INDEX
from kubetune.tasks.instruction import Instruction, Multitask
from kubetune.tasks.prompts import GENERAL_TASK, build_prompt, match_answer
from tiny import GUIDE, SEED_TASKS, SHORT_TEMPLATE, YELP, multitask_rows, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def data_cfg(path, **values) -> DataConfig:
    return DataConfig(path=str(path), **values)


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from kubetune.tokenization import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer, but adding BOS like Gemma's and Llama's do."""
    from tokenizers import processors

    from kubetune.tokenization import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


# ---- prompts and records --------------------------------------------------------------------------


def test_alpaca_template_with_and_without_input():
    with_input = build_prompt("alpaca", "Translate to French.", "Good morning")
    assert with_input == ("Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n")
    without = build_prompt("alpaca", "Name a colour.", "")
    assert without == ALPACA_TEMPLATE.format(instruction="Name a colour.", input_clause="", input_block="")
    assert "Input" not in without and "further context" not in without and "{" not in without


def test_alpaca_records_with_a_response_field(tmp_path):
    path = write_json(tmp_path / "gpteacher.json", [
        {"instruction": "Greet me as a pirate.", "input": "", "response": "Ahoy, matey!"},
        {"instruction": "Answer as a knight.", "input": "What is your quest?", "response": "To seek the grail."},
        {"instruction": "", "input": "", "response": "no instruction: dropped"},
    ])
    cfg = data_cfg(path, label_field="response")
    kind = Instruction()
    rows = sources.load_records(cfg)[0]
    kind.check_fields(rows, cfg)
    records = kind.normalise(rows, cfg)
    assert [r["answer"] for r in records] == ["Ahoy, matey!", "To seek the grail."]
    assert records[0]["prompt"] == build_prompt("alpaca", "Greet me as a pirate.", "")
    assert "### Input:\nWhat is your quest?\n\n### Response:\n" in records[1]["prompt"]
    custom = kind.normalise(rows, data_cfg(path, label_field="response", template="Q: {instruction} {input}\nA: "))
    assert custom[1]["prompt"] == "Q: Answer as a knight. What is your quest?\nA: "


def test_bad_templates_and_missing_fields_say_what_to_do(tmp_path):
    path = write_json(tmp_path / "d.json", [{"instruction": "Say hi.", "output": "hi"}])
    rows = sources.load_records(data_cfg(path))[0]
    kind = Instruction()
    with pytest.raises(ConfigError, match=r"data.template.*unknown placeholder \{question\}"):
        kind.check_fields(rows, data_cfg(path, label_field="output", template="{question}\n"))
    with pytest.raises(ConfigError, match="data.template"):
        kind.check_fields(rows, data_cfg(path, label_field="output", template="no placeholders"))
    with pytest.raises(DataError, match=r"data.input_field.*data.input_field: null"):
        kind.check_fields(rows, data_cfg(path, label_field="output"))
    with pytest.raises(DataError, match=r"data.label_field = 'response'.*fields found: instruction, output"):
        kind.check_fields(rows, data_cfg(path, label_field="response", input_field=None))
    with pytest.raises(DataError, match=r"data.instruction_field = 'prompt'.*data.instruction"):
        kind.check_fields(rows, data_cfg(path, label_field="output", input_field=None, instruction_field="prompt"))
    kind.check_fields(rows, data_cfg(path, label_field="output", input_field=None))


@needs_shared
def test_guides_form_on_uci_sentiment():
    """No instruction field: one fixed instruction, the review as input, the label word as answer."""
    cfg = data_cfg(YELP, max_rows=200, **{**GUIDE, "template": "alpaca"})
    splits = data.prepare_data(cfg, "instruction", seed=0)
    assert Instruction().info(splits.rows("train"), cfg) == {"answer_set": ["negative", "positive"]}
    assert {r["answer"] for r in splits.rows("train")} == {"negative", "positive"}
    raw = {row["reviews"].strip(): row["sentiment"] for row in sources.read_records(YELP)}
    record = splits.rows("train")[0]
    review = record["prompt"].split("### Input:\n")[1].split("\n\n### Response:")[0]
    assert record["answer"] == {"0": "negative", "1": "positive"}[raw[review]]
    assert "### Instruction:\nPositive or negative?\n\n" in record["prompt"]
    with pytest.raises(DataError, match=r"data.label_names.*label '1'"):
        Instruction().normalise(sources.read_records(YELP)[:5], data_cfg(YELP, **{**GUIDE, "label_names": {"0": "neg"}}))


def test_answer_set_only_for_a_small_repeated_set():
    kind = Instruction()
    cfg = DataConfig()
    assert kind.info([{"prompt": "p", "answer": a} for a in ["yes", "no"] * 5], cfg) == {"answer_set": ["no", "yes"]}
    assert kind.info([{"prompt": "p", "answer": f"answer {i}"} for i in range(10)], cfg) == {}


def test_match_answer_normalises_generations():
    labels = ["negative", "positive"]
    assert match_answer(" Positive.\nBecause ...", labels) == "positive"
    assert match_answer("negative, clearly", labels) == "negative"
    assert match_answer("The sentiment is negative.", labels) == "negative"
    assert match_answer("positive or negative", labels) is None
    assert match_answer("", labels) is None
    assert match_answer("It is not suitable for him", ["Not suitable.", "Suitable."]) == "Not suitable."


# ---- encoding ---------------------------------------------------------------------------------------


RECORDS = [{"prompt": "Translate to French:\nGood morning\nAnswer:\n", "answer": "Bonjour"},
           {"prompt": "Name a colour.\n\nAnswer:\n", "answer": "The sky is blue."},
           {"prompt": "", "answer": "General text learned in full, like causal_lm.", "task": GENERAL_TASK}]


@pytest.mark.parametrize("which", ["tokenizer", "bos_tokenizer"])
def test_labels_mask_exactly_the_prompt(which, request):
    tok = request.getfixturevalue(which)
    cols = Instruction().encode(RECORDS, tok, DataConfig(max_length=64), {})
    assert len(cols["input_ids"]) == 3 and cols["task"] == ["", "", GENERAL_TASK]
    for record, ids, mask, labels in zip(RECORDS, cols["input_ids"], cols["attention_mask"], cols["labels"]):
        prompt = tok(record["prompt"], add_special_tokens=True)["input_ids"]
        assert len(ids) == len(mask) == len(labels) and set(mask) == {1}
        assert ids[: len(prompt)] == prompt, "the prompt (with BOS where the tokenizer adds one) comes first"
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        answer_positions = range(len(prompt), len(ids))
        assert all(labels[i] == ids[i] for i in answer_positions), "every answer label equals its input id"
        assert ids[-1] == tok.eos_token_id
        decoded = tok.decode([ids[i] for i in answer_positions])
        assert decoded == record["answer"] + tok.eos_token
        if which == "bos_tokenizer":
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_truncation_keeps_the_answer_and_bos(bos_tokenizer):
    tok = bos_tokenizer
    long_prompt = "Read this carefully. " * 30 + "\nAnswer:\n"
    records = [{"prompt": long_prompt, "answer": "Yes it does."},
               {"prompt": "Short prompt:\n", "answer": "far too long an answer " * 20},
               {"prompt": "", "answer": "general text " * 40, "task": GENERAL_TASK}]
    cols = Instruction().encode(records, tok, DataConfig(max_length=32), {})
    assert len(cols["input_ids"]) == 2, "the example whose answer does not fit is dropped"
    ids, labels = cols["input_ids"][0], cols["labels"][0]
    assert len(ids) == 32 and ids[0] == tok.bos_token_id
    answer = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(answer) == "Yes it does." + tok.eos_token
    assert tok.decode(ids[: labels.index(answer[0])]).endswith("\nAnswer:\n"), "the prompt's end survives"
    assert len(cols["input_ids"][1]) == 32 and cols["labels"][1][0] == IGNORE_INDEX  # general: cut at the end
    with pytest.raises(DataError, match="data.max_length"):
        Instruction().encode(records[1:2], tok, DataConfig(max_length=32), {})


def test_collator_pads_right_and_ignores_string_columns(tokenizer):
    cols = Instruction().encode(RECORDS, tokenizer, DataConfig(max_length=64), {})
    features = [{k: cols[k][i] for k in cols} for i in range(2)]
    batch = Instruction().collator(tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    short = min(range(2), key=lambda i: len(features[i]["input_ids"]))
    n = len(features[short]["input_ids"])
    assert batch["input_ids"][short, n:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"][short, n:].eq(0).all() and batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert batch["labels"][short, :n].tolist() == features[short]["labels"]


def test_answer_loss_equals_the_models_own_loss(tiny_model_dir, tokenizer):
    """The held-out figure is the training loss: labels shifted once, -100 ignored; left padding,
    position ids and the trimmed LM head change nothing."""
    import torch

    from kubetune.modeling import load_base_model

    model = load_base_model(tiny_model_dir, "none")
    cols = Instruction().encode(RECORDS, tokenizer, DataConfig(max_length=64), {})
    rows = [{k: cols[k][i] for k in cols} for i in range(3)]
    assert len({len(row["input_ids"]) for row in rows}) == 3
    scored = label_losses(model, rows, tokenizer.pad_token_id, batch_size=8, tail_only=True)
    for row, (total, count, exact) in zip(rows, scored):
        alone = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "labels")}
        assert count == sum(label != IGNORE_INDEX for label in row["labels"][1:])  # position 0 is never predicted
        assert total / count == pytest.approx(model(**alone).loss.item(), rel=1e-4)
        logits = model(input_ids=alone["input_ids"]).logits[0, :-1]
        greedy = [int(t) for t, label in zip(logits.argmax(-1), row["labels"][1:]) if label != IGNORE_INDEX]
        assert exact == (greedy == [label for label in row["labels"][1:] if label != IGNORE_INDEX])
    assert prompt_ids(rows[1]) == tokenizer(RECORDS[1]["prompt"])["input_ids"]


# ---- multitask --------------------------------------------------------------------------------------


@needs_shared
def test_self_instruct_seed_tasks_expand_to_one_record_per_instance():
    cfg = data_cfg(SEED_TASKS, task_field="name", label_field="output", task_weights={"sentence_sentiment": 3})
    kind = Multitask()
    rows = sources.load_records(cfg)[0]
    kind.check_fields(rows, cfg)
    records = kind.normalise(rows, cfg)
    instances = sum(len(row["instances"]) for row in rows)
    assert len(records) == instances and {"prompt", "answer", "task"} == set(records[0])
    first = rows[0]
    assert records[0]["task"] == first["name"] and records[0]["answer"] == first["instances"][0]["output"]
    assert first["instruction"] in records[0]["prompt"]
    bad = data_cfg(SEED_TASKS, task_field="name", label_field="output", task_weights={"no_such_task": 2})
    with pytest.raises(DataError, match=r"data.task_weights.no_such_task.*tasks found: "):
        kind.check_fields(rows, bad)


def run_cfg(**data_values) -> RunConfig:
    return RunConfig.from_dict({"task": "multitask", "data": {"label_field": "output", "task_field": "name",
                                                               **data_values},
                                "train": {"max_steps": 50, "batch_size": 4, "gradient_accumulation_steps": 2}})


def test_task_weights_resample_the_train_split_only_and_seeded():
    from datasets import Dataset

    tasks = ["a"] * 100 + ["b"] * 100 + ["c"] * 50
    dataset = Dataset.from_dict({"task": tasks})
    kind = Multitask()
    assert kind.train_order(dataset, run_cfg()) is None, "no weights, mixed: the Trainer shuffles as usual"
    cfg = run_cfg(task_weights={"a": 3.0, "c": 0.0})
    order = kind.train_order(dataset, cfg)
    assert order == kind.train_order(dataset, cfg), "seeded"
    assert len(order) == pytest.approx(400, abs=3)  # 50 steps x 4 x 2 examples
    counts = Counter(tasks[i] for i in order)
    assert counts["c"] == 0 and counts["a"] / counts["b"] == pytest.approx(3.0, rel=0.1)
    assert len({i for i in order if tasks[i] == "b"}) == 100, "every weight-1 row is seen at this length"


def test_progressive_order_starts_general_and_ramps_the_tasks_in():
    from datasets import Dataset

    tasks = [GENERAL_TASK] * 60 + ["a"] * 100 + ["b"] * 100
    dataset = Dataset.from_dict({"task": tasks})
    cfg = RunConfig.from_dict({"task": "multitask", "data": {"label_field": "output", "replay_path": "x.txt",
                                                             "replay_fraction": 0.1},
                               "train": {"max_steps": 100, "batch_size": 4, "gradient_accumulation_steps": 2,
                                         "schedule": "progressive"}})
    order = Multitask().train_order(dataset, cfg)
    assert len(order) == 800
    share = [sum(tasks[i] == GENERAL_TASK for i in order[s:s + 80]) / 80 for s in range(0, 800, 80)]
    assert share[0] > 0.85 and share[-1] < 0.25 and share[2] > share[4] > share[6]
    assert Counter(tasks[i] for i in order[400:])["a"] == pytest.approx(Counter(tasks[i] for i in order[400:])["b"],
                                                                       rel=0.3)


def test_per_task_metrics_and_answer_accuracy(tiny_model_dir, tokenizer, tmp_path):
    from datasets import Dataset

    from kubetune.evaluation import evaluate
    from kubetune.modeling import Variants, load_base_model

    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in multitask_rows()))
    cfg = run_cfg(path=str(path), template=SHORT_TEMPLATE, validation_fraction=0.3, max_length=48)
    cfg.evaluate.num_generations = 2
    splits = data.prepare_data(cfg.data, "multitask", seed=0)
    info = Multitask().info(splits.rows("train"), cfg.data)
    assert info["tasks"]["sentiment"]["answer_set"] == ["negative", "positive"]
    assert "answer_set" not in info["tasks"]["double"] and "answer_set" not in info
    dataset = Dataset.from_dict(Multitask().encode(splits.rows("validation"), tokenizer, cfg.data, info))
    model = load_base_model(tiny_model_dir, "none")
    variants = Variants(base=lambda: contextlib.nullcontext(model), tuned=lambda: contextlib.nullcontext(model))
    result = evaluate(Multitask(), variants, tokenizer, dataset, info, cfg)
    metrics = result.metrics
    held_out = Counter(row["task"] for row in splits.rows("validation"))
    assert metrics["eval/tasks"] == len(held_out) == 3
    for task, count in held_out.items():
        assert metrics[f"eval/task.{task}.samples"] == count
        assert metrics[f"eval/task.{task}.base_loss"] == metrics[f"eval/task.{task}.tuned_loss"] > 0
    assert 0 <= metrics["eval/task.sentiment.base_answer_accuracy"] <= 1
    assert "eval/task.double.base_answer_accuracy" not in metrics
    assert metrics["eval/answer_accuracy_samples"] == held_out["sentiment"]  # micro, over closed-set tasks
    assert metrics["eval/task_macro.base_loss"] == pytest.approx(
        sum(metrics[f"eval/task.{t}.base_loss"] for t in held_out) / 3, abs=1e-4)
    assert "eval/base_short_answer_exact_match" in metrics  # `double` and `echo` answers are short
    assert len(result.generations) == 2 and {"prompt", "expected", "base", "tuned", "task"} == set(
        result.generations[0])
    table = result.tables["per_task"]
    assert set(table) == set(held_out) and all(table[t]["samples"] == held_out[t] for t in held_out)
    assert all(table[t]["base_loss"] == metrics[f"eval/task.{t}.base_loss"] for t in held_out)
    assert "base_answer_accuracy" in table["sentiment"] and "base_answer_accuracy" not in table["double"]


def test_task_kinds_are_registered():
    assert isinstance(get_task("instruction"), Instruction) and isinstance(get_task("multitask"), Multitask)
    assert get_task("multitask").replay_record("Some text.") == {"prompt": "", "answer": "Some text.",
                                                                 "task": GENERAL_TASK}


# ---- the Trainer ------------------------------------------------------------------------------------


def test_trainer_reads_rows_in_the_given_order(tiny_model_dir, tokenizer, tmp_path):
    """training.train with an order: every batch is the next slice of it, nothing reshuffled."""
    from datasets import Dataset

    from kubetune import training
    from kubetune.config import TrainConfig
    from kubetune.modeling import load_base_model

    rows = [{"input_ids": [5 + i, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 6, 7]}
            for i in range(20)]
    dataset = Dataset.from_list(rows)
    order = [19, 3, 3, 3, 0, 7, 12, 12, 1, 19, 4, 4]
    seen = []
    inner = Instruction().collator(tokenizer)

    def recording(features):
        seen.extend(feature["input_ids"][0] - 5 for feature in features)
        return inner(features)

    cfg = TrainConfig(max_steps=3, batch_size=2, gradient_accumulation_steps=2, warmup_steps=0, save_steps=0,
                      learning_rate=1e-3, logging_steps=1)
    model = load_base_model(tiny_model_dir, "none")
    summary = training.train(model, recording, tokenizer, dataset, cfg, work_dir=tmp_path / "work",
                             out_dir=tmp_path / "out", progress=False, order=order)
    assert summary["steps"] == 3
    assert seen == order, "read in sequence: 3 steps x 2 micro-batches x 2 rows"


def test_per_task_exact_match_of_short_answers():
    """Open short answers (names, not a closed set) get an exact match per task, and its macro mean."""
    from kubetune.tasks.answer_metrics import per_task_scores, task_metrics
    from kubetune.tasks.base import Scores

    rows = [{"task": "seen", "answer": "William Blake"}, {"task": "seen", "answer": "Iris Murdoch"},
            {"task": "unseen", "answer": "Laozi"}, {"task": "unseen", "answer": "a long answer of many words"}]
    base = Scores(losses=[(1.0, 1)] * 4, texts={0: "William Blake.", 1: "Confucius", 2: "laozi", 3: "x"})
    tuned = Scores(losses=[(0.5, 1)] * 4, texts={0: "William Blake", 1: "Iris Murdoch\nmore", 2: "Buddha", 3: "x"})
    per_task = per_task_scores(rows, {"base": base, "tuned": tuned}, lambda row: None)
    assert per_task["seen"]["base_short_answer_exact_match"] == 0.5
    assert per_task["seen"]["tuned_short_answer_exact_match"] == 1.0
    assert per_task["unseen"]["base_short_answer_exact_match"] == 1.0  # the long answer is not scored
    assert task_metrics(per_task)["eval/task_macro.tuned_short_answer_exact_match"] == 0.5
