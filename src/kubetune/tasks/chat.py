"""chat: conversations (system / user / assistant turns) in the model's chat template, the loss on
the assistant turns only.

Records hold a conversation in data.messages_field: a list of OpenAI-style {role, content} messages
(roles system, user, assistant) or ShareGPT {from, value} ones (system, human, gpt). prepare_data
writes each as {"messages": [{role, content}, ...]}: leading assistant turns (nothing asked yet) and
trailing user turns (nothing answered) are dropped, as are empty messages.

tokenize renders each conversation with the chat template: the tokenizer's own, or
data.chat_template (`chatml`, `gemma`, or a Jinja template), which is then saved with the tokenizer,
so every later stage and the registered model render conversations the same way. The assistant
turns, each with the template's end-of-turn marker, are labelled; system and user turns and the
template's headers are not, so the model learns to answer and to stop, not to write the user's side.
The pieces are cut and tokenized by kubetune_serving.chat.chat_pieces / chat_ids, the code the
served model builds its prompts with. A conversation longer than data.max_length keeps its
longest run of whole turns that fits (whole answers, never half of one); one whose first answer
does not fit is cut at max_length.

Evaluation: loss and perplexity on the assistant tokens of held-out conversations, base vs tuned;
the last assistant turn of each is generated greedily (stopping at the template's end of turn) and
scored like an instruction answer (accuracy on a closed answer set, exact match on short answers).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Optional

from kubetune_serving.chat import ASSISTANT, ROLES, chat_ids, chat_pieces, conversation, turn_end

from kubetune.config import DataConfig, EvaluateConfig, RunConfig
from kubetune.errors import ConfigError, DataError
from kubetune.sources import head, is_missing, require_fields
from kubetune.tasks.base import IGNORE_INDEX, Completion, TaskKind
from kubetune.tasks.instruction import Instruction
from kubetune.tasks.prompts import GENERAL_TASK

log = logging.getLogger(__name__)

# Built-in templates for base models that ship without one (kubetune's own Jinja; the formats are
# ChatML, as OpenAI and Qwen write it, and Gemma's turn markup, whose <start_of_turn> and
# <end_of_turn> are tokens of every Gemma vocabulary; Gemma has no system role, so a system
# message opens the first user turn).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% else %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}"
        "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
        "{{ message['content'] + '<end_of_turn>\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
}


def check_chat_template(template: Optional[str]) -> None:
    if template is None or template in CHAT_TEMPLATES:
        return
    if "{{" not in template and "{%" not in template:
        raise ConfigError("data.chat_template", template, f"neither a built-in template ({', '.join(CHAT_TEMPLATES)}) "
                          "nor a Jinja chat template (no {{ or {%); use one of those, or null for the tokenizer's own")


def turns(value: Any) -> list[dict[str, str]]:
    """A conversation as it is trained on: messages with content, from the first user turn (system
    messages before it kept) to the last assistant turn."""
    messages = [m for m in conversation(value) if m["content"]]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    messages = [m for i, m in enumerate(messages) if i >= first_user or m["role"] == "system"]
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == ASSISTANT), default=-1)
    return messages[: last_answer + 1] if any(m["role"] == "user" for m in messages[:last_answer]) else []


class Chat(Instruction):
    name = "chat"
    retrieval = False  # the prompt is a rendered conversation: no place for passages in front of it

    record_columns = {"messages": "messages", "text": "string", "task": "string"}

    def check_config(self, cfg: RunConfig) -> None:
        """The answers are the assistant turns of each conversation: no label field to require."""

    # ---- prepare_data -------------------------------------------------------------------------
    def expand(self, located: Iterable[tuple[dict[str, Any], str]]) -> Iterator[tuple[dict[str, Any], str]]:
        return iter(located)

    def required_fields(self, cfg: DataConfig) -> list[tuple[str, str]]:
        return [("data.messages_field", cfg.messages_field)]

    def unusable(self, key: str, value: Any, cfg: DataConfig) -> bool:
        """A conversation field is unusable when it holds no user turn answered by the assistant."""
        if key != "data.messages_field":
            return super().unusable(key, value, cfg)
        try:
            return is_missing(value) or not turns(value)
        except (ValueError, TypeError):
            return True

    def check_fields(self, rows: Iterable[dict[str, Any]], cfg: DataConfig) -> None:
        """The field exists and every message in it has a known role (an unknown role is a mapping to
        fix, not an example to drop)."""
        check_chat_template(cfg.chat_template)
        first = head(rows)
        lists = sorted({key for row in first for key, value in row.items() if isinstance(value, list)})
        if lists and not any(cfg.messages_field in row for row in first):
            raise DataError("data.messages_field", cfg.messages_field, f"not a field of the data; the fields holding "
                            f"lists are {', '.join(lists)}: set data.messages_field to the one holding the "
                            f"conversations (ShareGPT: conversations)")
        require_fields(rows, cfg, [("data.messages_field", cfg.messages_field)])
        for number, row in enumerate(rows, start=1):
            value = row.get(cfg.messages_field)
            if not isinstance(value, list):
                continue  # missing or malformed: the data contract drops or reports the example
            for item in value:
                role = item.get("role", item.get("from")) if isinstance(item, dict) else None
                if role is not None and str(role).strip().lower() not in ROLES:
                    raise DataError("data.messages_field", cfg.messages_field,
                                    f"record {number} has a message with role {role!r}; the roles read are "
                                    f"{', '.join(ROLES)}: rename or remove such messages in the data")

    def normalise(self, rows: list[dict[str, Any]], cfg: DataConfig, whole: bool = True) -> list[dict[str, Any]]:
        out = [{"messages": turns(row[cfg.messages_field])} for row in rows]
        return [row for row in out if row["messages"]]

    def replay_record(self, text: str) -> dict[str, Any]:
        """General text outside any template: every token is learned, like causal_lm."""
        return {"messages": [], "text": text, "task": GENERAL_TASK}

    # ---- tokenize -----------------------------------------------------------------------------
    def info(self, train: Iterable[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
        return super().info(({"answer": last_answer(row), "task": row.get("task", "")} for row in train), cfg)

    def prepare_tokenizer(self, tokenizer, cfg: DataConfig) -> None:
        check_chat_template(cfg.chat_template)
        if cfg.chat_template is not None:
            tokenizer.chat_template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
        elif not tokenizer.chat_template:
            raise ConfigError("data.chat_template", None, "the base model's tokenizer has no chat template (base "
                              "models often have none); set data.chat_template to chatml or gemma (built in), or to a "
                              "Jinja chat template of your own")

    def encode(self, records: list[dict[str, Any]], tokenizer, cfg: DataConfig,
               info: dict[str, Any], whole: bool = True) -> dict[str, list]:
        columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "answer": [], "task": [],
                                    "answer_start": []}
        shortened = dropped = 0
        for number, row in enumerate(records, start=1):
            if not row["messages"]:  # replayed general text, encoded as causal_lm encodes it (all learned)
                ids = TaskKind.encode(self, [row], tokenizer, cfg, info)["input_ids"][0]
                labels, answer, start = list(ids), "", 0
            else:
                ids, labels, answer, start, cut = self.encode_conversation(row["messages"], tokenizer, cfg, number)
                if start >= len(ids) - 1:  # not one token of an answer fits
                    dropped += 1
                    continue
                shortened += cut
            columns["input_ids"].append(ids)
            columns["attention_mask"].append([1] * len(ids))
            columns["labels"].append(labels)
            columns["answer"].append(answer)
            columns["task"].append(str(row.get("task") or ""))
            columns["answer_start"].append(start)
        if whole and records and not columns["input_ids"]:
            raise self.none_encoded(len(records), cfg)
        if shortened or dropped:  # per batch: tokenize logs the split's totals
            log.debug("encode: of %d conversations, %d lost turns from their end to fit data.max_length %d and %d were "
                     "dropped (their first answer starts beyond it)", len(records), shortened, cfg.max_length, dropped)
        return columns

    def none_encoded(self, records: int, cfg: DataConfig) -> Optional[Exception]:
        return DataError("data.max_length", cfg.max_length, f"in every one of {records} conversations the first "
                         "answer starts beyond it; raise data.max_length")

    def encode_conversation(self, messages: list[dict[str, str]], tokenizer, cfg: DataConfig,
                            number: int) -> tuple[list[int], list[int], str, int, bool]:
        """(ids, labels, the last whole answer kept, where its tokens start, whether turns were cut)."""
        try:
            pieces = chat_pieces(tokenizer, messages)
        except ValueError as exc:
            raise ConfigError("data.chat_template", cfg.chat_template, f"{exc}; use a template that renders a "
                              "conversation as the sum of its turns (chatml, gemma)") from None
        except Exception as exc:  # jinja2's errors: the template rejects this conversation
            raise DataError("data.messages_field", cfg.messages_field,
                            f"the chat template cannot render conversation {number} ({type(exc).__name__}: {exc}); "
                            "fix that conversation's roles, or choose another data.chat_template") from None
        ids, owner = chat_ids(tokenizer, pieces)
        labels = [token if piece >= 0 and pieces[piece][1] else IGNORE_INDEX for token, piece in zip(ids, owner)]
        answers = [m["content"] for m in messages if m["role"] == ASSISTANT]
        # (first token, end) of each answer, in order: the learned pieces are the assistant turns
        spans = []
        for piece in (p for p, (_, learned) in enumerate(pieces) if learned):
            at = [i for i, p in enumerate(owner) if p == piece]
            spans.append((at[0], at[-1] + 1) if at else (len(ids), len(ids)))
        fitting = [n for n, (_, end) in enumerate(spans) if end <= cfg.max_length]
        last = fitting[-1] if fitting else 0
        end = spans[last][1] if fitting else cfg.max_length
        return ids[:end], labels[:end], answers[last], spans[last][0], end < len(ids)

    # ---- evaluate -----------------------------------------------------------------------------
    def completions(self, rows: list[dict[str, Any]], info: dict[str, Any], tokenizer,
                    cfg: EvaluateConfig) -> list[Completion]:
        """The last answer of each conversation, generated until the template's end of turn; the
        samples show the conversation with the template's markup."""
        end = turn_end(tokenizer)
        out = super().completions(rows, info, tokenizer, cfg)
        for completion in out:
            completion.stop_strings = [end] if end else []
            completion.prompt = tokenizer.decode(completion.prompt_ids)
        return out

    # ---- register -----------------------------------------------------------------------------
    def prompt_format(self, cfg: DataConfig) -> Optional[dict[str, Any]]:
        """A served chat model answers `messages` with the template saved in its tokenizer."""
        return {"chat": True}


def last_answer(row: dict[str, Any]) -> str:
    return next((m["content"] for m in reversed(row.get("messages") or []) if m["role"] == ASSISTANT), "")
