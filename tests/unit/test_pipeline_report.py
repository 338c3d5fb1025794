"""The pipeline's report (services.pipeline.report): pipeline.json's figures from the pipeline's state, and
pipeline.html in headless Chromium: the verdict and the stamps, the lineage picture, every form's blocks with
intervals, the flips, the loss curve, the stage times and the endpoint; then the blind A/B votes cast since, which
`tunery pipeline report` finds among the store's arena reports and adds to the page."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest

from services.gen.tunery.v1 import evaluation_pb2 as ev
from services.gen.tunery.v1 import pipeline_pb2
from services.pipeline.job import Form, StageRun
from services.pipeline.report import build_report, render_html, with_arenas

pytestmark = pytest.mark.unit
# a 1x1 PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def eval_report(target: tuple[int, int], general: tuple[int, int]) -> ev.EvalReport:
    from services.evaluation.scoring import wilson

    blocks = []
    for block, (passed, total) in ((ev.EVAL_BLOCK_TARGET, target), (ev.EVAL_BLOCK_GENERAL, general)):
        lo, hi = wilson(passed, total)
        blocks.append(ev.BlockResult(block=block, passed=passed, total=total, pass_rate=passed / total,
                                     ci_low=lo, ci_high=hi))
    return ev.EvalReport(blocks=blocks)


def pipeline(force: bool = False, smoke: bool = False):
    reports = {"base": eval_report((1, 16), (40, 42)), "base+prompting": eval_report((5, 16), (40, 42)),
               "base+adapter": eval_report((16, 16), (41, 42)), "merged": eval_report((16, 16), (41, 42)),
               "gptq-w4a16": eval_report((15, 16), (40, 42)), "deployment demo": eval_report((15, 16), (40, 42))}
    uris = {k: f"tunery://default/report-{i}" for i, k in enumerate(reports)}
    forms = [Form("base+adapter", "tunery://default/adapter-1", report=uris["base+adapter"]),
             Form("merged", "tunery://default/model-m", report=uris["merged"], compared_with="base+adapter",
                  verdict="PASS", metrics={"max_abs_logit_diff": 0.43, "mean_kl": 3.5e-4, "greedy_identical": 8,
                                           "probe_prompts": 8, "bytes_written": 270e6}),
             Form("gptq-w4a16", "tunery://default/model-q", report=uris["gptq-w4a16"], compared_with="merged",
                  verdict="PASS", reasons=["target -6.2%"],
                  metrics={"output_bytes": 90e6, "model_bytes": 270e6, "compression_ratio": 3.0})]
    gate = {"verdict": "PASS", "reasons": ["gates: target ≥ 80%", "target pass rate 100.0% ≥ gate 80.0%"],
            "beats_prompting_baseline": True,
            "flips": {"fail_to_pass": 15, "pass_to_fail": 0, "tests": [
                {"test": "heldout-3", "block": "target", "now_passes": True, "prompt": "p", "baseline": "<b>x</b>",
                 "candidate": "{\"category\": \"billing\"}"}]},
            "paired": [{"block": "target", "pairs": 16, "gained": 15, "lost": 0, "difference": 15 / 16,
                        "ci": [0.7, 0.99], "mcnemar_p": 6e-5, "forgetting_points": 0.0, "lost_tests": []}]}
    runs = {s: StageRun(s, f"p-{s}", "succeeded", False, float(i + 1), float(i + 1))
            for i, s in enumerate(("import-base", "data", "train", "eval", "merge", "serve"))}
    made = {"base": "tunery://default/model-b", "dataset": "tunery://default/dataset-d",
            "adapter": "tunery://default/adapter-1", "merged": "tunery://default/model-m"}
    client = SimpleNamespace(get_artifact=lambda uri: SimpleNamespace(metrics={"server_start_s": 30.0,
                                                                               "tests_s": 9.0}))
    return SimpleNamespace(
        reports=lambda: reports, report_uris=lambda: uris, c=client, gate=gate, forms=forms, made=made,
        job=SimpleNamespace(pipeline_id="demo-0123456789"), spec=pipeline_pb2.PipelineSpec(name="demo", force=force),
        smoke=smoke, slice={"max_steps": 6}, notes=["a note"], train_metrics={"train_loss": 0.5, "other": 1.0},
        stages=SimpleNamespace(runs=runs), name=lambda: "demo",
        deployment={"name": "demo", "form": "gptq-w4a16", "base_url": "http://127.0.0.1:8000/demo/v1",
                    "served_models": ["demo"], "state": "READY", "report": uris["deployment demo"],
                    "verdict": "PASS", "answered": {"prompt": "My card was charged twice", "seconds": 0.8,
                                                    "reply": "{\"category\": \"billing\"}", "model": "demo"}})


def test_the_json_holds_every_figure():
    d = build_report(pipeline())
    assert d["verdict"] == "PASS" and not d["forced"] and not d["smoke"] and d["smoke_slice"] == {}
    assert d["blocks"]["base+adapter"]["target"] == {"passed": 16, "total": 16, "pass_rate": 1.0,
                                                     "ci": [pytest.approx(0.806, abs=1e-3), 1.0], "errored": 0}
    assert d["prompting_enough"]["answer"] == "no: the adapter beats the prompted base"
    assert d["prompting_enough"]["target_pass_rate"] == {"base": 1 / 16, "base+prompting": 5 / 16, "base+adapter": 1.0}
    assert [s["stage"] for s in d["stages"]] == ["import-base", "data", "train", "eval", "merge", "serve"]
    assert d["total_stage_seconds"] == 21.0 and d["training"] == {"train_loss": 0.5}
    assert d["endpoint_call"].startswith("curl http://127.0.0.1:8000/demo/v1/chat/completions")
    assert '"model": "demo"' in d["endpoint_call"] and d["eval_seconds"]["merged"] == {"server_start_s": 30.0,
                                                                                      "tests_s": 9.0}
    assert build_report(pipeline(), error="train (p-train) failed: boom")["verdict"] == "ERROR"


def test_the_page_in_chromium(page, tmp_path):
    html = tmp_path / "pipeline.html"
    d = build_report(pipeline(force=True, smoke=True))
    page_html = render_html(d, PNG)
    assert with_arenas(page_html, []) == page_html
    html.write_text(with_arenas(page_html, [f"blind A/B (arena-1): {A_B} <script>x</script>"]))
    page.goto(html.as_uri())
    assert page.text_content("#verdict") == "PASS"
    stamps = page.locator(".stamp").all_text_contents()
    assert stamps == ["SMOKE: never promoted", "FORCED past failed gates"]
    # the lineage: base -> dataset -> adapter -> merged -> the W4A16 form -> the deployment, boxes joined by arrows
    boxes = page.locator("svg rect")
    assert boxes.count() == 6 and page.locator("svg line").count() == 5
    labels = page.locator("svg text[font-weight='600']").all_text_contents()
    assert labels == ["base", "dataset", "adapter", "merged", "gptq-w4a16", "deployment demo"]
    assert all(b.bounding_box()["width"] > 100 for b in boxes.all())
    # every form a row, each block's rate and interval, the verdict against the form it came from
    rows = page.locator("#forms tr")
    assert rows.count() == 1 + 6
    merged = page.locator("#forms tr", has_text="merged").first.text_content()
    assert "100% [81%, 100%]" in merged and "16/16" in merged and "PASS" in merged and "base+adapter" in merged
    assert "94% [72%, 99%]" in page.locator("#forms tr", has_text="gptq-w4a16").first.text_content()
    # the flipped tests, escaped as text (a model's output is never markup)
    page.click("summary")
    assert page.locator("details td", has_text="<b>x</b>").count() == 1 and page.locator("details b").count() == 0
    loss = page.locator("img[alt='loss curve']")
    assert loss.evaluate("img => img.complete && img.naturalWidth") == 1
    assert page.locator("#stages tr").count() == 1 + 6
    assert "it answered an openai-client request in 0.8 s" in page.text_content("body")
    assert "My card was charged twice" in page.text_content("#answer")
    # the votes a person cast after the run, as text, at the end of the page
    assert page.locator("#arena li").all_text_contents() == [f"blind A/B (arena-1): {A_B} <script>x</script>"]
    assert page.locator("#arena script").count() == 0
    assert page.js_errors == []


A_B = "base+adapter preferred in 5 of 6 decisive votes: 83% [44%, 97%] over base; 1 ties, 0 both bad"


def arena_artifact(a: str, b: str, wins: tuple[int, int], ties: int = 0):
    from services.evaluation.scoring import wilson

    lo, hi = wilson(wins[1], sum(wins))
    return SimpleNamespace(id=f"arena-{a[-1]}{b[-1]}", metadata={"report": "arena", "report_a": a, "report_b": b},
                           metrics={"a_wins": wins[0], "b_wins": wins[1], "ties": ties, "both_bad": 0,
                                    "b_win_rate": wins[1] / sum(wins), "ci_low": lo, "ci_high": hi})


def test_pipeline_report_finds_the_votes_between_two_of_its_reports():
    """`tunery pipeline report` (services.cli.commands.pipeline.arenas): the arena reports whose two sides are both
    this pipeline's reports, each as a sentence naming the forms; an arena between other reports is not its."""
    from services.cli.commands.pipeline import arenas

    d = build_report(pipeline())
    uris = pipeline().report_uris()
    mine = arena_artifact(uris["base"], uris["base+adapter"], (1, 5), ties=1)
    other = arena_artifact(uris["base"], "tunery://default/report-elsewhere", (2, 2))
    stored = [mine, other, SimpleNamespace(id="r", metadata={"report": "eval"}, metrics={})]
    client = SimpleNamespace(list_artifacts=lambda kind: iter(stored))
    assert d["reports"] == uris
    assert arenas(client, d) == [f"blind A/B (arena-02): {A_B}"]
    # a report written before it named its reports: no arena lines, and no crash
    assert arenas(client, {k: v for k, v in d.items() if k != "reports"}) == []
