"""Instruction prompts: the template an answer follows, as training built it and a served model builds it."""

from __future__ import annotations

from typing import Optional

#: The Stanford Alpaca prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), as one
#: format string: {input_clause} and {input_block} are empty for a record without an input.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{input_clause}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
ALPACA_INPUT_CLAUSE = ", paired with an input that provides further context"


def build_prompt(template: str, instruction: str, input_text: str, alpaca_template: Optional[str] = None) -> str:
    """The prompt the answer follows. `alpaca` is the Stanford Alpaca prompt (alpaca_template, with
    {instruction}, {input_clause} and {input_block}; ALPACA_TEMPLATE unless a version's settings
    carry the text it was trained on), with its input block only when there is an input; any other
    template is a format string of {instruction} and {input}."""
    if template == "alpaca":
        alpaca_template = alpaca_template or ALPACA_TEMPLATE
        if input_text:
            return alpaca_template.format(instruction=instruction, input_clause=ALPACA_INPUT_CLAUSE,
                                          input_block=f"### Input:\n{input_text}\n\n")
        return alpaca_template.format(instruction=instruction, input_clause="", input_block="")
    return template.format(instruction=instruction, input=input_text)


