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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.jobctx import JobContext, run_job
from services.evaluation import cases as C
from services.evaluation.spec import EvalJobSpec

TOOL_SUITE = Path(__file__).with_name("suites") / "tool_calling.yaml"


def build_cases(ctx: JobContext, spec: EvalJobSpec) -> tuple[list, dict[str, Any] | None, str]:
    """(our cases, the user's promptfoo suite or None, its YAML text)."""
    from services.evaluation.promptfoo_suite import load_tool_calling_suite, load_user_suite

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
    if r.status_code >= 400:  # the server's own words (vLLM's error JSON), not only the status line
        raise RuntimeError(f"{served} answered its first chat request with HTTP {r.status_code}: {r.text[:800]}")
    return r.json().get("model", "")


class LmEvalSetup:
    """The lm-eval part of a run, loaded before the model server starts (see lm_eval_run.preload)."""

    def __init__(self, ctx: JobContext, spec: EvalJobSpec):
        from services.evaluation import lm_eval_run
        from services.evaluation.lm_eval_tasks import LM_EVAL_VERSION

        self.spec = spec.suite.lm_eval
        le = self.spec
        self.task_dir = ctx.artifacts.materialize(le.task_files, ctx.settings.cache_dir) if le.task_files else None
        if not lm_eval_run.prepare_environment(ctx.settings.cache_dir, le.hub) and le.hub:
            ctx.event("the Hugging Face hub cannot be reached from this worker: the standard tasks' datasets must be "
                      "in HF_DATASETS_CACHE", level="warning")
        t0 = time.monotonic()
        standard = any(v == "standard" for v in le.sources.values())
        self.tm = lm_eval_run.task_manager(self.task_dir, standard)
        lm_eval_run.preload(le.tasks, self.task_dir, self.tm)
        self.limit = le.limit or spec.suite.max_tests_per_block
        self.controls = {"version": LM_EVAL_VERSION, "tasks": list(le.tasks),
                         "task_files_sha256": le.task_files.sha256 if le.task_files else "",
                         "num_fewshot": le.num_fewshot, "apply_chat_template": le.apply_chat_template,
                         "limit": self.limit}
        ctx.event(f"lm-eval {LM_EVAL_VERSION}: {len(le.tasks)} tasks ({', '.join(le.tasks)}) loaded in "
                  f"{time.monotonic() - t0:.1f}s")

    def run(self, label: str, args: dict[str, Any], work: Path, system_instruction: str, seed: int):
        from services.evaluation import lm_eval_run

        return lm_eval_run.run(names=self.spec.tasks, sources=self.spec.sources, task_dir=self.task_dir, tm=self.tm,
                           args=args, out_dir=work, label=label, num_fewshot=self.spec.num_fewshot,
                           limit=self.limit, apply_chat_template=self.spec.apply_chat_template,
                           system_instruction=system_instruction, seed=seed)


TARGET_KEY_ENV = "TUNERY_EVAL_TARGET_API_KEY"  # the target's API key, in promptfoo's environment only


def run_suite(label: str, served: str, base_url: str, cases: list, user: dict | None, spec: EvalJobSpec,
              work: Path, timeout_s: float, api_key: str = "") -> tuple[list[dict[str, Any]], list[Path]]:
    from services.evaluation.promptfoo_run import build_config, run, user_suite_config

    sampling = spec.sampling.model_dump()
    key_env, env = (TARGET_KEY_ENV, {TARGET_KEY_ENV: api_key}) if api_key else (None, None)
    tests, raw = [], []
    for part, config in (("cases", build_config(cases, base_url=base_url, model=served, sampling=sampling,
                                                api_key_env=key_env) if cases else None),
                         ("user", user_suite_config(user, base_url=base_url, model=served, sampling=sampling,
                                                    api_key_env=key_env) if user else None)):
        if config is None:
            continue
        result = run(config, work / f"{label}-{part}", timeout_s=timeout_s, env=env)
        raw += [result.out_json, result.config_path]
        for r in result.results:
            t = {"id": r.case_id + (f"@{r.prompt_label}" if part == "user" and r.prompt_label else ""),
                 "block": r.block, "prompt": r.prompt, "output": r.output_text, "passed": bool(r.passed),
                 "errored": r.error is not None, "reason": r.reason or (r.error or ""),
                 "latency_ms": float(r.latency_ms or 0), "expected": str(r.metadata.get("expected", ""))}
            if r.metadata.get("exact_check") and r.error is None:  # fact probes: exact match beside knowledge
                t["exact"] = C.exact_match(r.output_text, t["expected"])
            tests.append(t)
    return tests, raw


