"""`tunery demo`: the main job on the embedded default. It chains the stages by hand today; the pipeline
service takes it over (the pipeline issue), and this command then submits a pipeline.

The base is a real instruct model, SmolLM2-135M-Instruct (`make smollm2` builds it offline), and the behaviour is
one a team would want and prompting does not give reliably: support tickets triaged into a fixed JSON record
(fixtures/demo/make_tickets.py), each field checked. Forgetting is measured on facts the base states correctly
(fixtures/demo/make_probes.py), scored by knowledge, and by an lm-eval task on the same facts (log-likelihood).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from services.cli import stack
from services.cli.console import emit, err, render_watch, rpc, state_name
from services.gen.tunery.v1 import common_pb2 as pb
from services.sdk.client import TuneryClient

REPO = Path(__file__).resolve().parents[3]
DEMO_DATA = REPO / "fixtures" / "demo"
DEMO_MODEL = REPO / "build" / "fixtures" / "smollm2-135m-instruct"
# The demo's gates: the target behaviour learned on held-out tickets, at most 2 points of facts forgotten.
MIN_TARGET = 0.8
MAX_GENERAL_DROP = 2.0
# the W4A16 form against base + adapter: at most this many points of any block's tests lost to 4-bit weights
MAX_FORM_DROP = 5.0


def _system_prompt(tickets: Path) -> str:
    first = json.loads(tickets.read_text().splitlines()[0])
    return next(m["content"] for m in first["messages"] if m["role"] == "system")


class Steps:
    """Each step a job, watched with a progress bar; the wall time of each is kept for the summary."""

    def __init__(self, c: TuneryClient):
        self.c, self.seconds = c, {}

    def run(self, key: str, what: str, job: pb.Job, timeout: float = 3600) -> pb.Job:
        t0 = time.monotonic()
        err.print(f"[bold]{what}[/bold]: job {job.id}")
        render_watch(self.c, job.id)
        final = rpc(self.c.wait, job.id, timeout)
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.monotonic() - t0, 1)
        if final.state != pb.JOB_STATE_SUCCEEDED:
            err.print(f"[red]{what} {state_name(final.state)}[/red]: {final.state_reason}")
            raise typer.Exit(1)
        return final


def demo(model: str = typer.Option(str(DEMO_MODEL), help="A Hugging Face model directory (a chat model). The "
                                   "default is SmolLM2-135M-Instruct, built offline by `make smollm2`."),
         name: str = typer.Option("smollm2-135m-instruct", help="The base's artifact name."),
         data: str = typer.Option(str(DEMO_DATA), help="tickets.jsonl, replay.jsonl and facts.jsonl."),
         smoke: bool = typer.Option(False, help="The same arc on a slice: 6 training steps of 4 examples, 6 tests "
                                    "per block."),
         keep_up: bool = typer.Option(False, help="Leave the stack running afterwards.")) -> None:
    """The main job on the embedded default: base model -> data (validate, dedup, hold out) -> baseline eval (base +
    system prompt + 2-shot: is prompting enough?) -> LoRA -> base and adapter on one engine (held-out tickets checked
    field by field, fact probes scored by knowledge, an lm-eval task) -> paired comparison and verdict -> merge into
    the base, proved equal to base + adapter -> GPTQ W4A16 calibrated on the tickets, evaluated again and compared
    with base + adapter as a form of one model. Prints a JSON summary; the reports are artifacts."""
    import os

    from services.evaluation.lm_eval_tasks import fact_task_files
    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    d = Path(data)
    files = {k: d / f"{k}.jsonl" for k in ("tickets", "replay", "facts")}
    for f in [*files.values(), Path(model) / "config.json"]:
        if not f.exists():
            err.print(f"{f} is missing" + (": build the model with `make smollm2`" if f.name == "config.json" else ""))
            raise typer.Exit(2)
    system = _system_prompt(files["tickets"])
    facts = [json.loads(line) for line in files["facts"].read_text().splitlines() if line.strip()]
    work = stack.home() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    started = stack.StackState.load() is None
    with err.status("starting the embedded stack") as st:
        state = stack.up(on_step=lambda s: st.update(s))
    err.print(f"stack up: Ray head {state.ray_start_s:.1f}s, services ready {state.ready_s:.1f}s")
    cpus = pb.SubmitOptions(resources=pb.Resources(cpus=2))  # this machine's two cores for torch and vLLM
    try:
        c = TuneryClient(f"127.0.0.1:{state.ports['registry']}", stack.ensure_token(),
                         endpoints={k: f"127.0.0.1:{p}" for k, p in state.ports.items()})
        s = Steps(c)
        base = s.run("import", "import the base", rpc(c.import_model, os.path.abspath(model), name)).outputs[0].uri
        raw = s.run("import", "import the tickets", rpc(c.import_dataset, str(files["tickets"]), "tickets"))
        probes = s.run("import", "import the fact probes", rpc(c.import_dataset, str(files["facts"]), "facts"))
        tickets = s.run("prepare", "prepare the tickets (validate, dedup, hold out 25%)",
                        rpc(c.prepare_dataset, raw.outputs[0].uri, base, holdout=0.25, seed=1)).outputs[-1].uri
        # what the adapter trains on: the tickets' train split, with general chats mixed in so that it keeps
        # answering ordinary questions in prose (the held-out tickets stay out of it)
        rpc(c.download, tickets, "train.jsonl", work / "tickets-train.jsonl")
        (work / "mix.jsonl").write_text((work / "tickets-train.jsonl").read_text()
                                        + files["replay"].read_text())
        mix_raw = s.run("import", "import the training mix", rpc(c.import_dataset, str(work / "mix.jsonl"),
                                                                 "tickets-mix")).outputs[0].uri
        mix = s.run("prepare", "prepare the training mix (no holdout: the tickets' split is the test set)",
                    rpc(c.prepare_dataset, mix_raw, base, holdout=0.0, seed=1)).outputs[-1].uri
        suite = ev.EvalSuite(
            heldout_dataset=ref(tickets), heldout_assertion=ev.ASSERTION_TYPE_JSON_FIELDS,
            fact_probes=True, fact_probe_source=ref(probes.outputs[0].uri),
            lm_eval_files=[ev.SuiteFile(path=p, content=b) for p, b in fact_task_files(facts).items()],
            max_tests_per_block=6 if smoke else 0)
        # JSON records are ~35 tokens; fact answers are judged on their first 64 tokens
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=64, seed=0)
        prompted = s.run("eval_prompted", "baseline eval: base + system prompt + 2-shot", rpc(
            c.submit_eval, ev.EvalTarget(prompted=ev.PromptedTarget(
                model=ref(base), system_prompt=system, few_shot_k=2, few_shot_dataset=ref(tickets))),
            suite, sampling=sampling, options=cpus)).outputs[0].uri
        training = {"base_model": base, "dataset": mix, "method": "lora",
                    "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
                    "optimizer": {"learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0},
                    "epochs": 3, "micro_batch_size": 8, "max_seq_len": 192, "eval_samples": 0,
                    "checkpoint_every_steps": 1000} | ({"max_steps": 6, "micro_batch_size": 4} if smoke else {})
        trained = s.run("train", "train a LoRA adapter", rpc(c.submit_training, training, options=cpus))
        adapter = next(o.uri for o in trained.outputs if "/adapter-" in o.uri)
        evaluated = s.run("eval_adapter", "evaluate base and adapter on one engine", rpc(
            c.submit_eval, ev.EvalTarget(adapter=ev.AdapterTarget(base_model=ref(base), adapter=ref(adapter))),
            suite, sampling=sampling, options=cpus))
        labels = {c.get_artifact(o.uri).metadata["label"]: o.uri for o in evaluated.outputs}
        cmp = rpc(c.compare_reports, labels["baseline"], labels["candidate"], prompting_baseline=prompted,
                  gates=ev.Gates(min_target_pass_rate=MIN_TARGET, max_general_drop_points=MAX_GENERAL_DROP))
        html = work / "comparison.html"
        rpc(c.download, cmp.report.uri, "comparison.html", html)
        verdict = ev.Verdict.Name(cmp.verdict).removeprefix("VERDICT_")
        err.print(f"[bold]verdict: {verdict}[/bold]")
        for line in cmp.verdict_reasons:
            err.print(f"  {line}")
        merged_job = s.run("merge", "merge the adapter into the base (bf16), proved equal to base + adapter",
                           rpc(c.submit_merge, base, adapter, options=cpus))
        merged_uri = merged_job.outputs[0].uri
        merged = c.get_artifact(merged_uri)
        # a smaller form of it: 4-bit weights calibrated on the tickets it was tuned on, then evaluated again and
        # compared with base + adapter as a form of the same model (only precision, quantization and engine differ)
        quantized_job = s.run("quantize", "quantize the merged model to GPTQ W4A16, calibrated on its training data",
                              rpc(c.submit_quantize, merged_uri, "gptq-w4a16", samples=32 if smoke else 128,
                                  max_seq_len=192, options=cpus))
        quantized_uri = quantized_job.outputs[-1].uri
        quantized = c.get_artifact(quantized_uri)
        q_report = s.run("eval_quantized", "evaluate the quantized model (vLLM, W4A16)", rpc(
            c.submit_eval, ev.EvalTarget(model=ref(quantized_uri)), suite, sampling=sampling,
            options=cpus)).outputs[0].uri
        forms = rpc(c.compare_reports, labels["candidate"], q_report, form_comparison=True,
                    max_form_drop_points=MAX_FORM_DROP)
        err.print(f"[bold]W4A16 vs base + adapter: {ev.Verdict.Name(forms.verdict).removeprefix('VERDICT_')}[/bold]")
        for line in forms.verdict_reasons:
            err.print(f"  {line}")
        reports = {k: c.get_artifact(u) for k, u in (("prompted", prompted), ("baseline", labels["baseline"]),
                                                    ("candidate", labels["candidate"]), ("quantized", q_report))}
        rep = {k: rpc(c.eval_report, u) for k, u in (("baseline", labels["baseline"]),
                                                     ("candidate", labels["candidate"]), ("quantized", q_report))}

        def blocks(r) -> dict:
            return {ev.EvalBlock.Name(b.block).removeprefix("EVAL_BLOCK_").lower(): {
                "passed": b.passed, "total": b.total, "errored": b.errored,
                **({"exact_passed": b.exact_passed, "exact_total": b.exact_total} if b.exact_total else {})}
                for b in r.blocks}

        up = sum(f.now_passes for f in cmp.flips)
        emit({"base": base, "dataset": tickets, "training_mix": mix, "adapter": adapter, "smoke": smoke,
              "prompting_report": prompted, "baseline_report": labels["baseline"],
              "candidate_report": labels["candidate"], "comparison": cmp.report.uri, "comparison_html": str(html),
              "verdict": verdict, "reasons": list(cmp.verdict_reasons),
              "blocks": {k: blocks(r) for k, r in rep.items()},
              "flips_fail_to_pass": up, "flips_pass_to_fail": len(cmp.flips) - up,
              "block_deltas": dict(cmp.block_deltas),
              "paired": [{"block": p.block, "pairs": p.pairs, "gained": p.gained, "lost": p.lost,
                          "difference": p.difference, "ci": [p.ci_low, p.ci_high], "mcnemar_p": p.mcnemar_p,
                          "forgetting_points": p.forgetting_points, "lost_tests": list(p.lost_tests)}
                         for p in cmp.paired],
              "beats_prompting_baseline": cmp.beats_prompting_baseline,
              "lm_eval_deltas": [{"task": x.task, "metric": x.metric, "baseline": x.baseline,
                                  "candidate": x.candidate, "delta": x.delta, "ci": [x.ci_low, x.ci_high]}
                                 for x in cmp.lm_eval_deltas],
              "merged_model": merged_uri,
              "merge": {k: merged.metrics[k] for k in ("max_abs_logit_diff", "mean_kl", "greedy_identical",
                                                      "greedy_ties", "probe_prompts") if k in merged.metrics},
              "quantized_model": quantized_uri, "quantized_report": q_report,
              "quantize": {k: quantized.metrics[k] for k in ("model_bytes", "output_bytes", "compression_ratio",
                                                             "greedy_agreement", "quantize_peak_rss_bytes",
                                                             "planned_peak_bytes") if k in quantized.metrics},
              "forms": {"verdict": ev.Verdict.Name(forms.verdict).removeprefix("VERDICT_"),
                        "differences": list(forms.form_differences), "greedy_agreement": forms.greedy_agreement,
                        "reasons": list(forms.verdict_reasons),
                        "paired": {p.block: {"pairs": p.pairs, "gained": p.gained, "lost": p.lost}
                                   for p in forms.paired}},
              "eval_seconds": {k: {m: round(a.metrics[m], 1) for m in ("server_start_s", "tests_s")
                                   if m in a.metrics} for k, a in reports.items()},
              "step_seconds": s.seconds, "total_seconds": round(time.monotonic() - t_start, 1)})
    finally:
        if started and not keep_up:
            stack.down()
