"""`tunery demo`: the main job on the embedded default. It chains the stages by hand today; the pipeline
service takes it over (the pipeline issue), and this command then submits a pipeline."""

from __future__ import annotations

import json

import typer

from services.cli import stack
from services.cli.console import emit, err, render_watch, rpc, state_name
from services.gen.tunery.v1 import common_pb2 as pb
from services.sdk.client import TuneryClient

DEMO_STYLE = "{answer}, my friend."
DEMO_SYSTEM_PROMPT = "End every answer with ', my friend.'"


def _demo_step(c: TuneryClient, what: str, job: pb.Job, timeout: float = 1800) -> pb.Job:
    err.print(f"[bold]{what}[/bold]: job {job.id}")
    render_watch(c, job.id)
    final = rpc(c.wait, job.id, timeout)
    if final.state != pb.JOB_STATE_SUCCEEDED:
        err.print(f"[red]{what} {state_name(final.state)}[/red]: {final.state_reason}")
        raise typer.Exit(1)
    return final


def demo(model: str = typer.Option("fixtures/foundation", help="A model directory with facts.jsonl (the "
                                   "committed foundation fixture)."),
         name: str = typer.Option("foundation"),
         keep_up: bool = typer.Option(False, help="Leave the stack running afterwards.")) -> None:
    """The main job on the embedded default: base model -> data -> baseline eval (base + system prompt + 2-shot: is
    prompting enough?) -> LoRA -> base and adapter eval on one engine (held-out target tests, fact probes, an
    lm-eval task) -> controlled comparison; prints the verdict and where the reports are."""
    import os
    import random
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    facts_file = Path(model) / "facts.jsonl"
    if not facts_file.exists():
        err.print(f"{facts_file} is missing: the demo teaches a style on top of the model's facts")
        raise typer.Exit(2)
    facts = [json.loads(line) for line in facts_file.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(facts)
    work = stack.home() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    (work / "style.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f["question"]},
        {"role": "assistant", "content": DEMO_STYLE.format(answer=f["answer"])}]}) + "\n" for f in facts[:120]))
    (work / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts[120:160]))
    started = stack.StackState.load() is None
    with err.status("starting the embedded stack") as st:
        state = stack.up(on_step=lambda s: st.update(s))
    err.print(f"stack up: Ray head {state.ray_start_s:.1f}s, services ready {state.ready_s:.1f}s")
    try:
        c = TuneryClient(f"127.0.0.1:{state.ports['registry']}", stack.ensure_token(),
                         endpoints={k: f"127.0.0.1:{p}" for k, p in state.ports.items()})
        base = _demo_step(c, "import the base", rpc(c.import_model, os.path.abspath(model), name)).outputs[0].uri
        raw = _demo_step(c, "import the data", rpc(c.import_dataset, str(work / "style.jsonl"), "style")).outputs[0].uri
        probes = _demo_step(c, "import fact probes", rpc(c.import_dataset, str(work / "facts.jsonl"),
                                                          "other-facts")).outputs[0].uri
        data = _demo_step(c, "prepare (validate, dedup, split)",
                          rpc(c.prepare_dataset, raw, base, holdout=0.2, seed=1)).outputs[-1].uri
        # the general block: the other facts as chat questions (fact probes, exact answers) and, through lm-eval,
        # as the plain sentences the base was pretrained on, scored by log-likelihood (format-independent)
        from services.evaluation.lm_eval_tasks import fact_task_files

        suite = ev.EvalSuite(heldout_dataset=ref(data), heldout_assertion=ev.ASSERTION_TYPE_CONTAINS,
                             fact_probes=True, fact_probe_source=ref(probes),
                             lm_eval_files=[ev.SuiteFile(path=p, content=b)
                                            for p, b in fact_task_files(facts[120:160]).items()])
        # before training: would a good prompt have been enough? (base + system prompt + 2 examples)
        prompted = _demo_step(c, "baseline eval: base + system prompt + 2-shot", rpc(
            c.submit_eval, ev.EvalTarget(prompted=ev.PromptedTarget(
                model=ref(base), system_prompt=DEMO_SYSTEM_PROMPT, few_shot_k=2, few_shot_dataset=ref(data))),
            suite)).outputs[0].uri
        trained = _demo_step(c, "train a LoRA adapter", rpc(c.submit_training, {
            "base_model": base, "dataset": data, "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "optimizer": {"learning_rate": 0.002, "lr_scheduler": "constant", "warmup_ratio": 0.0}, "epochs": 6,
            "micro_batch_size": 8, "max_seq_len": 128, "eval_samples": 0, "checkpoint_every_steps": 1000}))
        adapter = next(o.uri for o in trained.outputs if "/adapter-" in o.uri)
        evaluated = _demo_step(c, "evaluate base and adapter on one engine", rpc(
            c.submit_eval, ev.EvalTarget(adapter=ev.AdapterTarget(base_model=ref(base), adapter=ref(adapter))),
            suite))
        labels = {c.get_artifact(o.uri).metadata["label"]: o.uri for o in evaluated.outputs}
        cmp = rpc(c.compare_reports, labels["baseline"], labels["candidate"], prompting_baseline=prompted,
                  gates=ev.Gates(min_target_pass_rate=0.8, max_general_drop_points=2.0))
        html = work / "comparison.html"
        rpc(c.download, cmp.report.uri, "comparison.html", html)
        verdict = ev.Verdict.Name(cmp.verdict).removeprefix("VERDICT_")
        up = sum(f.now_passes for f in cmp.flips)
        err.print(f"[bold]verdict: {verdict}[/bold]; " + "; ".join(cmp.verdict_reasons))
        timing = {}
        for job_label, uri in (("prompted", prompted), ("baseline", labels["baseline"]),
                               ("candidate", labels["candidate"])):
            m = c.get_artifact(uri).metrics
            timing[job_label] = {k: round(m[k], 1) for k in ("server_start_s", "tests_s") if k in m}
        emit({"base": base, "dataset": data, "adapter": adapter, "prompting_report": prompted,
              "baseline_report": labels["baseline"], "candidate_report": labels["candidate"],
              "comparison": cmp.report.uri, "comparison_html": str(html), "verdict": verdict,
              "flips_fail_to_pass": up, "flips_pass_to_fail": len(cmp.flips) - up,
              "block_deltas": dict(cmp.block_deltas), "reasons": list(cmp.verdict_reasons),
              "beats_prompting_baseline": cmp.beats_prompting_baseline,
              "lm_eval_deltas": [{"task": d.task, "metric": d.metric, "baseline": d.baseline,
                                  "candidate": d.candidate, "delta": d.delta, "ci": [d.ci_low, d.ci_high]}
                                 for d in cmp.lm_eval_deltas],
              "eval_seconds": timing})
    finally:
        if started and not keep_up:
            stack.down()