@dataclass
class Suite:
    """Everything that makes the tests, loaded before any model server starts."""

    cases: list            # the tests as written (what the model, the adapter and the base are sent)
    prompted: list | None  # the same tests wrapped with the system prompt and shots (prompting runs), else None
    user: dict[str, Any] | None
    lm_eval: LmEvalSetup | None
    sha256: str            # of the unwrapped cases, the user's suite and the lm-eval options

    @classmethod
    def load(cls, ctx: JobContext, spec: EvalJobSpec) -> "Suite":
        from services.evaluation import scoring

        ours, user, user_yaml = build_cases(ctx, spec)
        lm_eval = LmEvalSetup(ctx, spec) if spec.suite.lm_eval is not None else None
        sha = C.suite_sha256(ours, user_yaml + (json.dumps(lm_eval.controls, sort_keys=True) if lm_eval else ""))
        t = spec.target
        prompted = None
        if t.prompting:
            shots = []
            if t.few_shot_k:
                d = ctx.artifacts.materialize(t.few_shot_dataset, ctx.settings.cache_dir, paths=["train.jsonl"])
                shots = C.few_shot(d / "train.jsonl", t.few_shot_k, spec.sampling.seed)
            prompted = C.prompted(ours, t.system_prompt, shots)
        ctx.event(f"{len(ours)} cases ({', '.join(f'{b}: {sum(c.block == b for c in ours)}' for b in scoring.BLOCKS)})"
                  + (f" + the user's promptfoo suite ({len(user['tests'])} tests)" if user else "")
                  + (f" + lm-eval tasks {', '.join(spec.suite.lm_eval.tasks)}" if lm_eval else ""))
        return cls(ours, prompted, user, lm_eval, sha)


@dataclass
class Target:
    """What answers: the runs to make (label, served name) against `base_url`, the server to start for them (None
    for an endpoint), and the controls every report of the job carries."""

    runs: list[tuple[str, str]]
    controls: dict[str, Any]
    harness_args: dict[str, Any]
    parents: list = field(default_factory=list)
    server: Any = None     # a VLLMServer
    base_url: str = ""
    start_s: float = 0.0

    def start(self, ctx: JobContext) -> None:
        t0 = time.monotonic()
        if self.server is not None:
            ctx.phase("starting the model server")
            self.server.start()
            ctx.event(f"{self.server.engine} server up in {self.server.start_s:.1f}s serving "
                      f"{', '.join(self.server.models())}",
                      metrics={"server_start_s": self.server.start_s})
            self.base_url = self.server.base_url
        self.start_s = time.monotonic() - t0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def endpoint_target(spec: EvalJobSpec, lm_eval: bool) -> Target:
    e = spec.target.endpoint
    base_url = e.base_url.rstrip("/")
    api_key = os.environ.get(e.api_key_env, "") if e.api_key_env else ""
    return Target(runs=[("run", e.model)], base_url=base_url,
                  controls={"engine": "endpoint", "engine_version": base_url, "precision": "unknown",
                            "quantization": "", "chat_template_sha256": "", "tool_call_parser": "",
                            "lora_enabled": False},
                  harness_args={"tokenizer": None, "max_length": 2048, "device": "cpu", "api_key": api_key,
                                "remote_tokenizer": lm_eval and endpoint_tokenizer(base_url, api_key)})


