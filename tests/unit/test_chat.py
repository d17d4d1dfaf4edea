"""The chat task kind: OpenAI and ShareGPT conversations read alike, labels on the assistant turns
only (with the template's end of turn), the served prompt equal to the trained one, whole turns kept
under max_length, and one clear message for each kind of bad input. The chat pipeline's stages on
the tiny model: tests/integration/test_chat_stages.py."""

import json

import pytest

from kubetune import data
from kubetune.config import DataConfig
from kubetune.errors import ConfigError, DataError
from kubetune.scoring import label_losses
from kubetune_serving.chat import chat_prompt_ids, conversation, turn_end
from kubetune.tasks import get_task
from kubetune.tasks.answer_tokens import prompt_ids
from kubetune.tasks.base import IGNORE_INDEX
from kubetune.tasks.chat import CHAT_TEMPLATES, turns
from tiny import chat_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

CHAT = get_task("chat")
TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who said it?"},
        {"role": "assistant", "content": "A poet."}, {"role": "user", "content": "Which one?"},
        {"role": "assistant", "content": "Nobody knows."}]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from kubetune.tokenization import load_tokenizer

    return load_tokenizer(tiny_model_dir)  # fresh per test: tests set its chat template


def encoded(tokenizer, messages, template="chatml", **values):
    cfg = DataConfig(path="x", chat_template=template, **{"max_length": 256, **values})
    CHAT.prepare_tokenizer(tokenizer, cfg)
    return CHAT.encode([{"messages": messages}], tokenizer, cfg, {}), cfg


def learned_text(tokenizer, columns, row=0) -> str:
    return tokenizer.decode([t for t, label in zip(columns["input_ids"][row], columns["labels"][row])
                             if label != IGNORE_INDEX])


def test_openai_and_sharegpt_conversations_read_alike(tmp_path):
    openai, sharegpt = tmp_path / "openai.jsonl", tmp_path / "sharegpt.json"
    openai.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(12)))
    sharegpt.write_text(json.dumps(chat_rows(12, sharegpt=True)))
    read = [data.prepare_data(DataConfig(path=str(path), messages_field=field, validation_fraction=0.25), "chat", 0)
            for path, field in ((openai, "messages"), (sharegpt, "conversations"))]
    assert read[0].rows("train") == read[1].rows("train") and read[0].rows("validation") == read[1].rows("validation")
    first = read[0].rows("train")[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]


