"""Synthetic data: the recipe (typed YAML), the prompts it makes, and the filters a generation must pass.

Pure Python (no vLLM here): the job in services.datagen.job runs the teacher; this module decides what to ask and
what to keep, so it is unit-tested without a model.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from services.core.errors import InvalidArgument, yaml_error
from services.core.specs import parse

WS = re.compile(r"\s+")


class Sampling(BaseModel):
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1, le=8192)
    seed: int = 0


class Filters(BaseModel):
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(4000, ge=1)
    dedup: Literal["none", "exact", "near"] = "near"
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)
    judge: bool = False
    judge_rubric: str = "Score 1-10: is the answer correct, helpful and in the requested behaviour?"
    judge_threshold: float = Field(6.0, ge=0.0, le=10.0)


class SeedExample(BaseModel):
    instruction: str
    output: str


class Recipe(BaseModel):
    """What to generate. `instruction_template` is a Jinja template over {{ topic }}, {{ i }} and {{ behaviour }};
    the teacher answers each instruction, prompted with `system_prompt` and the seed examples as few-shot turns."""

    behaviour: str = Field(min_length=1)
    instruction_template: str = Field(min_length=1)
    topics: list[str] = Field(default_factory=list)
    seeds: list[SeedExample] = Field(default_factory=list)
    system_prompt: str = ""
    output_format: Literal["alpaca", "messages"] = "alpaca"
    # OpenAI tool schemas offered to the teacher (messages format only): its <tool_call>{...}</tool_call> replies
    # become assistant tool_calls, checked against these names
    tools: list[dict[str, Any]] = Field(default_factory=list)
    num_examples: int = Field(10, ge=1, le=100_000)
    max_attempts_factor: float = Field(3.0, ge=1.0, le=20.0)
    few_shot: int = Field(2, ge=0, le=16)
    sampling: Sampling = Field(default_factory=Sampling)
    filters: Filters = Field(default_factory=Filters)

    @model_validator(mode="after")
    def _needs_variety(self) -> "Recipe":
        if not self.topics and "{{ i }}" not in self.instruction_template and not self.seeds:
            raise ValueError("give topics, seeds, or use {{ i }} in instruction_template, else every prompt is the same")
        if self.filters.min_chars > self.filters.max_chars:
            raise ValueError("filters.min_chars is above filters.max_chars")
        if self.tools and self.output_format != "messages":
            raise ValueError("tools need output_format: messages (alpaca has no tool calls)")
        for i, t in enumerate(self.tools):
            if not (t.get("type") == "function" and isinstance(t.get("function"), dict) and t["function"].get("name")):
                raise ValueError(f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}")
        return self

    @property
    def tool_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


def load_recipe(text: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse a recipe's YAML; every problem becomes an INVALID_ARGUMENT naming its field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(e, "spec.recipe_yaml") from None
    if not isinstance(data, dict):
        raise InvalidArgument.field("spec.recipe_yaml", "must be a YAML mapping (behaviour, instruction_template, ...)")
    data.update({k: v for k, v in (overrides or {}).items() if v})
    return parse(Recipe, data, "recipe")


def instructions(recipe: Recipe, start: int, count: int) -> list[str]:
    """The instructions for attempts start .. start+count-1 (deterministic: attempt i uses topic i mod n)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(recipe.instruction_template)
    topics = recipe.topics or [s.instruction for s in recipe.seeds] or [""]
    return [template.render(topic=topics[i % len(topics)], i=i, behaviour=recipe.behaviour).strip()
            for i in range(start, start + count)]


def chat_prompt(recipe: Recipe, instruction: str) -> list[dict[str, str]]:
    """System prompt, then up to `few_shot` seed examples as earlier turns, then the instruction."""
    msgs = [{"role": "system", "content": recipe.system_prompt}] if recipe.system_prompt else []
    for s in recipe.seeds[: recipe.few_shot]:
        msgs += [{"role": "user", "content": s.instruction}, {"role": "assistant", "content": s.output}]
    return msgs + [{"role": "user", "content": instruction}]


def judge_prompt(recipe: Recipe, instruction: str, output: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You grade answers. Reply with a single number from 1 to 10."},
            {"role": "user", "content": f"Behaviour wanted: {recipe.behaviour}\n{recipe.filters.judge_rubric}\n\n"
                                        f"Instruction: {instruction}\nAnswer: {output}\n\nScore:"}]


def parse_score(text: str) -> float | None:
    m = re.search(r"\b(10|[1-9])(?:\.\d+)?\b", text)
    return float(m.group(0)) if m else None


def normalise(text: str) -> str:
    return WS.sub(" ", text.lower()).strip()


TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_tool_calls(output: str) -> tuple[str, list[dict[str, Any]] | None, str | None]:
    """Hermes-style <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks -> (text, OpenAI tool_calls,
    problem). tool_calls is None when there are none; problem names what is malformed."""
    blocks = TOOL_CALL.findall(output)
    if not blocks:
        return output, None, ("unclosed <tool_call>" if "<tool_call>" in output else None)
    calls = []
    for i, raw in enumerate(blocks):
        try:
            call = json.loads(raw)
        except json.JSONDecodeError as e:
            return output, None, f"tool call {i} is not valid JSON: {e.msg}"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments"), dict):
            return output, None, f"tool call {i} needs a string name and an object of arguments"
        calls.append({"id": f"call_{i}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
    return TOOL_CALL.sub("", output).strip(), calls, None


def example(recipe: Recipe, instruction: str, output: str) -> dict[str, Any]:
    if recipe.output_format == "alpaca":
        return {"instruction": instruction, "input": "", "output": output}
    msgs = [{"role": "system", "content": recipe.system_prompt}] if recipe.system_prompt else []
    text, calls, _ = parse_tool_calls(output) if recipe.tools else (output, None, None)
    reply: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        reply["tool_calls"] = calls
    row: dict[str, Any] = {"messages": msgs + [{"role": "user", "content": instruction}, reply]}
    if recipe.tools:
        row["tools"] = recipe.tools
    return row


class Gate:
    """The filters, in order: format, length band, exact and near duplicates (against the seeds and everything
    kept so far). `reject` returns the reason or None; a kept example is remembered."""

    def __init__(self, recipe: Recipe):
        self.f = recipe.filters
        self.tools = recipe.tool_names
        self.exact: set[str] = set()
        self.lsh = None
        if self.f.dedup == "near":
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=self.f.near_duplicate_threshold, num_perm=128)
        self.n = 0
        for s in recipe.seeds:
            self.remember(s.instruction, s.output)

    @staticmethod
    def _minhash(text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=128, seed=1)  # character 5-grams: robust for the short answers generation makes
        for i in range(max(1, len(text) - 4)):
            m.update(text[i:i + 5].encode())
        return m

    def remember(self, instruction: str, output: str) -> None:
        text = normalise(instruction + " \n " + output)
        self.exact.add(hashlib.sha256(text.encode()).hexdigest())
        if self.lsh is not None:
            self.n += 1
            self.lsh.insert(f"k{self.n}", self._minhash(normalise(output)))

    def reject(self, instruction: str, output: str) -> str | None:
        out = output.strip()
        if not instruction.strip():
            return "empty_instruction"
        if not out:
            return "empty_output"
        if "\ufffd" in out or any(ord(c) < 32 and c not in "\n\t" for c in out):
            return "format"
        if self.tools:
            _, calls, problem = parse_tool_calls(out)
            if problem:
                return "tool_call_format"
            if calls and any(c["function"]["name"] not in self.tools for c in calls):
                return "unknown_tool"
        if len(out) < self.f.min_chars:
            return "too_short"
        if len(out) > self.f.max_chars:
            return "too_long"
        if self.f.dedup != "none":
            digest = hashlib.sha256(normalise(instruction + " \n " + out).encode()).hexdigest()
            if digest in self.exact:
                return "duplicate"
            if self.lsh is not None and self.lsh.query(self._minhash(normalise(out))):
                return "near_duplicate"
        return None


class Generation(BaseModel):
    kept: list[dict[str, Any]] = Field(default_factory=list)
    rejected: list[dict[str, Any]] = Field(default_factory=list)   # the first 200, with reasons
    counts: dict[str, int] = Field(default_factory=dict)           # generated, rejected_<reason>
    attempts: int = 0


def generate(recipe: Recipe, teacher, batch: int = 64, on_round=None) -> Generation:
    """Ask the teacher in batches until `num_examples` pass the gate (and the judge, when on) or the attempts
    (num_examples x max_attempts_factor) run out. `teacher.chat(conversations, sampling, seeds, tools)` is
    services.datagen.teacher's protocol; `on_round(result)` runs after each batch (progress, cancel checks)."""
    gate, g = Gate(recipe), Generation()
    want, limit = recipe.num_examples, int(recipe.num_examples * recipe.max_attempts_factor)
    while len(g.kept) < want and g.attempts < limit:
        n = min(batch, limit - g.attempts)
        instrs = instructions(recipe, g.attempts, n)
        seeds = [recipe.sampling.seed * 1_000_003 + g.attempts + j for j in range(n)]
        outputs = teacher.chat([chat_prompt(recipe, x) for x in instrs], recipe.sampling, seeds, recipe.tools)
        scores: list[float | None] = [None] * n
        if recipe.filters.judge:
            judging = recipe.sampling.model_copy(update={"temperature": 0.0, "max_tokens": 4})
            scores = [parse_score(t) for t in teacher.chat(
                [judge_prompt(recipe, x, o) for x, o in zip(instrs, outputs)], judging, seeds, None)]
        for instr, out, score in zip(instrs, outputs, scores):
            reason = gate.reject(instr, out)
            if reason is None and recipe.filters.judge and (score is None or score < recipe.filters.judge_threshold):
                reason = "judge"
            if reason:
                g.counts[f"rejected_{reason}"] = g.counts.get(f"rejected_{reason}", 0) + 1
                if len(g.rejected) < 200:
                    g.rejected.append({"reason": reason, "instruction": instr, "output": out, "score": score})
                continue
            gate.remember(instr, out)
            g.kept.append(example(recipe, instr, out.strip()))
            if len(g.kept) == want:
                break
        g.attempts += n
        g.counts["generated"] = g.attempts
        if on_round:
            on_round(g)
    return g


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(), sort_keys=True).encode()).hexdigest()
