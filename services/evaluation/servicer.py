"""EvaluationService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

from typing import Any

from services.core import convert
from services.core.errors import InvalidArgument
from services.core.job_api import JobSurfaceServicer
from services.core.runtime import Runtime
from services.core.server import Registration
from services.core.specs import parse
from services.evaluation import scoring
from services.evaluation.scoring import Gates
from services.evaluation.service import (
    EvaluationService,
    EvaluationSettings,
    FormComparison,
    InlineSuite,
)
from services.evaluation.spec import EvalJobSpec
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import evaluation_pb2 as ev
from services.gen.tunery.v1 import evaluation_pb2_grpc

ASSERTIONS = {ev.ASSERTION_TYPE_EXACT: "exact", ev.ASSERTION_TYPE_CONTAINS: "contains", ev.ASSERTION_TYPE_REGEX: "regex",
              ev.ASSERTION_TYPE_JSON_SCHEMA: "json_schema", ev.ASSERTION_TYPE_SIMILARITY: "similarity",
              ev.ASSERTION_TYPE_RUBRIC: "rubric", ev.ASSERTION_TYPE_JSON_FIELDS: "json_fields"}
BLOCK_TO_PB = {"target": ev.EVAL_BLOCK_TARGET, "general": ev.EVAL_BLOCK_GENERAL,
               "tool_calling": ev.EVAL_BLOCK_TOOL_CALLING}


def _ref(r: pb.ArtifactRef) -> dict[str, str] | None:
    return convert.ref_from_pb(r).model_dump() if r.uri else None


def target_from_pb(t: ev.EvalTarget) -> dict[str, Any]:
    form = t.WhichOneof("form")
    if form == "model":
        return {"kind": "model", "model": _ref(t.model)}
    if form == "adapter":
        a = t.adapter
        target = {"kind": "adapter", "model": _ref(a.base_model), "adapter": _ref(a.adapter)}
        if a.HasField("prompting"):
            p = a.prompting
            if p.model.uri and p.model.uri != a.base_model.uri:
                raise InvalidArgument.field("spec.target.adapter.prompting.model", "the prompting baseline runs the "
                                            "base on the adapter's engine: leave it empty or give base_model")
            target |= {"system_prompt": p.system_prompt, "few_shot_k": p.few_shot_k,
                       "few_shot_dataset": _ref(p.few_shot_dataset)}
        return target
    if form == "prompted":
        p = t.prompted
        return {"kind": "prompted", "model": _ref(p.model), "system_prompt": p.system_prompt,
                "few_shot_k": p.few_shot_k, "few_shot_dataset": _ref(p.few_shot_dataset)}
    if form == "endpoint":
        e = t.endpoint
        return {"kind": "endpoint", "endpoint": {"base_url": e.base_url, "model": e.model,
                                                 "api_key_env": e.api_key_env}}
    if form == "deployment":
        return {"kind": "deployment", "deployment": t.deployment.name, "served_model": t.deployment.model}
    raise InvalidArgument.field("spec.target", "give one of model, adapter, prompted, endpoint or deployment")


def lm_eval_from_pb(s: ev.EvalSuite) -> dict[str, Any] | None:
    o = s.lm_eval
    if not (s.lm_eval_tasks or s.lm_eval_task_files.uri or s.lm_eval_files):
        if s.HasField("lm_eval"):
            raise InvalidArgument.field("spec.suite.lm_eval", "options without tasks: give lm_eval_tasks, "
                                        "lm_eval_files or lm_eval_task_files")
        return None
    return {"tasks": list(s.lm_eval_tasks), "task_files": _ref(s.lm_eval_task_files),
            "num_fewshot": o.num_fewshot if o.HasField("num_fewshot") else None, "limit": o.limit,
            "apply_chat_template": o.apply_chat_template}


def inline_from_pb(s: ev.EvalSuite) -> InlineSuite:
    files: dict[str, bytes] = {}
    for i, f in enumerate(s.lm_eval_files):
        if f.path in files:
            raise InvalidArgument.field(f"spec.suite.lm_eval_files[{i}].path", f"{f.path!r} is given twice")
        files[f.path] = f.content
    return InlineSuite(promptfoo_yaml=s.promptfoo_yaml, lm_eval_files=files)


def suite_from_pb(s: ev.EvalSuite) -> dict[str, Any]:
    if s.fact_probes and not s.fact_probe_source.uri:
        raise InvalidArgument.field("spec.suite.fact_probe_source", "is required with fact_probes: an artifact "
                                    "holding facts.jsonl (the foundation fixture model has one)")
    return {"promptfoo_suite": _ref(s.promptfoo_suite), "heldout_dataset": _ref(s.heldout_dataset),
            "heldout_assertion": convert.enum_name(ASSERTIONS, s.heldout_assertion, "spec.suite.heldout_assertion")
            if s.heldout_assertion else "contains",
            "fact_probes": _ref(s.fact_probe_source) if s.fact_probes else None, "tool_calling": s.tool_calling,
            "lm_eval": lm_eval_from_pb(s), "max_tests_per_block": s.max_tests_per_block}


def sampling_from_pb(s: pb.SamplingParams) -> dict[str, Any]:
    return {"temperature": s.temperature, "top_p": s.top_p or 1.0, "max_tokens": s.max_tokens or 48, "seed": s.seed}


def spec_from_pb(s: ev.EvalSpec) -> tuple[EvalJobSpec, InlineSuite]:
    spec = parse(EvalJobSpec, {"target": target_from_pb(s.target), "suite": suite_from_pb(s.suite),
                               "sampling": sampling_from_pb(s.sampling), "name": s.name,
                               "with_baseline": s.with_baseline if s.HasField("with_baseline") else True})
    return spec, inline_from_pb(s.suite)


def controls_to_pb(c: dict[str, Any]) -> ev.EvalControls:
    s = c.get("sampling", {})
    return ev.EvalControls(
        engine=c.get("engine", ""), engine_version=c.get("engine_version", ""),
        quantization=c.get("quantization", ""), chat_template_sha256=c.get("chat_template_sha256", ""),
        sampling=pb.SamplingParams(temperature=s.get("temperature", 0.0), top_p=s.get("top_p", 1.0),
                                   max_tokens=s.get("max_tokens", 0), seed=s.get("seed", 0)),
        suite_sha256=c.get("suite_sha256", ""), tool_call_parser=c.get("tool_call_parser", ""),
        lm_eval_version=(c.get("lm_eval") or {}).get("version", ""), deployment=c.get("deployment", ""),
        served_model=c.get("served_model", ""), adapter=c.get("adapter", ""),
        precision_detail=c.get("precision", ""))


def lm_eval_to_pb(tasks: dict[str, Any]) -> list[ev.LmEvalTaskResult]:
    return [ev.LmEvalTaskResult(task=name, source=t.get("source", ""), output_type=t.get("output_type", ""),
                                metric=t.get("primary", ""), value=float(t.get("value") or 0.0),
                                stderr=float(t.get("primary_stderr") or 0.0), samples=int(t.get("n") or 0),
                                num_fewshot=int(t.get("num_fewshot") or 0), metrics=t.get("metrics") or {})
            for name, t in tasks.items()]


def report_to_pb(ref: pb.ArtifactRef, r: dict[str, Any]) -> ev.EvalReport:
    blocks = [ev.BlockResult(block=BLOCK_TO_PB[name], passed=int(b["passed"]), total=int(b["total"]),
                             pass_rate=b["pass_rate"], ci_low=b["ci_low"], ci_high=b["ci_high"],
                             errored=int(b.get("errored", 0)), errored_reason=b.get("errored_reason", ""),
                             exact_passed=int(b.get("exact_passed", 0)), exact_total=int(b.get("exact_total", 0)))
              for name, b in r["blocks"].items()]
    tests = [ev.TestResult(test_id=t["id"], block=BLOCK_TO_PB.get(t["block"], 0), prompt=t.get("prompt", ""),
                           output=t.get("output", ""), passed=bool(t["passed"]), reason=t.get("reason", ""),
                           latency_ms=float(t.get("latency_ms", 0.0)), errored=bool(t.get("errored")),
                           exact=t.get("exact")) for t in r["tests"]]
    return ev.EvalReport(report=ref, controls=controls_to_pb(r["controls"]), blocks=blocks, tests=tests,
                         answering_model=r.get("answering_model", ""), html_path="report.html",
                         lm_eval=lm_eval_to_pb((r.get("lm_eval") or {}).get("tasks") or {}))


def gates_from_pb(g: ev.Gates) -> Gates:
    """The fields given; the rest take Gates' defaults. INVALID_ARGUMENT naming a field out of range."""
    d = Gates()
    gates = Gates(**{f: getattr(g, f) if g.HasField(f) else getattr(d, f)
                     for f in ("min_target_pass_rate", "max_general_drop_points", "max_tool_calling_drop_points",
                               "require_target_gain")})
    try:
        gates.check()
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    return gates


