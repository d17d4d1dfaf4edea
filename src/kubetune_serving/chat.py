"""Chat: conversations as training labelled them and as a served model prompts with them.

A conversation is rendered with the tokenizer's chat template and cut into pieces, one per message,
by rendering longer and longer prefixes; kubetune.tasks.chat trains on the assistant pieces, and the
served model prompts with the same pieces plus the assistant's generation prompt."""

from __future__ import annotations

import json
from typing import Any, Optional

from .cells import text as cell_text

ASSISTANT = "assistant"
#: Message roles as chat templates know them, from OpenAI's (role) and ShareGPT's (from) names.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": ASSISTANT, "gpt": ASSISTANT,
         "model": ASSISTANT, "bot": ASSISTANT}
_PROBE = "kubetune-turn-probe-7f3a"


def message(item: Any) -> dict[str, str]:
    """One message as {role, content}, from OpenAI's {role, content} or ShareGPT's {from, value};
    content given as parts ([{type: text, text}]) is joined. ValueError names an unknown role."""
    if not isinstance(item, dict):
        raise ValueError(f"a message must be a mapping with role and content, not {type(item).__name__}")
    role = str(item.get("role", item.get("from", ""))).strip().lower()
    if role not in ROLES:
        raise ValueError(f"message role {role!r} is none of {', '.join(ROLES)}")
    content = item.get("content", item.get("value"))
    if isinstance(content, dict):
        raise ValueError("a message's content must be text (or a list of text parts), not a mapping")
    if isinstance(content, list):
        content = "".join(part.get("text") or "" if isinstance(part, dict) else str(part) for part in content)
    return {"role": ROLES[role], "content": cell_text(content).strip()}


def conversation(value: Any) -> list[dict[str, str]]:
    """A conversation cell as a list of messages: a list (or array) of messages, or its JSON text."""
    if isinstance(value, str):
        value = json.loads(value)
    if value is None or isinstance(value, (dict, str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"a conversation must be a list of messages, not {type(value).__name__}")
    return [message(item) for item in value]


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_pieces(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
                ) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, learned) pieces: what the template writes
    before the first message, then one piece per message, each assistant message preceded by its
    generation prompt (the "model\n" header). Learned are the assistant messages, with the template's
    end of turn, so a model learns to answer and to stop. Each piece is the difference between the
    renderings of two prefixes of the conversation; ValueError when a template renders a prefix as
    something other than the start of the longer conversation."""
    try:
        done = render_chat(tokenizer, [])
    except Exception:  # templates that read messages[0]
        done = ""
    pieces = [(done, False)] if done else []

    def extend(text: str, learned: bool, through: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise ValueError(f"the chat template's rendering of the first {through} messages does not start with its "
                             "rendering of fewer, so the turns cannot be told apart")
        if len(text) > len(done):
            pieces.append((text[len(done):], learned))
        done = text

    for i, message in enumerate(messages):
        if message["role"] == ASSISTANT:
            extend(render_chat(tokenizer, messages[:i], add_generation_prompt=True), False, i)
        extend(render_chat(tokenizer, messages[: i + 1]), message["role"] == ASSISTANT, i + 1)
    if add_generation_prompt:
        extend(render_chat(tokenizer, messages, add_generation_prompt=True), False, len(messages))
    return pieces


def chat_ids(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(token ids, index of the piece each token comes from). Each piece is tokenized alone, adding
    no special tokens (the template writes its own), so a turn's tokens never merge with the next
    turn's; BOS goes first where the tokenizer starts every text with it and the template did not."""
    ids: list[int] = []
    owner: list[int] = []
    for number, (text, _) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        owner.extend([number] * len(piece))
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids, owner = [bos, *ids], [-1, *owner]
    return ids, owner


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation's token ids followed by the generation prompt of the assistant's next turn."""
    return chat_ids(tokenizer, chat_pieces(tokenizer, messages, add_generation_prompt=True))[0]


def turn_end(tokenizer) -> Optional[str]:
    """What the chat template writes after an assistant message (ChatML: <|im_end|>), or None."""
    text = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": ASSISTANT, "content": _PROBE}])
    end = text[text.index(_PROBE) + len(_PROBE):].strip() if _PROBE in text else ""
    return end or None


