"""Blind A/B between two eval reports (the Chatbot Arena habit): the pairs a person votes on, the tally of the votes
with its interval, and the arena report page. No grpc, no I/O: the service stores what this computes.

A pair is one test both reports answered (neither errored) with outputs that differ: identical outputs have nothing
to choose between and are counted, not shown. Sides are random per pair (seeded), so a person cannot learn which
side is which; the side each vote saw is kept, so a side bias shows in the data.
"""

from __future__ import annotations

import html
import random
from dataclasses import asdict, dataclass
from typing import Any

from services.evaluation.scoring import wilson

CHOICES = ("a", "b", "tie", "both_bad")


@dataclass
class Pair:
    test_id: str
    block: str
    prompt: str
    a: str
    b: str
    a_on_left: bool

    def shown(self) -> dict[str, Any]:
        """What the page gets: the prompt and two outputs by side, never which report is which."""
        left, right = (self.a, self.b) if self.a_on_left else (self.b, self.a)
        return {"id": self.test_id, "block": self.block, "prompt": self.prompt, "left": left, "right": right}


def pairs(report_a: dict, report_b: dict, seed: int = 0) -> tuple[list[Pair], int]:
    """(the pairs to vote on, how many tests had identical outputs) of two report.json bodies."""
    a = {t["id"]: t for t in report_a["tests"] if not t.get("errored")}
    rng = random.Random(seed)
    out, identical = [], 0
    for t in report_b["tests"]:
        other = a.get(t["id"])
        if other is None or t.get("errored"):
            continue
        if (other.get("output") or "") == (t.get("output") or ""):
            identical += 1
            continue
        out.append(Pair(t["id"], t.get("block", ""), t.get("prompt", ""), other.get("output") or "",
                        t.get("output") or "", rng.random() < 0.5))
    return out, identical


@dataclass
class Tally:
    a_wins: int
    b_wins: int
    ties: int
    both_bad: int
    b_win_rate: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, choices: list[str]) -> "Tally":
        n = {c: choices.count(c) for c in CHOICES}
        decisive = n["a"] + n["b"]
        lo, hi = wilson(n["b"], decisive)
        return cls(n["a"], n["b"], n["tie"], n["both_bad"], n["b"] / decisive if decisive else 0.0, lo, hi)

    def sentence(self, a: str, b: str) -> str:
        decisive = self.a_wins + self.b_wins
        if not decisive:
            return f"no decisive vote ({self.ties} ties, {self.both_bad} both bad)"
        return (f"{b} preferred in {self.b_wins} of {decisive} decisive votes: {self.b_win_rate:.0%} "
                f"[{self.ci_low:.0%}, {self.ci_high:.0%}] over {a}; {self.ties} ties, {self.both_bad} both bad")


def arena_html(body: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(v['test_id'])}</td><td>{e(v['choice'])}</td><td>{'A' if v['a_on_left'] else 'B'}"
                   f"</td><td>{v['seconds']:.1f}</td></tr>" for v in body["votes"])
    t = body["tally"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>arena {e(body['name'])}</title><style>"
            "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:900px}td,th{border:1px solid #ddd;"
            "padding:3px 8px}table{border-collapse:collapse}</style></head><body>"
            f"<h1>Blind A/B: {e(body['name'])}</h1><p>A = <code>{e(body['report_a'])}</code><br>B = <code>"
            f"{e(body['report_b'])}</code></p><h2 id='result'>{e(body['sentence'])}</h2>"
            f"<p>{t['a_wins']} A, {t['b_wins']} B, {t['ties']} ties, {t['both_bad']} both bad; {body['identical']} "
            f"tests had identical outputs and were not shown. Voter: {e(body['voter'] or 'unnamed')}.</p>"
            f"<table><tr><th>test</th><th>choice</th><th>left was</th><th>seconds</th></tr>{rows}</table>"
            "</body></html>")


def result_body(name: str, a_uri: str, b_uri: str, votes: list[dict], identical: int, voter: str) -> dict[str, Any]:
    tally = Tally.of([v["choice"] for v in votes])
    return {"name": name, "report_a": a_uri, "report_b": b_uri, "votes": votes, "identical": identical,
            "voter": voter, "tally": asdict(tally), "sentence": tally.sentence("A", "B")}