def deployment_target(ctx: JobContext, spec: EvalJobSpec, lm_eval: bool) -> Target:
    """A live deployment: no engine of our own. Its key and its engine's controls come from its record (written by
    the serving job when it went READY), so the report states the deployment's engine, precision and adapter."""
    from services.core.deployments import read_record

    t = spec.target
    record = read_record(ctx.artifacts, t.deployment)
    if record is None or record.get("state") != "READY":
        ctx.fail(f"deployment {t.deployment} is {record.get('state') if record else 'gone'}; evaluate a READY one")
    model = ctx.artifacts.resolve(t.model)
    parents = [model.ref()] + ([ctx.artifacts.resolve(t.adapter).ref()] if t.adapter else [])
    controls = dict(record.get("controls") or {})
    controls |= {"deployment": t.deployment, "served_model": t.served_model,
                 "adapter": t.adapter.uri if t.adapter else ""}
    model_dir = ctx.artifacts.materialize(model.ref(), ctx.settings.cache_dir)
    return Target(runs=[("run", t.served_model)], parents=parents, base_url=record["base_url"], controls=controls,
                  harness_args={"tokenizer": str(model_dir), "max_length": 2048, "device": "cpu",
                                "api_key": record["api_key"]})


def gguf_target(ctx: JobContext, spec: EvalJobSpec, model, work: Path) -> Target:
    """A GGUF model artifact on llama.cpp's OpenAI-compatible server (services.core.llama_server): its own chat
    template and vocabulary (lm-eval tokenizes through the server), greedy or seeded sampling as asked. The controls
    name the engine and the GGUF type, so a form comparison with the model it came from states them."""
    from services.core.llama_cpp import LlamaCpp, Toolchain, cpu_threads
    from services.core.llama_server import LlamaServer, LlamaServerSpec

    toolchain = Toolchain()
    missing = toolchain.missing()
    if missing:
        ctx.fail(f"{model.id} is a GGUF file and this worker has no llama.cpp: {missing}")
    folder = ctx.artifacts.materialize(model.ref(), ctx.settings.cache_dir, paths=[model.metadata["gguf_file"]])
    path = folder / model.metadata["gguf_file"]
    with LlamaCpp(toolchain).load(path) as m:
        template = m.meta("tokenizer.chat_template")
    n_ctx = min(int(model.metadata.get("max_position_embeddings") or 2048), 4096)
    threads = cpu_threads()
    server = LlamaServer(LlamaServerSpec(model_path=str(path), served_name=model.name, max_model_len=n_ctx,
                                         seed=spec.sampling.seed, threads=threads), log_path=work / "llama.log")
    kind = str(model.metadata.get("quantization", "gguf"))
    return Target(runs=[("run", model.name)], parents=[model.ref()],
                  server=server,
                  controls={"engine": "llama.cpp", "engine_version": toolchain.version(),
                            "precision": f"{kind} (llama.cpp, {threads} threads)", "quantization": kind,
                            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
                            "tool_call_parser": "", "lora_enabled": False},
                  harness_args={"tokenizer": None, "remote_tokenizer": True, "max_length": n_ctx, "device": "cpu"})


