"""Test doubles of the tokenizer and engine-output interfaces that evaluate() and the suite use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Output:
    prompt_index: int
    text: str
    token_ids: list[int]


class CharTokenizer:
    """apply_chat_template -> one id per character of "role: content" lines (reversible)."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return {"input_ids": [ord(ch) for ch in text]}
