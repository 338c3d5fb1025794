"""The evaluation job: `python -m services.evaluation.job <spec-uri>` (serve environment: vLLM + promptfoo).

evaluation.run: setup (materialise the model, the adapter and the suite sources; build the cases block by block;
load the lm-eval tasks' documents; start vLLM's OpenAI-compatible server on 127.0.0.1 with the adapter loadable)
-> run (check who answers, then promptfoo and lm-eval against the served name: the candidate, and for adapter
targets also the base with the adapter off on the same engine) -> save (one `report` artifact per run:
report.json, report.html, promptfoo's out.json and config, lm-eval's results and samples; then the server stops).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from services.core.jobctx import JobContext, run_job
from services.evaluation import cases as C
from services.evaluation.spec import EvalJobSpec

TOOL_SUITE = Path(__file__).with_name("suites") / "tool_calling.yaml"


def build_cases(ctx: JobContext, spec: EvalJobSpec) -> tuple[list, dict[str, Any] | None, str]:
    """(our cases, the user's promptfoo suite or None, its YAML text)."""
    from services.evaluation.promptfoo import load_tool_calling_suite, load_user_suite

    s, cache, limit = spec.suite, ctx.settings.cache_dir, spec.suite.max_tests_per_block
    out = []
    if s.heldout_dataset is not None:
        d = ctx.artifacts.materialize(s.heldout_dataset, cache, paths=["holdout.jsonl"])
        out += C.heldout_cases(d / "holdout.jsonl", s.heldout_assertion, limit)
    if s.fact_probes is not None:
        d = ctx.artifacts.materialize(s.fact_probes, cache, paths=["facts.jsonl"])
        out += C.fact_cases(d / "facts.jsonl", limit)
    if s.tool_calling:
        tools = load_tool_calling_suite(TOOL_SUITE)
        out += tools[:limit] if limit else tools
    user, text = None, ""
    if s.promptfoo_suite is not None:
        text = ctx.artifacts.read_file(s.promptfoo_suite.uri, "promptfooconfig.yaml").decode()
        user = load_user_suite(text, "promptfooconfig.yaml")
    return out, user, text


def endpoint_tokenizer(base_url: str, api_key: str) -> bool:
    """Whether an endpoint serves its tokenizer as lm-eval's remote tokenizer backend asks (vLLM does, with
    --enable-tokenizer-info-endpoint)."""
    from lm_eval.utils import check_remote_tokenizer_support

    # lm-eval finds the server's root by stripping /v1/completions from the URL it is given
    return check_remote_tokenizer_support(base_url.rstrip("/") + "/completions", auth_token=api_key or None,
                                          max_retries=1)


def check_answering(base_url: str, served: str, api_key: str = "EMPTY") -> str:
    """Ask once and read back who answered: a run that silently answered with another model must fail."""
    import requests

    models = [m["id"] for m in requests.get(f"{base_url}/models", timeout=30,
                                            headers={"Authorization": f"Bearer {api_key}"}).json()["data"]]
    if served not in models:
        raise RuntimeError(f"the server does not serve {served!r} (it serves {models})")
    r = requests.post(f"{base_url}/chat/completions", timeout=120, headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": served, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1,
                            "temperature": 0})
    r.raise_for_status()
    return r.json().get("model", "")


class LmEvalSetup:
    """The lm-eval part of a run, loaded before the model server starts (see harness.preload)."""

    def __init__(self, ctx: JobContext, spec: EvalJobSpec):
        from services.evaluation import harness

        self.spec = spec.suite.lm_eval
        le = self.spec
        self.task_dir = ctx.artifacts.materialize(le.task_files, ctx.settings.cache_dir) if le.task_files else None
        harness.prepare_environment(ctx.settings.cache_dir, le.hub)
        t0 = time.monotonic()
        standard = any(v == "standard" for v in le.sources.values())
        self.tm = harness.task_manager(self.task_dir, standard)
        harness.preload(le.tasks, self.task_dir, self.tm)
        self.limit = le.limit or spec.suite.max_tests_per_block
        self.controls = {"version": harness.LM_EVAL_VERSION, "tasks": list(le.tasks),
                         "task_files_sha256": le.task_files.sha256 if le.task_files else "",
                         "num_fewshot": le.num_fewshot, "apply_chat_template": le.apply_chat_template,
                         "limit": self.limit}
        ctx.event(f"lm-eval {harness.LM_EVAL_VERSION}: {len(le.tasks)} tasks ({', '.join(le.tasks)}) loaded in "
                  f"{time.monotonic() - t0:.1f}s")

    def run(self, label: str, args: dict[str, Any], work: Path, system_instruction: str, seed: int):
        from services.evaluation import harness

        return harness.run(names=self.spec.tasks, sources=self.spec.sources, task_dir=self.task_dir, tm=self.tm,
                           args=args, out_dir=work, label=label, num_fewshot=self.spec.num_fewshot,
                           limit=self.limit, apply_chat_template=self.spec.apply_chat_template,
                           system_instruction=system_instruction, seed=seed)


