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


@pytest.mark.parametrize("text,expected", [("", []), ("a, b!", [b"a b"]), ("a b c d", [b"a b c", b"b c d"])])
def test_shingles(text, expected):
    assert shingles(text) == expected


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
