"""`tunery eval run | report | compare`."""

from __future__ import annotations

import typer
from rich.table import Table

from services.cli.console import OPTS, client, emit, err, follow, out, rpc
from services.gen.tunery.v1 import common_pb2 as pb

eval_app = typer.Typer(help="Evaluation: run suites against a target, compare reports.", no_args_is_help=True)

ASSERTION_NAMES = {"exact": 1, "contains": 2, "regex": 3, "json_schema": 4, "similarity": 5, "rubric": 6,
                   "json_fields": 7}


def _eval_target(model: str, adapter: str, system_prompt: str, few_shot: int, few_shot_dataset: str,
                 endpoint: str, endpoint_model: str, api_key_env: str, deployment: str = ""):
    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    if deployment:  # NAME or NAME/MODEL (the base's name or an adapter's)
        name, _, served = deployment.partition("/")
        return ev.EvalTarget(deployment=ev.DeploymentTarget(name=name, model=served))
    if endpoint:
        return ev.EvalTarget(endpoint=pb.OpenAIEndpoint(base_url=endpoint, model=endpoint_model,
                                                        api_key_env=api_key_env))
    if not model:
        err.print("give --model (with --adapter, or --system-prompt/--few-shot for the prompting baseline) "
                  "or --endpoint")
        raise typer.Exit(2)
    prompting = ev.PromptedTarget(system_prompt=system_prompt, few_shot_k=few_shot,
                                  few_shot_dataset=ref(few_shot_dataset) if few_shot_dataset else None) \
        if system_prompt or few_shot else None
    if adapter:  # with --system-prompt/--few-shot: the prompting baseline as a third run on the adapter's engine
        return ev.EvalTarget(adapter=ev.AdapterTarget(base_model=ref(model), adapter=ref(adapter), prompting=prompting))
    if prompting is not None:
        prompting.model.CopyFrom(ref(model))
        return ev.EvalTarget(prompted=prompting)
    return ev.EvalTarget(model=ref(model))


