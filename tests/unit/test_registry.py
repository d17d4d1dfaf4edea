"""The registry's own rules on plain data, no MLflow store: when a version becomes the champion, and
what a version's settings and signature say. Registering into a real MLflow store is tested in
tests/integration (test_serving.py, test_pipeline_local.py)."""

from __future__ import annotations

from typing import Optional

import pytest

from kubetune import registry
from kubetune.registry import CHAMPION, beats, promote_if_better


class Versions:
    """registry.Versions on a dict: versions' tags and the aliases pointing at them."""

    def __init__(self, tags: dict[str, dict[str, str]], aliases: Optional[dict[str, str]] = None):
        self.tags, self.aliases = tags, dict(aliases or {})

    def aliased(self, name: str, alias: str) -> Optional[tuple[str, dict[str, str]]]:
        version = self.aliases.get(alias)
        return None if version is None else (version, self.tags[version])

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[alias] = version


@pytest.mark.parametrize("score, best, higher_is_better, expected", [
    (0.9, "0.8", True, True), (0.8, "0.8", True, False), (0.7, "0.8", True, False),
    (20.0, "25.5", False, True), (25.5, "25.5", False, False), (30.0, "25.5", False, False),
    (1.0, None, True, True), (1.0, None, False, True),
])
def test_a_score_beats_the_champion_only_when_strictly_better(score, best, higher_is_better, expected):
    assert beats(score, best, higher_is_better) is expected


def test_the_first_version_with_a_score_becomes_champion():
    store = Versions({"1": {"eval/accuracy": "0.5"}})
    assert promote_if_better(store, "m", "1", "eval/accuracy", 0.5, True)
    assert store.aliases == {CHAMPION: "1"}


def test_a_better_version_takes_the_alias_and_a_worse_or_equal_one_does_not():
    store = Versions({"1": {"eval/tuned_perplexity": "30.0"}, "2": {}, "3": {}}, {CHAMPION: "1"})
    assert not promote_if_better(store, "m", "2", "eval/tuned_perplexity", 30.0, False)
    assert not promote_if_better(store, "m", "2", "eval/tuned_perplexity", 31.0, False)
    assert store.aliases[CHAMPION] == "1"
    assert promote_if_better(store, "m", "3", "eval/tuned_perplexity", 29.7, False)
    assert store.aliases[CHAMPION] == "3"


def test_a_version_without_the_score_never_moves_the_alias_and_a_champion_without_it_is_beaten():
    store = Versions({"1": {}, "2": {}}, {CHAMPION: "1"})
    assert not promote_if_better(store, "m", "2", "eval/accuracy", None, True)
    assert store.aliases[CHAMPION] == "1"
    assert promote_if_better(store, "m", "2", "eval/accuracy", 0.1, True)
    assert store.aliases[CHAMPION] == "2"


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
