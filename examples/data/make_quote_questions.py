"""Writes the quote-author question set of examples/rag-quotes-gemma-lora.yaml, from the 500 quotes
in ../shared/data/quotes (lukePeavey/quotable's sample, MIT; see ../shared/data/SOURCES.md):

- quote_questions_train.jsonl: "Who said: "<quote>"?" -> author, for 300 quotes (task tuned-on);
- quote_questions_test.jsonl: 40 questions about quotes of the training set (task seen) and 40
  about quotes never trained on (task unseen). The knowledge corpus of the example is the whole
  quotes file, so retrieval can find the unseen quotes' authors; fine-tuning cannot have learned them.

Run from the repository root: python examples/data/make_quote_questions.py [../shared/data]
"""

import json
import random
import sys
from pathlib import Path

QUOTES = "quotes/quotable_sample_quotes.json"
HERE = Path(__file__).parent


def question(quote: dict, task: str) -> dict:
    return {"instruction": f"Who said: \u201c{quote['content'].strip()}\u201d?", "input": "",
            "output": quote["author"].strip(), "task": task}


def main(shared: Path) -> None:
    quotes = json.loads((shared / QUOTES).read_text(encoding="utf-8"))
    rng = random.Random(11)
    rng.shuffle(quotes)
    tuned_on, unseen = quotes[:300], quotes[300:340]
    train = [question(q, "tuned-on") for q in tuned_on]
    test = [question(q, "seen") for q in rng.sample(tuned_on, 40)] + [question(q, "unseen") for q in unseen]
    for name, rows in (("quote_questions_train.jsonl", train), ("quote_questions_test.jsonl", test)):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{HERE / name}: {len(rows)} questions")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
