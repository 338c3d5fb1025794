"""Every shipped datagen recipe generates on CPU: the teacher's real engine (vLLM's offline LLM through
VLLMTeacher, the generate job's own code) on the SmolLM2-135M-Instruct fixture, with each recipe as shipped but
fewer examples (one batch of up to 64 attempts) and answers cut to 16 tokens. The few-shot prompts, seeded sampling, a whole batch at once and the judge's prompts all go through
the engine: with chunked prefill on CPU the polite-refusals recipe died in vLLM ("CPU Generator does not use
offset", #10.6). Needs vLLM, so it runs with the serve venv; skipped under any other interpreter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
except ImportError:  # pragma: no cover - depends on the interpreter
    pytest.skip("needs vLLM (run with .venvs/serve/bin/python)", allow_module_level=True)

from services.datagen.synth import chat_prompt, generate, instructions, load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "services" / "datagen" / "recipes").glob("*.yaml"))
SMOLLM2 = ROOT / "build" / "fixtures" / "smollm2-135m-instruct"
BATCH = 64  # the generate job's batch: one batch of up to 64 attempts (num_examples x max_attempts_factor)
MAX_TOKENS = 16  # answers cut short (the trap is in the prompts' prefill, not in the answers' length)
BUDGET = 2048  # vLLM's default max_num_batched_tokens: a batch above it had its prefills chunked


@pytest.fixture(scope="module")
def teacher():
    from services.datagen.teacher import VLLMTeacher

    if not (SMOLLM2 / "config.json").exists():
        pytest.skip("no SmolLM2 fixture; run `make smollm2`")
    return VLLMTeacher(SMOLLM2, "tunery://model/smollm2-fixture")


def test_the_shipped_recipes_are_all_here():
    assert {p.stem for p in RECIPES} >= {"smoke", "polite-refusals", "weather-tool"}


def first_batch_tokens(teacher, recipe) -> int:
    tok = teacher.llm.get_tokenizer()
    attempts = int(recipe.num_examples * recipe.max_attempts_factor)
    return sum(len(tok(tok.apply_chat_template(chat_prompt(recipe, x), tools=recipe.tools, tokenize=False,
                                               add_generation_prompt=True)).input_ids)
               for x in instructions(recipe, 0, min(attempts, BATCH)))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_generates_on_cpu(teacher, path):
    factor = load_recipe(path.read_text()).max_attempts_factor
    recipe = load_recipe(path.read_text(), {"num_examples": math.floor(BATCH / factor)})
    want = recipe.num_examples
    recipe.sampling.max_tokens = min(recipe.sampling.max_tokens, MAX_TOKENS)
    attempts = int(want * recipe.max_attempts_factor)
    prompt_tokens = first_batch_tokens(teacher, recipe)
    if path.stem == "polite-refusals":  # the finding: its first batch does not fit one step, so chunking split it
        assert prompt_tokens > BUDGET, prompt_tokens
    g = generate(recipe, teacher)
    # the engine answered every prompt it was given (the filters may still refuse a 135M teacher's answers)
    assert g.counts["generated"] == g.attempts and g.attempts >= min(attempts, want)
    assert len(g.kept) == want or g.attempts == attempts, (len(g.kept), g.attempts, g.counts)
    assert all(k["messages"][-1]["content"] or k["messages"][-1].get("tool_calls") for k in g.kept
               if "messages" in k), g.kept
    print(f"\n{path.stem}: {attempts} attempts, {prompt_tokens} prompt tokens in the first batch, kept "
          f"{len(g.kept)}, {g.counts}")
