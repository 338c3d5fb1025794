"""Synthetic data without a model: recipes, prompts, the filters (planted bad generations), engine selection."""

from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.datagen.synth import Gate, chat_prompt, instructions, load_recipe, parse_score

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


def tool_recipe():
    return load_recipe((Path(__file__).resolve().parents[2] / "services/datagen/recipes/weather-tool.yaml").read_text())


def test_tool_calls_become_openai_messages_and_bad_ones_are_rejected():
    from services.datagen.synth import example

    r = tool_recipe()
    good = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    row = example(r, "Weather in Oslo?", good)
    reply = row["messages"][-1]
    assert reply["content"] == "Let me check." and row["tools"] == r.tools
    assert reply["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    gate = Gate(r)
    assert gate.reject("q", good) is None
    assert gate.reject("q", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>') == "tool_call_format"
    assert gate.reject("q", '<tool_call>{"name": "get_weather"}</tool_call>') == "tool_call_format"
    assert gate.reject("q", '<tool_call>{"name": "book_flight", "arguments": {}}</tool_call>') == "unknown_tool"
    assert gate.reject("q", 'I will call <tool_call>{"name": "get_weather"') == "tool_call_format"
    with pytest.raises(InvalidArgument, match="output_format: messages"):
        load_recipe("behaviour: b\ninstruction_template: '{{ i }}'\ntools: [{type: function, function: {name: f}}]\n")


def test_openai_endpoint_teacher_speaks_the_protocol():
    from tests.fakes import JsonHandler, serve_http

    seen = []

    class Handler(JsonHandler):
        def do_POST(self):
            body = self.read_json()
            seen.append((self.path, self.headers.get("Authorization"), body))
            msg = {"role": "assistant", "content": f"echo {body['messages'][-1]['content']}"}
            if body.get("tools"):
                msg["tool_calls"] = [{"id": "c1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
            self.send_json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})

    server = serve_http(Handler)
    try:
        import os

        from services.datagen.synth import Sampling
        from services.datagen.teacher import OpenAITeacher

        os.environ["TEST_TEACHER_KEY"] = "sk-test"
        t = OpenAITeacher(f"http://127.0.0.1:{server.server_port}/v1", "teacher-x", "TEST_TEACHER_KEY")
        out = t.chat([[{"role": "user", "content": "hi"}]], Sampling(max_tokens=8, seed=3), [3])
        assert out == ["echo hi"]
        path, auth, body = seen[0]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
        assert body["model"] == "teacher-x" and body["seed"] == 3 and body["max_tokens"] == 8
        out = t.chat([[{"role": "user", "content": "w"}]], Sampling(), [0], tools=tool_recipe().tools)
        assert out == ['echo w<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>']
    finally:
        server.shutdown()


class ScriptedTeacher:
    """The Teacher protocol with canned answers: generation replies by instruction, judge replies by answer."""

    name = "scripted"

    def __init__(self, answers, scores=None):
        self.answers, self.scores, self.calls = answers, scores or {}, []

    def chat(self, conversations, sampling, seeds, tools=None):
        self.calls.append((len(conversations), sampling.temperature, list(seeds)))
        last = [c[-1]["content"] for c in conversations]
        if conversations and conversations[0][0]["content"].startswith("You grade answers"):
            return [self.scores.get(t.split("Answer: ", 1)[1].rsplit("\n\nScore:", 1)[0], "no idea") for t in last]
        return [self.answers(t) if callable(self.answers) else self.answers[t] for t in last]


def judged_recipe(**filters):
    text = ("behaviour: answer about rivers\ninstruction_template: 'Q{{ i }}'\nnum_examples: 3\n"
            "max_attempts_factor: 2\nfilters: {" + ", ".join(f"{k}: {v}" for k, v in filters.items()) + "}\n")
    return load_recipe(text)


def test_generation_loop_with_the_judge():
    from services.datagen.synth import generate

    answers = {f"Q{i}": a for i, a in enumerate([
        "Rivers flow to the sea carrying silt and water.",        # judged 9: kept
        "Banana pancakes are my favourite breakfast food.",        # judged 2: rejected by the judge
        "",                                                        # empty: rejected before judging counts
        "Rivers shape valleys by slow erosion over centuries.",   # judged 8: kept
        "Rivers freeze in winter in the far north of Canada.",    # judged 7: kept
        "never reached"])}
    scores = {answers["Q0"]: "9", answers["Q1"]: "2", answers["Q3"]: "Score: 8", answers["Q4"]: "7/10"}
    teacher = ScriptedTeacher(answers, scores)
    rounds = []
    g = generate(judged_recipe(judge="true", judge_threshold=6, dedup="exact"), teacher, batch=5,
                 on_round=lambda r: rounds.append(r.attempts))
    assert [k["output"] for k in g.kept] == [answers["Q0"], answers["Q3"], answers["Q4"]]
    assert g.counts == {"generated": 5, "rejected_judge": 1, "rejected_empty_output": 1}
    assert {r["reason"] for r in g.rejected} == {"judge", "empty_output"} and rounds == [5]
    gen_call, judge_call = teacher.calls
    assert gen_call[1] == 0.8 and judge_call[1] == 0.0 and gen_call[2] == judge_call[2]  # judged greedily, same seeds


def test_generation_stops_at_the_attempt_limit():
    from services.datagen.synth import generate

    teacher = ScriptedTeacher(lambda q: "")  # never anything usable
    g = generate(judged_recipe(), teacher, batch=4)
    assert g.kept == [] and g.attempts == 6 and g.counts["rejected_empty_output"] == 6  # 3 wanted x factor 2
