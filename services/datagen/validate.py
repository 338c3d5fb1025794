"""Problems found in a dataset, and the checks on canonical examples.

A Problem names the file, the line and the field path (`train.jsonl:7: messages[2].content: is empty`). Errors make
a prepare fail; warnings are reported (and, for too-long examples, may drop the example). The checks here run on
canonical examples (services.datagen.formats) and report field paths in the source's own terms (`conversations[3]`
for ShareGPT, `output` for alpaca) through the `paths` the normaliser returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel

from services.datagen.chat_tokenizer import ChatTokenizer

Severity = Literal["error", "warning"]
# Chat-template text that should have been rendered away (or never written): Jinja, ChatML, Llama, Mistral.
TEMPLATE_MARKER = re.compile(r"\{\{|\{%|<\|[a-z_]{2,30}\|>|\[/?INST\]|<</?SYS>>")


EMPTY_REPLY = "the assistant reply is empty"


class Problem(BaseModel):
    severity: Severity
    file: str = ""
    line: int = 0  # 1-based; 0 = the whole file
    field: str = ""
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line else self.file or (
            f"line {self.line}" if self.line else "")
        return ": ".join(part for part in (where, self.field, self.message) if part)


def error(file: str, line: int, field: str, message: str) -> Problem:
    return Problem(severity="error", file=file, line=line, field=field, message=message)


def warning(file: str, line: int, field: str, message: str) -> Problem:
    return Problem(severity="warning", file=file, line=line, field=field, message=message)


class ProblemLog:
    """Counts every problem, keeps the first `keep` of each severity (memory stays flat on a bad 100k file)."""

    def __init__(self, keep_errors: int, keep_warnings: int):
        self.keep_errors, self.keep_warnings = keep_errors, keep_warnings
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.num_errors = 0
        self.num_warnings = 0

    def add(self, p: Problem) -> None:
        if p.severity == "error":
            self.num_errors += 1
            if len(self.errors) < self.keep_errors:
                self.errors.append(p)
        else:
            self.num_warnings += 1
            if len(self.warnings) < self.keep_warnings:
                self.warnings.append(p)

    def extend(self, problems: Sequence[Problem]) -> None:
        for p in problems:
            self.add(p)


def json_problem(e: json.JSONDecodeError) -> str:
    at = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at", "Invalid control character at"
    return f"not valid JSON ({e.msg}{at} column {e.colno})"


def _blank(text: Any) -> bool:
    return not isinstance(text, str) or not text.strip()


def _check_turns(turns: list[dict], paths: list[str], names: dict[str, str], start: int, must_end: tuple[str, ...],
                 report: list[tuple[Severity, str, str]]) -> None:
    """Role order, content, tool calls and suspicious text of one conversation. Problems at turns before `start`
    are not reported (they were, with the conversation's first continuation). A turn's path that is a plain
    field (alpaca's `output`) stands for its content and role; `names` renames role/content (ShareGPT's from/value)."""

    def add(i: int, severity: Severity, field: str, message: str) -> None:
        if i < start:
            return
        key = field[1:]
        if key in ("role", "content"):
            field = f".{names.get(key, key)}" if paths[i].endswith("]") else ""
        report.append((severity, f"{paths[i]}{field}", message))

    started = False
    prev: str | None = None
    call_ids: list[str] | None = None  # ids of the last assistant turn's tool calls; None: no call to answer
    last_user = ""
    for i, m in enumerate(turns):
        role, content = m["role"], m.get("content")
        if isinstance(content, str) and (marker := TEMPLATE_MARKER.search(content)):
            add(i, "warning", ".content", f"contains the template marker {marker.group(0)!r}; the text should be "
                "plain, the chat template adds the markup")
        if role == "system":
            if started:
                add(i, "warning", ".role", "a system turn after the conversation started; many chat templates "
                    "refuse it")
            if _blank(content):
                add(i, "warning", ".content", "the system prompt is empty")
        elif not started:
            started = True
            if role != "user":
                add(i, "error", ".role", f"a conversation starts with system or user, not {role}")
        if role == "user":
            if prev == "user":
                add(i, "error", ".role", "two user turns in a row")
            if _blank(content):
                add(i, "error", ".content", "is empty" if isinstance(content, str) else "is missing")
            last_user = content.strip() if isinstance(content, str) else ""
            call_ids = None
        elif role == "assistant":
            if prev == "assistant":
                add(i, "error", ".role", "two assistant turns in a row (a tool turn may sit between them)")
            calls = m.get("tool_calls") or []
            for j, c in enumerate(calls):
                fn = c["function"]
                if not fn["name"].strip():
                    add(i, "error", f".tool_calls[{j}].function.name", "is empty")
                try:
                    args = json.loads(fn["arguments"])
                except json.JSONDecodeError as e:
                    add(i, "error", f".tool_calls[{j}].function.arguments", json_problem(e))
                else:
                    if not isinstance(args, dict):
                        add(i, "error", f".tool_calls[{j}].function.arguments",
                            f"must be a JSON object, not {type(args).__name__}")
            if not calls:
                if content is None:
                    add(i, "error", ".content", "is missing (an assistant turn needs content or tool_calls)")
                elif not content.strip():
                    add(i, "warning", ".content", EMPTY_REPLY)
                elif last_user and content.strip() == last_user:
                    add(i, "warning", ".content", "the assistant reply repeats the user's prompt word for word")
            call_ids = [c.get("id", "") for c in calls] if calls else None
        elif role == "tool":
            if call_ids is None or prev not in ("assistant", "tool"):
                add(i, "error", ".role", "a tool result must follow an assistant turn that calls a tool")
            else:
                given = [c for c in call_ids if c]
                ref = m.get("tool_call_id")
                if ref and given and ref not in given:
                    add(i, "error", ".tool_call_id", f"{ref!r} matches no tool call of the assistant turn before it "
                        f"({', '.join(given)})")
            if content is None:
                add(i, "error", ".content", "is missing (the tool's result)")
        prev = role
    if turns and turns[-1]["role"] not in must_end and len(turns) > start:
        what = "the prompt must end with a user or tool turn" if "user" in must_end else \
            "the conversation must end with the assistant's reply"
        add(len(turns) - 1, "error", ".role", f"{what}, not a {turns[-1]['role']} turn")
    if not started and len(turns) > start:
        report.append(("error", paths[0] if paths else "messages", "has no user turn"))


def check_example(example: dict[str, Any], paths: dict[str, list[str]] | None = None,
                  names: dict[str, str] | None = None) -> list[Problem]:
    """Every content and role-order problem of one canonical example, errors and warnings, with field paths taken
    from `paths` (section -> source path of each turn; default `messages[i]`, `preference.chosen[i]`, ...) and
    `names` (the source's names for role and content)."""
    src = example["source"]
    file, line = src["file"], src["line"]
    paths, names = paths or {}, names or {}
    msgs = example["messages"]
    p_msgs = paths.get("messages") or [f"messages[{i}]" for i in range(len(msgs))]
    found: list[tuple[Severity, str, str]] = []
    if not msgs:
        found.append(("error", "messages", "is empty"))
    elif example.get("preference") is None:
        _check_turns(msgs, p_msgs, names, 0, ("assistant",), found)
    else:
        pref = example["preference"]
        _check_turns(msgs, p_msgs, names, 0, ("user", "tool"), found)
        for side in ("chosen", "rejected"):
            turns = pref[side]
            p_side = paths.get(side) or [f"preference.{side}[{i}]" for i in range(len(turns))]
            if not turns:
                found.append(("error", side, "is empty"))
                continue
            if not found or all(s == "warning" for s, _, _ in found):
                _check_turns(msgs + turns, p_msgs + p_side, names, len(msgs), ("assistant",), found)
    return [Problem(severity=s, file=file, line=line, field=f, message=m) for s, f, m in found]


def conversation_parts(example: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(the turns before the final assistant turn, all turns) as training sees them: for preference data, the
    prompt and the prompt followed by the chosen reply."""
    msgs = example["messages"]
    if example.get("preference") is not None:
        return msgs, msgs + example["preference"]["chosen"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return msgs[:last], msgs


def token_lengths(tokenizer: ChatTokenizer, example: dict[str, Any]) -> tuple[int, int]:
    """(prompt tokens, response tokens): the prompt is everything before the final assistant turn rendered with
    the generation prompt; the response is the whole conversation's count minus the prompt's (clipped at 0)."""
    prompt, full = conversation_parts(example)
    tools = example.get("tools")
    n_prompt = tokenizer.count(tokenizer.render(prompt, tools, True))
    n_full = tokenizer.count(tokenizer.render(full, tools, False))
    return n_prompt, max(0, n_full - n_prompt)


def check_length(example: dict[str, Any], lengths: tuple[int, int], max_tokens: int, drop: bool) -> Problem | None:
    total = lengths[0] + lengths[1]
    if max_tokens <= 0 or total <= max_tokens:
        return None
    src = example["source"]
    return warning(src["file"], src["line"], "", f"{total} tokens ({lengths[0]} prompt + {lengths[1]} response) is "
                   f"above max_tokens {max_tokens}" + ("; dropped" if drop else "; training will truncate it"))


def check_count(file: str, kept: int, min_examples: int) -> Problem | None:
    if kept >= min_examples:
        return None
    return error(file, 0, "", f"{kept} usable example{'s' if kept != 1 else ''} after validation and "
                 f"deduplication; min_examples is {min_examples}")