def served_target(ctx: JobContext, spec: EvalJobSpec, work: Path) -> Target:
    """A model artifact (with the adapter loadable, for adapter targets) on a vLLM server of our own: the adapter
    on and off are two names on one engine. A GGUF artifact goes to llama.cpp's server instead (gguf_target)."""
    t, cache = spec.target, ctx.settings.cache_dir
    model = ctx.artifacts.resolve(t.model)
    if model.metadata.get("format") == "gguf":  # llama.cpp's engine, not vLLM's
        return gguf_target(ctx, spec, model, work)
    import torch

    from services.core.vllm import (
        ServerSpec,
        VLLMServer,
        cpu_cannot_run,
        engine_dtype,
        engine_info,
        tool_call_parser_for,
    )

    parents = [model.ref()]
    model_dir = ctx.artifacts.materialize(model.ref(), cache)
    template = (model_dir / "chat_template.jinja").read_text() if (model_dir / "chat_template.jinja").exists() \
        else json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template", "") or ""
    adapters = {}
    if t.kind == "adapter":
        adapter = ctx.artifacts.resolve(t.adapter)
        parents.append(adapter.ref())
        adapters[adapter.name] = str(ctx.artifacts.materialize(adapter.ref(), cache))
        runs = [("candidate", adapter.name)] + ([("baseline", model.name)] if spec.with_baseline else []) \
            + ([("prompting", model.name)] if t.prompting else [])  # the base prompted, on the same engine
    else:
        runs = [("run", model.name)]
    parser = tool_call_parser_for(template, model.metadata.get("model_type", ""))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    why = cpu_cannot_run(str(model.metadata.get("quantization_scheme", "")), device)
    if why:
        ctx.fail(f"{model.id}: {why}")
    dtype = engine_dtype(device, bool(model.metadata.get("quantization")))
    sspec = ServerSpec(model_dir=str(model_dir), served_name=model.name, adapters=adapters, tool_call_parser=parser,
                       dtype=dtype, seed=spec.sampling.seed, device=device,
                       max_model_len=min(int(model.metadata.get("max_position_embeddings") or 2048), 4096))
    info = engine_info()
    return Target(runs=runs, parents=parents, server=VLLMServer(sspec, log_path=work / "vllm.log"),
                  controls={"engine": info["engine"], "engine_version": info["version"],
                            "precision": f"{dtype} ({model.metadata.get('dtype', '?')} weights)",
                            "quantization": str(model.metadata.get("quantization", "")),
                            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
                            "tool_call_parser": parser, "lora_enabled": bool(adapters)},
                  harness_args={"tokenizer": str(model_dir), "max_length": sspec.max_model_len, "device": device})


@dataclass
class Run:
    """One labelled run's results (the candidate, the baseline, or the only run)."""

    label: str
    served: str
    answered: str
    tests: list[dict[str, Any]]
    blocks: dict[str, dict[str, float]]
    raw: list[Path]
    seconds: float
    harness: Any = None    # lm_eval_run.HarnessRun


def run_one(ctx: JobContext, spec: EvalJobSpec, suite: Suite, target: Target, label: str, served: str,
            work: Path) -> Run:
    from services.evaluation import scoring
    from services.evaluation.lm_eval_run import model_args

    ctx.check_cancelled()
    try:
        answered = check_answering(target.base_url, served) if target.server is not None else served
    except RuntimeError as e:  # the engine's own traceback is what says why
        raise RuntimeError(f"{e}\nlast lines of the engine's log:\n{target.server.log_tail(40)}") from None
    if answered != served:
        ctx.fail(f"asked for {served!r} but {answered!r} answered; the run would not measure the target")
    t0 = time.monotonic()
    prompting = is_prompting(spec, label)
    tests, raw = run_suite(label, served, target.base_url, suite.prompted if prompting else suite.cases, suite.user,
                           spec, work, timeout_s=3600, api_key=target.harness_args.get("api_key") or "")
    harness = None
    if suite.lm_eval is not None:
        ctx.phase(f"lm-eval on {served}")
        harness = suite.lm_eval.run(label, model_args(base_url=target.base_url, model=served, seed=spec.sampling.seed,
                                                      **target.harness_args),
                                    work, spec.target.system_prompt if prompting else "",
                                    spec.sampling.seed)
        tests += harness.tests
        ctx.event(f"lm-eval on {served}: " + ", ".join(
            f"{n} {v['primary']} {v['value']:.3f}" for n, v in harness.tasks.items() if v.get("value") is not None)
            + f" in {harness.seconds:.1f}s")
    blocks = scoring.summarize(tests)
    return Run(label, served, answered, tests, blocks, raw, time.monotonic() - t0, harness)


def is_prompting(spec: EvalJobSpec, label: str) -> bool:
    """Whether the run labelled `label` sends the prompting baseline's system prompt and shots."""
    return spec.target.kind == "prompted" or (label == "prompting" and spec.target.prompting)


