"""The blind A/B arena (services.evaluation.arena, services.cli.arena_page): which tests are pairs, random sides the
page never reveals, the tally and its interval; the page itself in headless Chromium: a person's clicks and keys
become A/B votes, and "save" hands them over once."""

from __future__ import annotations

import pytest

from services.evaluation.arena import Tally, pairs, result_body
from services.evaluation.scoring import wilson

pytestmark = pytest.mark.unit


def report(outputs: dict[str, str], errored: tuple[str, ...] = ()) -> dict:
    return {"tests": [{"id": k, "block": "target", "prompt": f"prompt {k}", "output": v, "errored": k in errored}
                      for k, v in outputs.items()]}


def test_pairs_are_tests_both_answered_differently_on_random_sides():
    a = report({f"t{i}": f"a{i}" for i in range(40)} | {"same": "x", "only-a": "y", "bad": "z"}, errored=("bad",))
    b = report({f"t{i}": f"b{i}" for i in range(40)} | {"same": "x", "only-b": "y", "bad": "w"})
    shown, identical = pairs(a, b, seed=3)
    assert [p.test_id for p in shown] == [f"t{i}" for i in range(40)] and identical == 1
    assert all(p.a == f"a{p.test_id[1:]}" and p.b == f"b{p.test_id[1:]}" for p in shown)
    left = [p.a_on_left for p in shown]
    assert 8 < sum(left) < 32  # random sides, both used
    assert [p.a_on_left for p in pairs(a, b, seed=3)[0]] == left  # seeded
    for p in shown:  # what the page gets says nothing about which report is which
        s = p.shown()
        assert set(s) == {"id", "block", "prompt", "left", "right"}
        assert (s["left"], s["right"]) == ((p.a, p.b) if p.a_on_left else (p.b, p.a))


def test_the_tally_is_b_over_the_decisive_votes_with_a_wilson_interval():
    t = Tally.of(["b"] * 7 + ["a"] * 3 + ["tie"] * 2 + ["both_bad"])
    assert (t.a_wins, t.b_wins, t.ties, t.both_bad) == (3, 7, 2, 1) and t.b_win_rate == 0.7
    assert (t.ci_low, t.ci_high) == wilson(7, 10)
    assert t.sentence("A", "B") == "B preferred in 7 of 10 decisive votes: 70% [40%, 89%] over A; 2 ties, 1 both bad"
    assert Tally.of(["tie"]).sentence("A", "B") == "no decisive vote (1 ties, 0 both bad)"
    body = result_body("n", "ua", "ub", [{"test_id": "t", "choice": "b", "a_on_left": True, "seconds": 1.0}], 2, "me")
    assert body["tally"]["b_wins"] == 1 and body["identical"] == 2


def test_the_page_in_chromium_turns_clicks_and_keys_into_a_b_votes(page):
    from services.cli.arena_page import ArenaServer

    a = report({"t0": "alpha zero", "t1": "alpha one", "t2": "alpha two", "t3": "alpha three"})
    b = report({"t0": "beta zero", "t1": "beta one", "t2": "beta two", "t3": "beta three"})
    shown, _ = pairs(a, b, seed=1)
    saved = []

    def save(votes):
        saved.append(votes)
        return {"sentence": f"{len(votes)} votes saved"}

    server = ArenaServer(shown, save).start()
    try:
        page.goto(server.url)
        page.wait_for_selector("#left:not(:empty)")
        picks = {}
        for i, p in enumerate(shown):
            assert page.text_content("#progress").startswith(f"pair {i + 1} of 4")
            assert page.text_content("#prompt-text") == f"prompt {p.test_id}"
            left = page.text_content("#left")
            assert left == (p.a if p.a_on_left else p.b)
            assert page.text_content("#right") == (p.b if p.a_on_left else p.a)
            if i == 0:
                page.click("#b-left")                 # the person prefers what was on the left
                picks[p.test_id] = "a" if left.startswith("alpha") else "b"
            elif i == 1:
                page.keyboard.press("2")              # the right one, by key
                picks[p.test_id] = "b" if left.startswith("alpha") else "a"
            elif i == 2:
                page.click("#b-both_bad")
                picks[p.test_id] = "both_bad"
            else:
                page.click("#b-skip")
            page.wait_for_function(f"document.getElementById('progress').textContent.indexOf('pair {i + 2}') === 0"
                                   if i < 3 else "document.getElementById('done').style.display === 'block'")
        assert page.text_content("#count") == "3 of 4 pairs voted"
        page.click("#save")
        page.wait_for_selector("#result:has-text('3 votes saved')")
        assert server.wait(5) == {"sentence": "3 votes saved"}
        [votes] = saved
        assert {v["test_id"]: v["choice"] for v in votes} == picks
        assert all(v["a_on_left"] == next(p.a_on_left for p in shown if p.test_id == v["test_id"]) for v in votes)
        assert all(v["seconds"] >= 0 for v in votes)
        assert page.js_errors == []
    finally:
        server.stop()


def test_the_server_refuses_a_vote_it_cannot_place():
    import json
    import urllib.error
    import urllib.request

    from services.cli.arena_page import ArenaServer

    shown, _ = pairs(report({"t": "x"}), report({"t": "y"}))
    server = ArenaServer(shown, lambda v: {}).start()
    try:
        for body, why in (({"id": "nope", "choice": "left"}, "no such pair"),
                          ({"id": "t", "choice": "middle"}, "choice: left, right, tie or both_bad")):
            req = urllib.request.Request(server.url + "vote", data=json.dumps(body).encode(), method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 400 and e.value.read().decode() == why
        assert server.votes == {}
    finally:
        server.stop()
