"""How data is rendered and counted as the base model will see it: the ChatTokenizer protocol the prepare step uses,
and its implementation on the base model's own tokenizer and chat template (transformers: train environment only;
tests use a fake of the same protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class ChatTokenizer(Protocol):
    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str: ...

    def count(self, text: str) -> int: ...


class HFChatTokenizer:
    """ChatTokenizer on transformers' AutoTokenizer: examples are rendered with apply_chat_template exactly as
    training will render them, and counted with the same tokenizer."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not self.tok.chat_template:
            raise ValueError(f"the tokenizer in {path} has no chat template")

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])
