"""Retrieval: what evaluate.rag measured, served the same way. kubetune.retrieval indexes passages
with this Embedder; a registered version embeds its prompts with it and puts the nearest passages
in front of each prompt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Texts per forward pass of the embedding model.
EMBED_BATCH = 64
#: Where the embedding model is when it is not where the settings say (as BASE_MODEL_ENV).
EMBEDDING_MODEL_ENV = "KUBETUNE_EMBEDDING_MODEL_PATH"


class Embedder:
    """Sentence embeddings with a transformers encoder: pooled over real tokens, L2-normalised."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.location = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        pooling = model_dir / "1_Pooling" / "config.json"
        settings = json.loads(pooling.read_text()) if pooling.is_file() else {}
        self.cls = bool(settings.get("pooling_mode_cls_token"))
        bert = model_dir / "sentence_bert_config.json"
        limit = json.loads(bert.read_text()).get("max_seq_length") if bert.is_file() else None
        self.max_length = int(limit or min(512, getattr(self.model.config, "max_position_embeddings", 512)))

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        out = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like length: little padding
        with torch.no_grad():
            for start in range(0, len(texts), EMBED_BATCH):
                batch = self.tokenizer([texts[i] for i in order[start:start + EMBED_BATCH]], padding=True,
                                       truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                if self.cls:
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        vectors = np.empty((len(texts), out[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(out)
        return vectors


def nearest(queries, vectors, k: int) -> list[list[int]]:
    """The k rows of vectors nearest each query (dot product: cosine for normalised rows), nearest first."""
    import numpy as np

    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k].tolist()


def with_context(template: str, passages: list[str], prompt: str) -> str:
    """The prompt with its retrieved passages (one a line) in front, as evaluate.rag.template says."""
    return template.format(passages="\n".join(passages), prompt=prompt)


class Retriever:
    """A registered version's retrieval: its passages and their vectors (the `retrieval` artifact, as
    evaluation indexed them) and the embedding model, from $KUBETUNE_EMBEDDING_MODEL_PATH or where it
    was at registration."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        import numpy as np

        self.passages = json.loads((folder / "passages.json").read_text())
        self.vectors = np.load(folder / "vectors.npy")
        self.template, self.top_k = settings["template"], int(settings["top_k"])
        location = os.environ.get(EMBEDDING_MODEL_ENV, "").strip() or settings["embedding_model_path"]
        if not (Path(location).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"the embedding model is not at {location!r}; set {EMBEDDING_MODEL_ENV} to a local "
                                    f"folder holding {settings.get('embedding_model')!r}")
        self.embedder = Embedder(Path(location).expanduser())

    def __call__(self, prompts: list[str]) -> list[str]:
        found = nearest(self.embedder(prompts), self.vectors, self.top_k)
        return [with_context(self.template, [self.passages[i] for i in hits], prompt)
                for hits, prompt in zip(found, prompts)]