def test_turns_keep_what_can_be_trained_on():
    """Leading answers (nothing asked yet), trailing questions and empty messages go; content given as
    parts is joined; a conversation with no answered question has nothing to learn."""
    raw = [{"from": "gpt", "value": "Hello!"}, {"from": "system", "value": "Be kind. "},
           {"from": "human", "value": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
           {"from": "gpt", "value": ""}, {"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Bye"}]
    assert turns(raw) == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hi."}]
    assert turns([{"role": "assistant", "content": "Only me."}]) == []
    assert turns(json.dumps(TALK)) == TALK  # a conversation stored as JSON text (CSV cells)


@pytest.mark.parametrize("template, end", [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>")])
def test_only_assistant_turns_are_learned(tokenizer, template, end):
    columns, _ = encoded(tokenizer, TALK, template)
    assert learned_text(tokenizer, columns) == f"A poet.{end}\nNobody knows.{end}\n"
    assert turn_end(tokenizer) == end
    # evaluation generates the last answer from everything before it: the served model's prompt
    row = {key: values[0] for key, values in columns.items()}
    assert row["answer"] == "Nobody knows."
    assert prompt_ids(row) == chat_prompt_ids(tokenizer, TALK[:-1])
    assert tokenizer.decode(prompt_ids(row)).endswith("Which one?" + end + "\n" +
                                                      ("<|im_start|>assistant\n" if template == "chatml"
                                                       else "<start_of_turn>model\n"))


def test_the_tokenizers_own_template_is_used(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"].replace("<|im_end|>", "<|end|>")
    cfg = DataConfig(path="x", max_length=256)
    CHAT.prepare_tokenizer(tokenizer, cfg)
    columns = CHAT.encode([{"messages": TALK}], tokenizer, cfg, {})
    assert learned_text(tokenizer, columns) == "A poet.<|end|>\nNobody knows.<|end|>\n"


def test_long_conversations_keep_whole_turns(tokenizer):
    full, _ = encoded(tokenizer, TALK)
    first_answer_end = full["labels"][0].index(IGNORE_INDEX, full["labels"][0].index(
        next(label for label in full["labels"][0] if label != IGNORE_INDEX)))
    short, _ = encoded(tokenizer, TALK, max_length=len(full["input_ids"][0]) - 2)
    assert short["input_ids"][0] == full["input_ids"][0][:first_answer_end]
    assert short["answer"] == ["A poet."] and learned_text(tokenizer, short) == "A poet.<|im_end|>\n"
    # a first answer that starts beyond max_length leaves nothing to learn: the example is dropped
    with pytest.raises(DataError, match="data.max_length"):
        encoded(tokenizer, [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}],
                max_length=16)


def test_tail_scoring_of_multi_turn_rows_matches_full_scoring(tiny_model_dir, tokenizer):
    """Left-padded scoring keeps the LM head from the first answer on: with the user turn between two
    answers in that tail, the losses equal right-padded scoring of the whole row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = DataConfig(path="x", chat_template="chatml", max_length=256)
    CHAT.prepare_tokenizer(tokenizer, cfg)
    records = CHAT.normalise(chat_rows(6), cfg)
    columns = CHAT.encode(records, tokenizer, cfg, {})
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(columns["input_ids"], columns["labels"])]
    first_answer = [next(i for i, t in enumerate(labels) if t != IGNORE_INDEX) for labels in columns["labels"]]
    # the tail holds unlabelled tokens (the second question) between the answers
    assert all(IGNORE_INDEX in labels[start:] for labels, start in zip(columns["labels"], first_answer))
    tail = label_losses(model, rows, tokenizer.pad_token_id, batch_size=3, tail_only=True)
    full = label_losses(model, rows, tokenizer.pad_token_id, batch_size=3, tail_only=False)
    for (tail_loss, tail_n, _), (full_loss, full_n, _) in zip(tail, full):
        assert tail_n == full_n
        assert tail_loss == pytest.approx(full_loss, rel=1e-4)


def test_bad_chat_input_gets_one_message(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [*TALK[:2], {"role": "tool", "content": "42"}, TALK[2]]}) + "\n")
    with pytest.raises(DataError, match=r"data.messages_field.*role 'tool'"):
        CHAT.check_fields([json.loads(path.read_text())], DataConfig(path=str(path)))
    with pytest.raises(DataError, match="data.messages_field.*not a field of the data.*lists are conversations"):
        CHAT.check_fields([{"conversations": TALK, "id": 1}], DataConfig(path="x"))
    with pytest.raises(DataError, match="data.messages_field.*not a field of the data"):
        CHAT.check_fields([{"text": "no conversation here"}], DataConfig(path="x"))
    with pytest.raises(ConfigError, match="data.chat_template.*no chat template.*chatml or gemma"):
        CHAT.prepare_tokenizer(tokenizer, DataConfig(path="x"))
    with pytest.raises(ConfigError, match="data.chat_template = 'chat-ml'.*neither a built-in"):
        CHAT.prepare_tokenizer(tokenizer, DataConfig(path="x", chat_template="chat-ml"))
    # a template that renders a shorter conversation otherwise than as the start of the longer one
    numbered = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
    with pytest.raises(ConfigError, match="data.chat_template.*cannot be told apart"):
        encoded(tokenizer, TALK, numbered)
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="data.messages_field.*cannot render conversation 1.*no system role"):
        encoded(tokenizer, TALK, strict)


def test_conversations_without_an_answer_follow_the_data_contract(tmp_path):
    rows = chat_rows(10) + [{"messages": [{"role": "user", "content": "Anyone?"}]}, {"messages": "not json"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"data.messages_field.*2 of 12 records"):
        data.prepare_data(DataConfig(path=str(path)), "chat", 0)
    splits = data.prepare_data(DataConfig(path=str(path), drop_invalid=True, validation_fraction=0.2), "chat", 0)
    assert splits.stats["rows_invalid"] == 2 and len(splits.rows("train")) + len(splits.rows("validation")) == 10
    with pytest.raises(ValueError, match="list of messages"):
        conversation({"role": "user"})


def test_generation_stops_at_a_stop_string(tiny_model_dir, tokenizer):
    """A multi-token end of turn (ChatML's <|im_end|> on a vocabulary without it) ends generation:
    the text stops just before it, as if it were a stop token."""
    from transformers import AutoModelForCausalLM

    from kubetune.scoring import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [tokenizer("The only way to do")["input_ids"], tokenizer("Life is what")["input_ids"]]
    free = generate(model, tokenizer, prompts, 12, batch_size=2)
    marker = free[0].strip().split(" ")[1]  # a word the model writes after its first one
    stopped = generate(model, tokenizer, prompts, 12, batch_size=2, stop_strings=[marker])
    assert stopped[0] == free[0][: free[0].index(marker)]
    assert stopped[1] == free[1][: free[1].index(marker)] if marker in free[1] else stopped[1] == free[1]
