"""Synthetic data without a model: recipes, prompts, the filters (planted bad generations), engine selection."""

from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.datagen.synth import Gate, chat_prompt, instructions, load_recipe, parse_score
from services.datagen.teacher import engine_args

RECIPES = sorted((Path(__file__).resolve().parents[2] / "services" / "datagen" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path.read_text())
    assert recipe.num_examples >= 1 and instructions(recipe, 0, 3)


def test_recipe_errors_name_the_field_or_line():
    with pytest.raises(InvalidArgument, match="line 2"):
        load_recipe("behaviour: x\n  bad: [indent\n")
    with pytest.raises(InvalidArgument) as e:
        load_recipe("behaviour: x\ninstruction_template: 'about {{ i }}'\nsampling: {temperature: 9}\n")
    assert {v.field for v in e.value.violations} == {"recipe.sampling.temperature"}
    with pytest.raises(InvalidArgument, match="every prompt is the same"):
        load_recipe("behaviour: x\ninstruction_template: 'same'\n")
    with pytest.raises(InvalidArgument, match="mapping"):
        load_recipe("- a list")


def recipe(**filters):
    base = "behaviour: b\ninstruction_template: 'Tell me about {{ topic }} ({{ i }})'\ntopics: [a, b]\n"
    base += "seeds: [{instruction: 'Say hi', output: 'Hello there, nice to meet you today.'}]\n"
    if filters:
        base += "filters: {" + ", ".join(f"{k}: {v}" for k, v in filters.items()) + "}\n"
    return load_recipe(base)


def test_prompts_are_deterministic_and_few_shot():
    r = recipe()
    assert instructions(r, 0, 3) == ["Tell me about a (0)", "Tell me about b (1)", "Tell me about a (2)"]
    msgs = chat_prompt(r, "Q")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[-1]["content"] == "Q"


def test_the_filters_reject_planted_bad_generations():
    gate = Gate(recipe(min_chars=10, max_chars=180, dedup="near"))
    good = ("Rivers carry water from the high mountains down through forests and fields to the sea, "
            "shaping valleys over many thousands of years.")
    planted = {
        "": "empty_output",
        "   ": "empty_output",
        "ok": "too_short",
        "x" * 181: "too_long",
        "broken \ufffd bytes here ok": "format",
        "bell \x07 character in text": "format",
        "Hello there, nice to meet you today.": "near_duplicate",  # the seed's answer again
    }
    for output, reason in planted.items():
        assert gate.reject("Tell me", output) == reason, output
    assert gate.reject("Say hi", "Hello there, nice to meet you today.") == "duplicate"  # exactly the seed
    assert gate.reject("", good) == "empty_instruction"
    assert gate.reject("Tell me", good) is None
    gate.remember("Tell me", good)
    assert gate.reject("Tell me", good) == "duplicate"
    assert gate.reject("Tell me again", good.replace("many thousands", "thousands")) == "near_duplicate"
    assert gate.reject("Other", "Copper turns green when it oxidises in moist air outside.") is None


def test_judge_scores_parse():
    assert parse_score("Score: 7") == 7.0 and parse_score("10/10") == 10.0 and parse_score("none") is None


def test_engine_args_follow_the_device():
    cpu, gpu = engine_args("/m", "cpu"), engine_args("/m", "cuda")
    assert cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] > 0 and "gpu_memory_utilization" not in cpu
    assert gpu["gpu_memory_utilization"] == 0.85 and "kv_cache_memory_bytes" not in gpu and "enforce_eager" not in gpu
    assert cpu["model"] == gpu["model"] == "/m" and not cpu["trust_remote_code"]