def run_suite(label: str, served: str, base_url: str, cases: list, user: dict | None, spec: EvalJobSpec,
              work: Path, timeout_s: float) -> tuple[list[dict[str, Any]], list[Path]]:
    from services.evaluation.promptfoo import build_config, run, user_suite_config

    sampling = spec.sampling.model_dump()
    tests, raw = [], []
    for part, config in (("cases", build_config(cases, base_url=base_url, model=served, sampling=sampling)
                          if cases else None),
                         ("user", user_suite_config(user, base_url=base_url, model=served, sampling=sampling)
                          if user else None)):
        if config is None:
            continue
        result = run(config, work / f"{label}-{part}", timeout_s=timeout_s)
        raw += [result.out_json, result.config_path]
        for r in result.results:
            tests.append({"id": r.case_id + (f"@{r.prompt_label}" if part == "user" and r.prompt_label else ""),
                          "block": r.block, "prompt": r.prompt, "output": r.output_text, "passed": bool(r.passed),
                          "reason": r.reason or (r.error or ""), "latency_ms": float(r.latency_ms or 0),
                          "expected": str(r.metadata.get("expected", ""))})
    return tests, raw


def evaluate(ctx: JobContext, spec: EvalJobSpec) -> None:
    from services.evaluation import scoring
    from services.evaluation.engine import (
        ServerSpec,
        VLLMServer,
        engine_info,
        tool_call_parser_for,
    )
    from services.evaluation.html import report_html

    # setup
    t = spec.target
    cache = ctx.settings.cache_dir
    our_cases, user, user_yaml = build_cases(ctx, spec)
    lm_eval = LmEvalSetup(ctx, spec) if spec.suite.lm_eval is not None else None
    suite_hash = C.suite_sha256(our_cases, user_yaml + (json.dumps(lm_eval.controls, sort_keys=True)
                                                        if lm_eval else ""))
    wrapped = our_cases
    if t.kind == "prompted":
        shots = []
        if t.few_shot_k:
            d = ctx.artifacts.materialize(t.few_shot_dataset, cache, paths=["train.jsonl"])
            shots = C.few_shot(d / "train.jsonl", t.few_shot_k, spec.sampling.seed)
        wrapped = C.prompted(our_cases, t.system_prompt, shots)
    ctx.event(f"{len(our_cases)} cases ({', '.join(f'{b}: {sum(c.block == b for c in our_cases)}' for b in scoring.BLOCKS)})"
              + (f" + the user's promptfoo suite ({len(user['tests'])} tests)" if user else "")
              + (f" + lm-eval tasks {', '.join(spec.suite.lm_eval.tasks)}" if lm_eval else ""))
    work = Path(tempfile.mkdtemp(prefix="tunery-eval-"))
    parents, runs = [], []
    try:
        if t.kind == "endpoint":
            base_url, served = t.endpoint.base_url.rstrip("/"), t.endpoint.model
            controls = {"engine": "endpoint", "engine_version": base_url, "precision": "unknown", "quantization": "",
                        "chat_template_sha256": "", "tool_call_parser": "", "lora_enabled": False}
            server = None
            runs = [("run", served)]
            api_key = os.environ.get(t.endpoint.api_key_env, "") if t.endpoint.api_key_env else ""
            harness_args = {"tokenizer": None, "max_length": 2048, "device": "cpu", "api_key": api_key,
                            "remote_tokenizer": bool(lm_eval) and endpoint_tokenizer(base_url, api_key)}
        else:
            model = ctx.artifacts.resolve(t.model)
            parents.append(model.ref())
            model_dir = ctx.artifacts.materialize(model.ref(), cache)
            template = (model_dir / "chat_template.jinja").read_text() if (model_dir / "chat_template.jinja").exists() \
                else json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template", "") or ""
            adapters = {}
            if t.kind == "adapter":
                adapter = ctx.artifacts.resolve(t.adapter)
                parents.append(adapter.ref())
                adapters[adapter.name] = str(ctx.artifacts.materialize(adapter.ref(), cache))
                runs = [("candidate", adapter.name)] + ([("baseline", model.name)] if spec.with_baseline else [])
            else:
                runs = [("run", model.name)]
            parser = tool_call_parser_for(template, model.metadata.get("model_type", ""))
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = "float32" if device == "cpu" else "auto"  # CPU: the weights as stored (vLLM would pick bf16)
            sspec = ServerSpec(model_dir=str(model_dir), served_name=model.name, adapters=adapters,
                               tool_call_parser=parser, dtype=dtype, seed=spec.sampling.seed, device=device,
                               max_model_len=min(int(model.metadata.get("max_position_embeddings") or 2048), 4096))
            server = VLLMServer(sspec, log_path=work / "vllm.log")
            harness_args = {"tokenizer": str(model_dir), "max_length": sspec.max_model_len, "device": device}
            info = engine_info()
            controls = {"engine": info["engine"], "engine_version": info["version"],
                        "precision": f"{dtype} ({model.metadata.get('dtype', '?')} weights)",
                        "quantization": str(model.metadata.get("quantization", "")),
                        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
                        "tool_call_parser": parser, "lora_enabled": bool(adapters)}
        controls["sampling"] = spec.sampling.model_dump()
        controls["suite_sha256"] = suite_hash
        controls["lm_eval"] = lm_eval.controls if lm_eval else None
        # run
        t0 = time.monotonic()
        if server is not None:
            ctx.phase("starting the model server")
            server.start()
            ctx.event(f"vLLM server up in {server.start_s:.1f}s serving {', '.join(server.models())}",
                      metrics={"server_start_s": server.start_s})
            base_url = server.base_url
        start_s = time.monotonic() - t0
        ctx.phase("running")
        reports = []
        try:
            for label, served in runs:
                ctx.check_cancelled()
                answered = check_answering(base_url, served) if t.kind != "endpoint" else served
                if answered != served:
                    ctx.fail(f"asked for {served!r} but {answered!r} answered; the run would not measure the target")
                t1 = time.monotonic()
                tests, raw = run_suite(label, served, base_url, wrapped, user, spec, work, timeout_s=3600)
                harness_run = None
                if lm_eval is not None:
                    from services.evaluation.harness import model_args

                    ctx.phase(f"lm-eval on {served}")
                    harness_run = lm_eval.run(label, model_args(base_url=base_url, model=served, seed=spec.sampling.seed,
                                                                **harness_args),
                                              work, t.system_prompt if t.kind == "prompted" else "", spec.sampling.seed)
                    tests += harness_run.tests
                    ctx.event(f"lm-eval on {served}: " + ", ".join(
                        f"{n} {v['primary']} {v['value']:.3f}" for n, v in harness_run.tasks.items()
                        if v.get("value") is not None) + f" in {harness_run.seconds:.1f}s")
                blocks = scoring.summarize(tests)
                ctx.metrics(len(reports) + 1, {f"{label}_{b}_pass_rate": v["pass_rate"] for b, v in blocks.items()},
                            total_steps=len(runs), text=f"{label} ({served}): " + ", ".join(
                                f"{b} {v['passed']:.0f}/{v['total']:.0f}" for b, v in blocks.items()))
                reports.append((label, served, answered, tests, blocks, raw, time.monotonic() - t1, harness_run))
        finally:
            if server is not None:
                server.stop()
        # save
        for label, served, answered, tests, blocks, raw, seconds, harness_run in reports:
            report = {"name": f"{spec.name}-{label}" if len(reports) > 1 else spec.name, "label": label,
                      "target": spec.target.model_dump(mode="json") | {"served_as": served},
                      "target_label": served, "answering_model": answered, "answering_checked": answered == served,
                      "adapter_enabled": label == "candidate", "controls": controls, "blocks": blocks, "tests": tests,
                      "prompting": {"system_prompt": t.system_prompt, "few_shot_k": t.few_shot_k}
                      if t.kind == "prompted" else None,
                      "lm_eval": {"version": harness_run.version, "tasks": harness_run.tasks,
                                  "seconds": harness_run.seconds} if harness_run else None,
                      "timing": {"server_start_s": start_s, "tests_s": seconds,
                                 "lm_eval_s": harness_run.seconds if harness_run else 0.0}}
            d = work / f"report-{label}"
            d.mkdir()
            if harness_run is not None:  # lm-eval's own results and samples files, as its CLI writes them
                (d / "lm-eval").mkdir()
                for p in harness_run.files:
                    shutil.copy(p, d / "lm-eval" / p.name)
            (d / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
            (d / "report.html").write_text(report_html(report))
            for p in raw:
                shutil.copy(p, d / (p.parent.name + "-" + p.name))
            w = ctx.writer("report", report["name"], parents=parents + ([spec.suite.promptfoo_suite]
                                                                         if spec.suite.promptfoo_suite else []))
            for _ in w.add_dir(d):
                pass
            ctx.commit(w, metadata={"report": "eval", "label": label, "target_kind": t.kind, "served_as": served,
                                    "suite_sha256": suite_hash, "controls": controls},
                       metrics={f"{b}_pass_rate": v["pass_rate"] for b, v in blocks.items()}
                       | {"tests_s": seconds, "server_start_s": start_s})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    run_job("evaluation", {"evaluation.run": (evaluate, EvalJobSpec)})


if __name__ == "__main__":
    main()