@eval_app.command("run")
def eval_run(
    suite: str = typer.Argument("", help="A promptfooconfig.yaml (optional: the blocks below also make tests)."),
    model: str = typer.Option("", "--model", help="The model artifact (the base, with --adapter)."),
    adapter: str = typer.Option("", "--adapter", help="An adapter: served on the same engine as the base."),
    system_prompt: str = typer.Option("", help="Prompting baseline: a system prompt (with --adapter: a third run, "
                                                "the base prompted, on the adapter's engine)."),
    few_shot: int = typer.Option(0, help="Prompting baseline: k examples from --few-shot-dataset's train split."),
    few_shot_dataset: str = typer.Option(""),
    endpoint: str = typer.Option("", help="Or an OpenAI-compatible base URL (with --endpoint-model)."),
    endpoint_model: str = typer.Option(""),
    api_key_env: str = typer.Option(""),
    deployment: str = typer.Option("", help="Or a live deployment: NAME, or NAME/MODEL for an adapter it serves."),
    heldout: str = typer.Option("", help="Target tests from this prepared dataset's held-out split."),
    assertion: str = typer.Option("contains", help=", ".join(ASSERTION_NAMES)),
    facts: str = typer.Option("", help="General block: an artifact holding facts.jsonl."),
    tools: bool = typer.Option(False, "--tools", help="The built-in tool-calling block."),
    lm_eval: list[str] = typer.Option([], "--lm-eval", help="lm-eval tasks or groups for the general block "
                                      "(repeat, or comma-separated): standard names, or those --lm-eval-dir "
                                      "defines (with a dir and no names: all of its tasks)."),
    lm_eval_dir: str = typer.Option("", help="Local lm-eval task files: a directory of *.yaml task configs, "
                                    "their data files and !function modules (sent with the request)."),
    lm_eval_files: str = typer.Option("", help="Or stored lm-eval task files: a suite artifact."),
    lm_eval_fewshot: int = typer.Option(-1, help="lm-eval few-shot examples (-1: each task's own default)."),
    lm_eval_limit: int = typer.Option(0, help="At most this many documents per lm-eval task (0: --max-tests)."),
    lm_eval_chat_template: bool = typer.Option(False, help="Render lm-eval prompts with the chat template."),
    max_tests: int = typer.Option(0, help="At most this many tests per block (0: all)."),
    max_tokens: int = typer.Option(0),
    name: str = typer.Option(""),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Evaluate a target on a suite; adapter targets also run the base, adapter off, on the same engine."""
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    if assertion not in ASSERTION_NAMES:
        err.print(f"--assertion must be one of {', '.join(ASSERTION_NAMES)}")
        raise typer.Exit(2)
    target = _eval_target(model, adapter, system_prompt, few_shot, few_shot_dataset, endpoint, endpoint_model,
                          api_key_env, deployment)
    s = ev.EvalSuite(promptfoo_yaml=Path(suite).read_text() if suite else "", tool_calling=tools,
                     heldout_assertion=ASSERTION_NAMES[assertion], max_tests_per_block=max_tests,
                     heldout_dataset=ref(heldout) if heldout else None, fact_probes=bool(facts),
                     fact_probe_source=ref(facts) if facts else None,
                     lm_eval_tasks=[t.strip() for arg in lm_eval for t in arg.split(",") if t.strip()],
                     lm_eval_files=_task_files(lm_eval_dir) if lm_eval_dir else [],
                     lm_eval_task_files=ref(lm_eval_files) if lm_eval_files else None)
    if s.lm_eval_tasks or s.lm_eval_files or lm_eval_files:
        s.lm_eval.CopyFrom(ev.LmEvalOptions(limit=lm_eval_limit, apply_chat_template=lm_eval_chat_template))
        if lm_eval_fewshot >= 0:
            s.lm_eval.num_fewshot = lm_eval_fewshot
    c = client()
    job = rpc(c.submit_eval, target, s, name=name, key=key,
              sampling=pb.SamplingParams(max_tokens=max_tokens) if max_tokens else None)
    final = follow(c, job, watch)
    if watch and not OPTS["json"]:
        for o in final.outputs:
            r = rpc(c.eval_report, o.uri)
            rates = ", ".join(f"{ev.EvalBlock.Name(b.block).removeprefix('EVAL_BLOCK_').lower()} "
                              f"{b.passed}/{b.total}" for b in r.blocks)
            out.print(f"report: {o.uri}  ({rates}; tunery eval report {o.uri})")
            for t in r.lm_eval:
                out.print(f"  lm-eval {t.task}: {t.metric} {t.value:.3f} ± {t.stderr:.3f} ({t.samples} documents)")


def _task_files(directory: str) -> list:
    """Every file under `directory` that can belong to lm-eval task files, at its path relative to it."""
    from pathlib import Path

    from services.evaluation.lm_eval_tasks import FILE_SUFFIXES
    from services.gen.tunery.v1 import evaluation_pb2 as ev

    root = Path(directory)
    if not root.is_dir():
        err.print(f"--lm-eval-dir: {directory} is not a directory")
        raise typer.Exit(2)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (*FILE_SUFFIXES, ".yml")
                   and "__pycache__" not in p.parts)
    return [ev.SuiteFile(path=p.relative_to(root).as_posix(), content=p.read_bytes()) for p in paths]


@eval_app.command("report")
def eval_report(report: str, html: str = typer.Option("", "--html", help="Save the HTML report here.")) -> None:
    """A report's blocks (pass rates with 95% intervals) and failing tests; --html saves the page."""
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev

    c = client()
    r = rpc(c.eval_report, report)
    if html:
        rpc(c.download, report, "report.html", Path(html))
    if OPTS["json"]:
        emit(r)
        return
    t = Table("block", "passed", "rate", "95% CI", "exact match", "not measured")
    for b in r.blocks:
        t.add_row(ev.EvalBlock.Name(b.block).removeprefix("EVAL_BLOCK_").lower(), f"{b.passed}/{b.total}",
                  f"{b.pass_rate:.1%}" if b.total else "–", f"{b.ci_low:.1%} .. {b.ci_high:.1%}" if b.total else "–",
                  f"{b.exact_passed}/{b.exact_total}" if b.exact_total else "–", b.errored_reason or "–")
    out.print(t)
    if r.lm_eval:
        lt = Table("lm-eval task", "source", "metric", "value ± stderr", "documents")
        for x in r.lm_eval:
            lt.add_row(x.task, x.source, x.metric, f"{x.value:.3f} ± {x.stderr:.3f}", str(x.samples))
        out.print(lt)
    out.print(f"answered by {r.answering_model}; engine {r.controls.engine} {r.controls.engine_version}")
    if html:
        out.print(f"HTML: {html}")


@eval_app.command("compare")
def eval_compare(
    baseline: str, candidate: str,
    prompting: str = typer.Option("", "--prompting", help="The prompting-baseline report."),
    min_target: float | None = typer.Option(None, help="Gate: target pass rate at least this (0..1)."),
    max_general_drop: float | None = typer.Option(None, help="Gate: general forgetting (tests lost) at most this "
                                                  "many points (default 2)."),
    max_tool_drop: float | None = typer.Option(None, help="Gate: tool-calling forgetting at most this many points "
                                               "(default 2)."),
    require_gain: bool | None = typer.Option(None, "--require-gain/--no-require-gain",
                                             help="Gate: the target's paired 95% interval of the gain lies above 0 "
                                             "(default on)."),
    allow_uncontrolled: bool = typer.Option(False, help="Compare despite differing controls (stamped)."),
    forms: bool = typer.Option(False, "--forms", help="Two forms of one model (merged vs quantized, vLLM vs "
                               "llama.cpp): only precision, quantization and engine may differ."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="With --forms: at most this many points of any "
                                          "block's tests lost (default 2)."),
    html: str = typer.Option("", "--html", help="Save the comparison page here."),
) -> None:
    """Baseline vs candidate, test by test: flips, paired differences (McNemar), forgetting, gates, the
    prompting-baseline verdict. Gates not given take the defaults (a target gain beyond the noise, at most 2 points
    of forgetting). Exit 1 on a failing verdict."""
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev

    given = {k: v for k, v in (("min_target_pass_rate", min_target), ("max_general_drop_points", max_general_drop),
                               ("max_tool_calling_drop_points", max_tool_drop), ("require_target_gain", require_gain))
             if v is not None}
    c = client()
    res = rpc(c.compare_reports, baseline, candidate, prompting_baseline=prompting,
              gates=ev.Gates(**given) if given else None, allow_uncontrolled=allow_uncontrolled,
              form_comparison=forms, max_form_drop_points=max_drop)
    if html:
        rpc(c.download, res.report.uri, "comparison.html", Path(html))
    if OPTS["json"]:
        emit(res)
    else:
        verdict = ev.Verdict.Name(res.verdict).removeprefix("VERDICT_")
        out.print(f"verdict: [{'green' if verdict == 'PASS' else 'red'}]{verdict}[/]")
        for r in res.verdict_reasons:
            out.print(f"  {r}")
        up = sum(f.now_passes for f in res.flips)
        out.print(f"flips: {up} fail→pass, {len(res.flips) - up} pass→fail; report {res.report.uri}"
                  + (f" (HTML: {html})" if html else ""))
    if res.verdict != ev.VERDICT_PASS:
        raise typer.Exit(1)
