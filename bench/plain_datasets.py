"""The plain Hugging Face `datasets` script a user would write instead of kubetune's prepare_data and
tokenize: load a JSONL file, hold out 10% (seed 42), tokenize in one process, save the result.

`python bench/plain_datasets.py DATA.jsonl MODEL_DIR [--out DIR] [--max-length 128]` prints one line
of JSON with the seconds of each phase. bench/scale.py runs it as the plain side; alone it works too.
The datasets cache and (without --out) the saved result go into fresh temporary folders, so nothing
is reused from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

started = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", help="JSONL file with a `text` field")
    parser.add_argument("model", help="model folder whose tokenizer is used")
    parser.add_argument("--out", help="where save_to_disk writes (default: a fresh temporary folder)")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    imported = time.monotonic()
    cache_dir = tempfile.mkdtemp(prefix="plain-cache-")  # fresh: no Arrow cache from an earlier run
    out = args.out or tempfile.mkdtemp(prefix="plain-out-")

    dataset = datasets.load_dataset("json", data_files=args.data, split="train", cache_dir=cache_dir)
    splits = dataset.train_test_split(test_size=0.1, seed=42)
    loaded = time.monotonic()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenized = splits.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
                           batched=True)
    mapped = time.monotonic()

    tokenized.save_to_disk(out)
    saved = time.monotonic()

    print(json.dumps({"import_seconds": round(imported - started, 3),
                      "load_split_seconds": round(loaded - imported, 3),
                      "map_seconds": round(mapped - loaded, 3),
                      "save_seconds": round(saved - mapped, 3),
                      "work_seconds": round(saved - imported, 3),
                      "rows_train": tokenized["train"].num_rows, "rows_validation": tokenized["test"].num_rows,
                      "out": out}))


if __name__ == "__main__":
    main()
