"""What evaluate.rag adds to the evaluate stage, measured against the stage's own scoring in the same
process: all-MiniLM-L6-v2 indexing a corpus of a few thousand passages (WikiText-2's test split in
100-word passages, ../shared/data/retention) and answering 80 queries, vs scoring 80 held-out
quote-author questions (answer loss and greedy answers) with the demo's 8-bit Gemma 3 270M, the
work evaluate does once per variant (evaluate.rag scores four). The corpus is indexed twice: once
embedded, once read back from the embedding cache in storage, as a later run on the same corpus
does. Prints the seconds and the ratios; writes bench/results/retrieval-latest.json.

Run: .venv/bin/python bench/retrieval.py   (from the repository root; about two minutes on 2 cores)
"""

import json
import tempfile
import time
from pathlib import Path

from kubetune import retrieval
from kubetune.config import DataConfig, EvaluateConfig, RagConfig, RunConfig
from kubetune.evaluation import score
from kubetune.model_source import resolve_model
from kubetune.modeling import load_base_model
from kubetune.storage import open_store
from kubetune.tasks import get_task
from kubetune.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / ".." / "shared" / "data" / "retention" / "wikitext2_test.txt"
QUESTIONS = ROOT / "examples" / "data" / "quote_questions_test.jsonl"


def main() -> None:
    rag = RagConfig(corpus_path=str(WIKITEXT), passage_words=100)
    data = DataConfig(path=str(QUESTIONS), instruction_field="instruction", label_field="output", max_length=96)
    started = time.monotonic()
    passages = retrieval.load_passages(rag, data)
    embedder = retrieval.load_embedder(rag)
    load_seconds = time.monotonic() - started
    store = open_store(tempfile.mkdtemp(prefix="kubetune-bench-"))
    index = retrieval.build_index(passages, embedder, store)  # embeds them and keeps the vectors
    again = retrieval.build_index(passages, embedder, store)  # a later run on the same corpus
    assert again.reused and (again.vectors == index.vectors).all()
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    _, query_seconds = retrieval.retrieve(index, embedder, [q["instruction"] for q in questions], rag.top_k)

    cfg = RunConfig(task="instruction", data=data, evaluate=EvaluateConfig(max_samples=80, batch_size=8,
                                                                          max_new_tokens=16, retention_path=None))
    kind = get_task("instruction")
    model_dir = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    records = kind.normalise(questions, data)
    columns = kind.encode(records, tokenizer, data, {})
    rows = [{key: columns[key][i] for key in columns} for i in range(len(columns["input_ids"]))]
    completions = kind.completions(rows, {}, tokenizer, cfg.evaluate)
    model = load_base_model(model_dir, cfg.model.quantization, kind, {})
    started = time.monotonic()
    score(kind, model, rows, completions, tokenizer, cfg.evaluate)
    scoring_seconds = time.monotonic() - started

    added, added_again = index.build_seconds + query_seconds, again.build_seconds + query_seconds
    result = {"passages": len(passages), "embedder_load_seconds": round(load_seconds, 1),
              "index_seconds": round(index.build_seconds, 1), "index_seconds_reused": round(again.build_seconds, 2),
              "query_seconds_80": round(query_seconds, 2), "scoring_seconds_one_variant_80": round(scoring_seconds, 1),
              "first_run_vs_four_variants": round(added / (4 * scoring_seconds), 3),
              "later_runs_vs_four_variants": round(added_again / (4 * scoring_seconds), 4)}
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "retrieval-latest.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