def run_target(spec: EvalJobSpec, label: str) -> dict[str, Any]:
    """What a run measured, as its report states it: an adapter target's prompting run is the base prompted (the
    adapter off), a prompted target."""
    t = spec.target
    if t.kind == "adapter" and label == "prompting":
        return t.model_copy(update={"kind": "prompted", "adapter": None}).model_dump(mode="json")
    return t.model_dump(mode="json")


def save_report(ctx: JobContext, spec: EvalJobSpec, suite: Suite, target: Target, run: Run, work: Path,
                name: str) -> None:
    from services.evaluation.html import report_html

    t = spec.target
    h = run.harness
    what = run_target(spec, run.label)
    report = {"name": name, "label": run.label, "target": what | {"served_as": run.served},
              "target_label": run.served, "answering_model": run.answered,
              "answering_checked": run.answered == run.served, "adapter_enabled": run.label == "candidate",
              "controls": target.controls, "blocks": run.blocks, "tests": run.tests,
              "prompting": {"system_prompt": t.system_prompt, "few_shot_k": t.few_shot_k}
              if is_prompting(spec, run.label) else None,
              "lm_eval": {"version": h.version, "tasks": h.tasks, "seconds": h.seconds} if h else None,
              "timing": {"server_start_s": target.start_s, "tests_s": run.seconds,
                         "lm_eval_s": h.seconds if h else 0.0}}
    d = work / f"report-{run.label}"
    d.mkdir()
    if h is not None:  # lm-eval's own results and samples files, as its CLI writes them
        (d / "lm-eval").mkdir()
        for p in h.files:
            shutil.copy(p, d / "lm-eval" / p.name)
    (d / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (d / "report.html").write_text(report_html(report))
    for p in run.raw:
        shutil.copy(p, d / (p.parent.name + "-" + p.name))
    w = ctx.writer("report", name, parents=target.parents + ([spec.suite.promptfoo_suite]
                                                             if spec.suite.promptfoo_suite else []))
    for _ in w.add_dir(d):
        pass
    ctx.commit(w, metadata={"report": "eval", "label": run.label, "target_kind": what["kind"], "served_as": run.served,
                            "suite_sha256": suite.sha256, "controls": target.controls},
               metrics={f"{b}_pass_rate": v["pass_rate"] for b, v in run.blocks.items()}
               | {"tests_s": run.seconds, "server_start_s": target.start_s})


def evaluate(ctx: JobContext, spec: EvalJobSpec) -> None:
    # setup
    suite = Suite.load(ctx, spec)
    work = Path(tempfile.mkdtemp(prefix="tunery-eval-"))
    try:
        kind = spec.target.kind
        target = (endpoint_target(spec, suite.lm_eval is not None) if kind == "endpoint"
                  else deployment_target(ctx, spec, suite.lm_eval is not None) if kind == "deployment"
                  else served_target(ctx, spec, work))
        target.controls |= {"sampling": spec.sampling.model_dump(), "suite_sha256": suite.sha256,
                            "lm_eval": suite.lm_eval.controls if suite.lm_eval else None}
        # run
        target.start(ctx)
        ctx.phase("running")
        runs: list[Run] = []
        try:
            for label, served in target.runs:
                runs.append(run := run_one(ctx, spec, suite, target, label, served, work))
                ctx.metrics(len(runs), {f"{label}_{b}_pass_rate": v["pass_rate"] for b, v in run.blocks.items()},
                            total_steps=len(target.runs), text=f"{label} ({served}): " + ", ".join(
                                f"{b} {v['passed']:.0f}/{v['total']:.0f}" for b, v in run.blocks.items()))
        finally:
            target.stop()
        # save
        for run in runs:
            save_report(ctx, spec, suite, target, run, work,
                        name=f"{spec.name}-{run.label}" if len(runs) > 1 else spec.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    run_job("evaluation", {"evaluation.run": (evaluate, EvalJobSpec)})


if __name__ == "__main__":
    main()
