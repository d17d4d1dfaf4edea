"""The registry's own rules on plain data, no MLflow store: when a version becomes the champion, and
what a version's settings and signature say. Registering into a real MLflow store is tested in
tests/integration (test_serving.py, test_pipeline_local.py)."""

from __future__ import annotations

from typing import Optional

import pytest

from kubetune import registry
from kubetune.registry import CHAMPION, beats, decide_champion


class Versions:
    """registry.Versions on a dict: versions' tags and the alias pointing at one."""

    def __init__(self, tags: dict[str, dict[str, str]], champion: Optional[str] = None):
        self.tags, self.champion = tags, champion

    def aliased(self, name: str, alias: str) -> Optional[tuple[str, dict[str, str]]]:
        assert alias == CHAMPION
        return None if self.champion is None else (self.champion, self.tags[self.champion])


@pytest.mark.parametrize("score, best, higher_is_better, expected", [
    (0.9, "0.8", True, True), (0.8, "0.8", True, False), (0.7, "0.8", True, False),
    (20.0, "25.5", False, True), (25.5, "25.5", False, False), (30.0, "25.5", False, False),
    (1.0, None, True, True), (1.0, None, False, True),
])
def test_a_score_beats_the_champion_only_when_strictly_better(score, best, higher_is_better, expected):
    assert beats(score, best, higher_is_better) is expected


def test_the_first_version_with_a_score_becomes_champion_and_says_so():
    decision = decide_champion(Versions({}), "m", "eval/tuned_macro_f1", 0.5, True)
    assert decision.promoted
    assert decision.line("m", "1") == "m/1 is the champion: the first version with a tuned macro f1 (0.5)"


def test_a_better_version_takes_the_alias_and_a_worse_or_equal_one_does_not_saying_against_what():
    store = Versions({"1": {"eval/tuned_perplexity": "30"}}, champion="1")
    for score in (30.0, 30.0000001, 31.0):  # a tie at the tags' precision keeps the champion
        assert not decide_champion(store, "m", "eval/tuned_perplexity", score, False).promoted
    lost = decide_champion(store, "m", "eval/tuned_perplexity", 31.0, False)
    assert lost.line("m", "2") == ("m/2 is not the champion: tuned perplexity 31 does not beat 30 of version 1, which "
                                   "stays champion (lower is better)")
    won = decide_champion(store, "m", "eval/tuned_perplexity", 29.7063, False)
    assert won.promoted and (won.champion, won.champion_score) == ("1", "30")
    assert won.line("m", "3") == "m/3 is the new champion: tuned perplexity 29.71 beats 30 of version 1 (lower is better)"


def test_a_version_without_the_score_never_takes_the_alias_and_a_champion_without_it_is_beaten():
    store = Versions({"1": {}}, champion="1")
    none = decide_champion(store, "m", "eval/accuracy", None, True)
    assert not none.promoted and none.line("m", "2") == "m/2 is not the champion: the run has no accuracy to compare"
    beaten = decide_champion(store, "m", "eval/accuracy", 0.1, True)
    assert beaten.promoted and "version 1, which recorded no accuracy" in beaten.line("m", "2")


def test_eval_tags_are_readable_and_keep_what_the_rule_compares():
    assert registry.tag_value(29.706298828125) == "29.7063"
    assert registry.tag_value(0.8333333333) == "0.833333"


@pytest.mark.parametrize("settings, columns", [
    ({"predicts": "labels", "max_new_tokens": 32}, ["text"]),
    ({"predicts": "text", "max_new_tokens": 32}, ["prompt"]),
    ({"predicts": "text", "max_new_tokens": 32, "prompt_format": {"template": "alpaca"}}, ["prompt", "instruction", "input"]),
    ({"predicts": "text", "max_new_tokens": 32, "prompt_format": {"chat": True}}, ["messages", "prompt"]),
])
def test_the_signature_names_the_columns_the_task_kind_reads(settings, columns):
    signature = registry.signature(settings)
    assert signature.inputs.input_names() == columns
    assert (signature.params is None) == (settings["predicts"] == "labels")
    if settings["predicts"] == "text":
        assert {param.name: param.default for param in signature.params.params} == {"max_new_tokens": 32}
