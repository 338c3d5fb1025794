"""`tunery arena REPORT_A REPORT_B`: a blind A/B page for a person. For each test both eval reports answered with
different outputs, the two outputs on random sides; votes left, right, tie or both bad; on save they are stored as
an arena report artifact (the evaluation service), with B's win rate over the decisive votes and its interval."""

from __future__ import annotations

import webbrowser

import typer

from services.cli.console import OPTS, client, emit, err, out, rpc
from services.evaluation.arena import pairs


def report_body(c, report: str) -> dict:
    """An eval report as the arena pairs it: its tests' ids, blocks, prompts and outputs."""
    from services.gen.tunery.v1 import evaluation_pb2 as ev

    r = rpc(c.eval_report, report)
    return {"tests": [{"id": t.test_id, "block": ev.EvalBlock.Name(t.block).removeprefix("EVAL_BLOCK_").lower(),
                       "prompt": t.prompt, "output": t.output, "errored": t.errored} for t in r.tests]}


def arena(report_a: str = typer.Argument(..., help="An eval report (A), e.g. the base's."),
          report_b: str = typer.Argument(..., help="Another eval report (B), e.g. the adapter's."),
          port: int = typer.Option(0, help="The page's port on 127.0.0.1 (0: any free one)."),
          seed: int = typer.Option(0, help="Seeds the random sides."),
          voter: str = typer.Option("", help="Who votes (kept with the votes)."),
          name: str = typer.Option("", help="The arena report's name (default arena-<B>-vs-<A>)."),
          open_: bool = typer.Option(True, "--open/--no-open", help="Open the page in a browser.")) -> None:
    """Vote blind between two reports' outputs in a browser; the votes become an arena report."""
    from services.cli.arena_page import ArenaServer

    c = client()
    shown, identical = pairs(report_body(c, report_a), report_body(c, report_b), seed)
    if not shown:
        err.print(f"nothing to vote on: the reports share no test with different outputs ({identical} identical)")
        raise typer.Exit(1)

    def save(votes: list[dict]) -> dict:
        result = c.save_arena_votes(report_a, report_b, votes, name=name, voter=voter)
        from services.evaluation.arena import Tally

        t = Tally(result.a_wins, result.b_wins, result.ties, result.both_bad, result.b_win_rate, result.ci_low,
                  result.ci_high)
        return {"sentence": t.sentence("A", "B"), "report": result.report.uri}

    server = ArenaServer(shown, save, port).start()
    err.print(f"{len(shown)} pairs to vote on ({identical} tests had identical outputs): {server.url}")
    err.print("vote, then press 'Save the votes' (Ctrl-C stops without saving)")
    if open_:
        webbrowser.open(server.url)
    try:
        result = server.wait()
    except KeyboardInterrupt:
        server.stop()
        raise typer.Exit(130)
    server.stop()
    if OPTS["json"]:
        emit(result)
    else:
        out.print(f"{result['sentence']}\nreport {result['report']}")
