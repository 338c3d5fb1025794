"""The CLI's job view (services/cli/console.py): event lines are kept whole, the progress line keeps its bar and
percentage by cutting its description with an ellipsis (the issue: '+ lm-eval tasks ⏎ fact_sentences')."""

from __future__ import annotations

import io

from rich.console import Console

from services.cli import console
from services.gen.tunery.v1 import common_pb2 as pb

LONG = ("3 cases (target: 0, general: 3, tool_calling: 0) + the user's promptfoo suite (4 tests) + lm-eval tasks "
        "fact_sentences, fact_sentences_gen")


class Events:
    def __init__(self, events):
        self.events = events

    def watch(self, job_id, after=0):
        yield from self.events


def test_cut():
    assert console.cut("short", 10) == "short"
    assert console.cut("a" * 30, 10) == "a" * 9 + "…" and len(console.cut("a" * 30, 10)) == 10


def test_event_lines_stay_whole_and_the_bar_keeps_its_percentage(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buf, width=80, force_terminal=False))
    metrics = {"max_abs_logit_diff": 6.26e-07, "mean_kl": 1.64e-09, "greedy_identical": 3.0, "shard": 3.0}
    events = [pb.JobEvent(cursor=1, text=LONG),
              pb.JobEvent(cursor=2, type=pb.EVENT_TYPE_METRICS, step=4, total_steps=4, metrics=metrics)]
    console.render_watch(Events(events), "merging-edd0b116147d")
    out = buf.getvalue()
    assert f"#1 {LONG}" in out  # one line, as long as it is: the terminal wraps it, nothing cuts a phrase
    [bar] = [line for line in out.splitlines() if "merging-edd0b116147d" in line]
    assert "100%" in bar and len(bar) <= 80 and "…" in bar
