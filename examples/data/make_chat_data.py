"""Writes chat_roleplay_apps.jsonl: conversations in OpenAI's messages form, made from two openly
licensed instruction sets in ../shared/data (see its SOURCES.md and licenses/):

- 240 single-turn role-play conversations from GPTeacher's role-play instructions (MIT): the
  instruction (and its input, when there is one) is the user's turn, the response the assistant's;
- multi-turn conversations from self-instruct's user-oriented tasks (Apache-2.0): the tasks of one
  app (Grammarly, Gmail, ...) asked one after another in one conversation, two or three turns each,
  with a system message naming the app.

Run from the repository root: python examples/data/make_chat_data.py [../shared/data]
"""

import json
import random
import sys
from pathlib import Path

ROLEPLAY = "instruction/alpaca/gpteacher_roleplay_instruct.json"
APPS = "instruction/multitask/self_instruct_user_oriented_instructions.jsonl"
OUT = Path(__file__).with_name("chat_roleplay_apps.jsonl")


def user_turn(instruction: str, given: str) -> str:
    return f"{instruction.strip()}\n\n{given.strip()}" if given.strip() else instruction.strip()


def main(shared: Path) -> None:
    rng = random.Random(7)
    roleplay = json.loads((shared / ROLEPLAY).read_text(encoding="utf-8"))
    conversations = [{"messages": [{"role": "user", "content": user_turn(r["instruction"], r["input"])},
                                   {"role": "assistant", "content": r["response"].strip()}], "source": "gpteacher"}
                     for r in rng.sample(roleplay, 240)]
    by_app: dict[str, list[dict]] = {}
    for line in (shared / APPS).read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        by_app.setdefault(task["motivation_app"], []).append(task)
    for app, tasks in sorted(by_app.items()):
        rng.shuffle(tasks)
        while len(tasks) >= 2:
            size = 2 if len(tasks) in (2, 4) else 3  # never leaves one task alone
            turns, tasks = tasks[:size], tasks[size:]
            messages = [{"role": "system", "content": f"You are the assistant built into {app}."}]
            for task in turns:
                instance = task["instances"][0]
                messages += [{"role": "user", "content": user_turn(task["instruction"], instance["input"])},
                             {"role": "assistant", "content": instance["output"].strip()}]
            conversations.append({"messages": messages, "source": "self-instruct"})
    rng.shuffle(conversations)
    OUT.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), encoding="utf-8")
    turns = sum(sum(m["role"] == "assistant" for m in c["messages"]) for c in conversations)
    print(f"{OUT}: {len(conversations)} conversations, {turns} assistant turns")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
