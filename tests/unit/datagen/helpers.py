"""The prepare library's test helpers: a ChatML tokenizer double (jinja2 template, whitespace counting), files."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

GOLDEN = Path(__file__).parent / "golden"
CHATML = (
    "{% if tools %}<|im_start|>system\ntools: {{ tools | map(attribute='function') | map(attribute='name') | join(', ') }}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ChatMLWhitespace:
    """The ChatTokenizer protocol the way the real one works (render with the chat template, count the text), with
    whitespace-separated words as tokens."""

    def __init__(self) -> None:
        self.template = ImmutableSandboxedEnvironment().from_string(CHATML)

    def render(self, messages, tools, add_generation_prompt):
        return self.template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def count(self, text):
        return len(text.split())


def write_jsonl(path: Path, rows: list, raw: bool = False) -> Path:
    path.write_text("".join((r if raw else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


NOUNS = ["apple", "river", "candle", "violin", "glacier", "pepper", "lantern", "falcon", "meadow", "copper",
         "harbor", "thistle", "saddle", "ember", "quartz", "willow", "beacon", "canyon", "orchid", "tundra",
         "anchor", "bramble", "cobalt", "dune", "ferry", "garnet", "hollow", "iris", "juniper", "kettle", "lagoon",
         "marble", "nectar", "oyster", "pebble", "quill", "raven", "sorrel", "timber", "umber"]


def alpaca(i: int, text: str = "") -> dict:
    """A distinct example per i: its words differ enough that no two are near duplicates (character 5-grams)."""
    a, b, c = (NOUNS[(i * k + o) % len(NOUNS)] for k, o in ((1, 0), (3, 7), (7, 13)))
    return {"instruction": f"Question number {i}: how is a {a} like a {b}? {text or 'Explain briefly'}.",
            "input": "", "output": f"Answer {i}: both share {i * 7 % 13} {c} traits {text}".strip()}