class EvaluationServicer(JobSurfaceServicer, evaluation_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, service: EvaluationService):
        self.svc = service
        self.jobs = service.jobs

    async def SubmitEval(self, request: ev.SubmitEvalRequest, context) -> pb.Job:
        spec, inline = spec_from_pb(request.spec)
        job = await self.svc.submit(spec, inline, convert.options_from_pb(request.options))
        return convert.job_to_pb(job)

    async def GetReport(self, request: ev.GetReportRequest, context) -> ev.EvalReport:
        manifest, report = await self.svc.report(convert.ref_from_pb(request.report))
        return report_to_pb(convert.ref_to_pb(manifest.ref()), report)

    async def CompareReports(self, request: ev.CompareReportsRequest, context) -> ev.Comparison:
        gates = gates_from_pb(request.gates) if request.HasField("gates") else None
        forms = None
        if request.form_comparison:
            drop = request.max_form_drop_points if request.HasField("max_form_drop_points") else \
                scoring.DEFAULT_FORM_DROP_POINTS
            if not 0.0 <= drop <= 100.0:  # NaN too
                raise InvalidArgument.field("max_form_drop_points", f"must be points in [0, 100], got {drop}")
            forms = FormComparison(drop)
        elif request.HasField("max_form_drop_points"):
            raise InvalidArgument.field("max_form_drop_points", "applies only with form_comparison")
        result, manifest = await self.svc.compare(
            convert.ref_from_pb(request.baseline), convert.ref_from_pb(request.candidate),
            convert.ref_from_pb(request.prompting_baseline) if request.prompting_baseline.uri else None, gates,
            request.allow_uncontrolled, forms)
        return ev.Comparison(
            control_mismatches=result.control_mismatches, uncontrolled=result.uncontrolled,
            flips=[ev.Flip(test_id=f["test_id"], block=BLOCK_TO_PB.get(f["block"], 0), now_passes=f["now_passes"],
                           prompt=f["prompt"], baseline_output=f["baseline_output"],
                           candidate_output=f["candidate_output"]) for f in result.flips],
            block_deltas=result.block_deltas,
            verdict=ev.VERDICT_PASS if result.verdict == "pass" else ev.VERDICT_FAIL,
            verdict_reasons=result.verdict_reasons, beats_prompting_baseline=bool(result.beats_prompting_baseline),
            adapter_had_no_effect=result.adapter_had_no_effect, report=convert.ref_to_pb(manifest.ref()),
            lm_eval_deltas=[ev.LmEvalDelta(**d) for d in result.lm_eval_deltas],
            paired=[ev.PairedBlock(**{k: v for k, v in p.items() if k != "lost_examples"}) for p in result.paired],
            default_gates=result.default_gates, form_comparison=result.form_comparison,
            form_differences=result.form_differences, greedy_agreement=result.greedy_agreement)


    async def SaveArenaVotes(self, request: ev.SaveArenaVotesRequest, context) -> ev.ArenaResult:
        votes = [{"test_id": v.test_id, "choice": ARENA_CHOICES.get(v.choice, ""), "a_on_left": v.a_on_left,
                  "seconds": v.seconds} for v in request.votes]
        body, manifest = await self.svc.save_arena(convert.ref_from_pb(request.report_a),
                                                   convert.ref_from_pb(request.report_b), votes, request.name,
                                                   request.voter)
        return ev.ArenaResult(report=convert.ref_to_pb(manifest.ref()), **body["tally"])


ARENA_CHOICES = {ev.ARENA_CHOICE_A: "a", ev.ARENA_CHOICE_B: "b", ev.ARENA_CHOICE_TIE: "tie",
                 ev.ARENA_CHOICE_BOTH_BAD: "both_bad"}


def build(runtime: Runtime, settings: EvaluationSettings) -> Registration:
    service = EvaluationService(runtime.artifacts, runtime.runner, settings)
    return Registration(evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server, EvaluationServicer(service),
                        "tunery.v1.EvaluationService")
