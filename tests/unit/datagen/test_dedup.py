"""Exact and near duplicates: planted paraphrases are found, the first occurrence is kept, unrelated examples are
never clustered."""

from __future__ import annotations

import random

import pytest

from services.datagen.dedup import Deduplicator, content_id, normalised_text, shingles


def chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def unrelated(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfgklmnprstvz')}{rng.choice('aeiou')}{rng.choice('bcdfgklmnprstvz')}"
             f"{rng.choice('aeiou')}{i}" for i in range(3000)]
    return [chat(" ".join(rng.choices(vocab, k=rng.randint(12, 30))) + "?",
                 " ".join(rng.choices(vocab, k=rng.randint(20, 60))) + ".") for _ in range(n)]


BASE = ("Explain why the sky looks blue on a clear afternoon",
        "Sunlight is made of many colours and the short blue waves scatter off the molecules of the air far more "
        "than the long red waves do, so when you look at any part of the sky away from the sun you mostly see "
        "that scattered blue light coming at you from every direction of the clear afternoon sky above.")


def paraphrases() -> list[list[dict]]:
    user, reply = BASE
    return [chat(user, reply.replace("many colours", "several colours")),           # one word
            chat(user + "?", reply),                                                  # punctuation
            chat(user, reply.replace("far more", "much more")),                       # one word
            chat(user.replace("clear", "cloudless"), reply),                          # one word in the prompt
            chat(user, reply.replace(", so", "; so").replace("direction", "direction,"))]  # punctuation


def run(dedup: Deduplicator, convs: list[list[dict]]) -> list:
    out = []
    for line, msgs in enumerate(convs, 1):
        text = normalised_text(msgs)
        out.append(dedup.add(line, content_id(text), text))
    return out


def test_planted_near_duplicates_are_found_and_nothing_else():
    rng = random.Random(3)
    convs = unrelated(200)
    positions = sorted(rng.sample(range(10, 200), 5))
    convs.insert(5, chat(*BASE))
    for pos, p in zip(positions, paraphrases()):
        convs.insert(pos, p)
    d = Deduplicator("near", 0.8)
    found = run(d, convs)
    dup_lines = [line for line, dup in enumerate(found, 1) if dup is not None]
    planted = [i + 1 for i, c in enumerate(convs) if c[0]["content"].startswith("Explain")]
    assert dup_lines == planted[1:]
    assert all(dup.kind == "near" and dup.of_line == 6 for dup in found if dup is not None)
    [cluster] = d.clusters()
    assert cluster.kind == "near" and [line for line, _ in cluster.members] == planted
    assert (d.num_exact, d.num_near) == (0, 5)


def test_unrelated_examples_are_not_clustered_even_at_a_low_threshold():
    d = Deduplicator("near", 0.5)
    assert not any(run(d, unrelated(400, seed=1)))
    assert d.clusters() == []


def test_exact_duplicates_ignore_case_and_whitespace():
    a = chat("Hello   there", "General Kenobi")
    b = chat("hello there", "general\nkenobi")
    for mode in ("exact", "near"):
        d = Deduplicator(mode)
        found = run(d, [a, chat("x y z", "w"), b, b])
        assert [f.kind if f else None for f in found] == [None, None, "exact", "exact"]
        assert [c.model_dump() for c in d.clusters()] == [
            {"kind": "exact", "members": [(1, found[2].of_id), (3, found[2].of_id), (4, found[2].of_id)]}]


def test_exact_mode_does_not_look_for_near_duplicates():
    user, reply = BASE
    d = Deduplicator("exact")
    assert run(d, [chat(user, reply), chat(user + "?", reply)]) == [None, None]
    assert not any(run(Deduplicator("none"), [chat(user, reply)] * 3))


def test_tool_calls_and_preference_count_in_the_text():
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert normalised_text([{"role": "user", "content": "Go"}, call]) == 'user: go assistant: call f {"a": 1}'
    msgs = [{"role": "user", "content": "Q"}]
    one = normalised_text(msgs, {"chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant",
                                                                                                 "content": "B"}]})
    two = normalised_text(msgs, {"chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant",
                                                                                                 "content": "C"}]})
    assert one != two


@pytest.mark.parametrize("text,expected", [("", []), ("a, b!", [b"a b"]), ("a,  b c!", [b"a b c"]),
                                           ("abcdefab", [b"abcde", b"bcdef", b"cdefa", b"defab"]),
                                           ("abcdeabcde", [b"abcde", b"bcdea", b"cdeab", b"deabc", b"eabcd"])])
def test_shingles(text, expected):
    assert shingles(text) == expected  # character 5-grams of the words joined by one space, each once


REPHRASED = [  # (prompt, its rephrasing): the same request with a reworded ending, the same answer
    ("Explain the role of chlorophyll in photosynthesis in plant leaves.",
     "Explain the role of chlorophyll in photosynthesis in the leaves of plants."),
    ("Why is chlorophyll green in plant leaves?", "Why is chlorophyll green in the leaves of plants?"),
    ("What is the capital of France?", "What's the capital city of France?"),
    ("List three uses of copper in modern homes.", "List three uses of copper in homes today."),
]
ANSWER = ("Chlorophyll absorbs light energy, mostly red and blue light, and passes it on to the reactions that "
          "make sugar.")


@pytest.mark.parametrize("a, b", REPHRASED)
def test_rephrased_short_prompts_are_near_duplicates(a, b):
    d = Deduplicator(threshold=0.8)
    first = normalised_text([{"role": "user", "content": a}, {"role": "assistant", "content": ANSWER}])
    second = normalised_text([{"role": "user", "content": b}, {"role": "assistant", "content": ANSWER}])
    assert d.add(1, "a", first) is None
    dup = d.add(2, "b", second)
    assert dup is not None and dup.kind == "near" and dup.of_line == 1 and dup.similarity >= 0.8


def test_different_questions_with_different_answers_are_not():
    d = Deduplicator(threshold=0.8)
    for i, (country, city) in enumerate([("France", "Paris"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
                                         ("Kenya", "Nairobi"), ("Chile", "Santiago")]):
        text = normalised_text([{"role": "user", "content": f"What is the capital of {country}?"},
                                {"role": "assistant", "content": f"The capital of {country} is {city}."}])
        assert d.add(i, str(i), text) is None, country


def test_a_shared_system_prompt_does_not_make_examples_alike(tmp_path, tok):
    from services.datagen.prepare import PrepareOptions, prepare
    from tests.unit.datagen.helpers import write_jsonl

    system = " ".join(f"rule{i} applies always" for i in range(60))  # 180 words on every example
    rows = [{"messages": [{"role": "system", "content": system}, *conv]} for conv in unrelated(100, seed=2)]
    r = prepare(write_jsonl(tmp_path / "s.jsonl", rows), tmp_path / "o", PrepareOptions(), tok)
    assert r.ok and r.num_near_duplicates == 0 and r.num_kept == 100
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, *rows[7]["messages"][1:]]})
    r = prepare(write_jsonl(tmp_path / "s.jsonl", rows), tmp_path / "o", PrepareOptions(), tok)
    assert r.num_near_duplicates == 1 and r.warnings[0].message.startswith("a near duplicate of line 8")


def test_pairs_just_below_the_threshold_are_listed_for_review_and_kept():
    d = Deduplicator(threshold=0.95)
    a, b = REPHRASED[0]
    first = normalised_text([{"role": "user", "content": a}, {"role": "assistant", "content": ANSWER}])
    second = normalised_text([{"role": "user", "content": b}, {"role": "assistant", "content": ANSWER}])
    assert d.add(1, "a", first) is None and d.add(2, "b", second) is None  # ~0.88: kept at 0.95
    assert d.num_review == 1 and d.review[0]["line"] == 2 and d.review[0]["of_line"] == 1
    assert d.review_from <= d.review[0]["similarity"] < 0.95
