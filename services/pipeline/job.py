"""The pipeline job: `python -m services.pipeline.job <spec-uri>` (control environment).

pipeline.run drives the stage services over gRPC through the SDK, one stage job at a time, and never does a stage's
work itself. setup (the spec, a client of the stage services) -> run (import -> data -> train -> eval: base, base +
adapter and the prompting baseline on one engine -> gates -> merge -> eval merged -> quantize each form -> eval it ->
serve the best form that passed -> eval the deployment) -> save (one `report` artifact: pipeline.json and
pipeline.html, parents every artifact it made).

Each stage job's idempotency key is `<pipeline id>-<stage>`: a later attempt of the same pipeline (after this one
was killed, failed or was cancelled) finds the stage jobs that already ran or still run and re-attaches to them
instead of starting them again; a stage job that failed is retried as `<key>-r2`, ... A cancel of the pipeline
cancels the stage job that is running. In smoke mode every stage runs on the file's smoke slice, every artifact and
job is labelled smoke=true, gates are reported but do not stop the arc, and the deployment is deleted once it has
been evaluated: a smoke run never promotes anything.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from services.core.jobctx import JobCancelled, JobContext, run_job
from services.core.vllm import UNSUPPORTED_HERE
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import (datagen_pb2, evaluation_pb2, merging_pb2, pipeline_pb2, quantization_pb2,
                                    registry_pb2, serving_pb2, training_pb2)
from services.pipeline.spec import SCHEMES, TEACHER_IS_BASE, PipelineJobSpec, smoke_slice
from services.sdk.client import TuneryClient, ref

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
SCHEME_NAMES = {v: k for k, v in SCHEMES.items()}
DEFAULT_SAMPLING = pb.SamplingParams(temperature=0.0, max_tokens=64, seed=0)
DEFAULT_FORM_DROP = 2.0
# stages that get the file's `resources` (torch or an engine of their own); the others keep their service's default:
# imports and data are light, a deployment's replica takes the serving service's share, and the deployment's eval
# has no engine of its own (on a small cluster, 2 CPUs each for the replica and its eval would never schedule)
LIGHT_STAGES = ("import", "data", "serve", "eval-deployment")


def token_for(spec: PipelineJobSpec) -> str:
    """The token the job calls the services with: never in the spec (the store keeps specs); the worker's own
    TUNERY_TOKEN, or the file the service named (the embedded stack's ~/.tunery/token)."""
    if spec.token_file and Path(spec.token_file).is_file():
        return Path(spec.token_file).read_text().strip()
    if os.environ.get("TUNERY_TOKEN"):
        return os.environ["TUNERY_TOKEN"]
    path = os.environ.get("TUNERY_TOKEN_FILE", "")
    return Path(path).read_text().strip() if path and Path(path).is_file() else ""


def seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9 if ts is not None and (ts.seconds or ts.nanos) else 0.0


class StageFailed(Exception):
    """A stage job failed: the pipeline writes its report (how far it got), then fails with this reason."""


@dataclass
class StageRun:
    stage: str
    job_id: str
    state: str
    reattached: bool
    seconds: float                     # the stage job's own run time (started -> finished)
    waited_s: float                    # how long this attempt waited on it
    outputs: list[str] = field(default_factory=list)


class Stages:
    """Runs stage jobs by key: re-attaches to one that exists, submits one that does not, waits (cancelling it when
    the pipeline is cancelled), and keeps what each took."""

    POLL_S = 1.0

    def __init__(self, ctx: JobContext, client: TuneryClient, pipeline_id: str, smoke: bool,
                 resources: pb.Resources | None):
        self.ctx, self.c, self.pid, self.smoke, self.resources = ctx, client, pipeline_id, smoke, resources
        self.runs: dict[str, StageRun] = {}
        self.current = ""

    def options(self, stage: str, key: str) -> pb.SubmitOptions:
        labels = {"pipeline": self.pid, "stage": stage, **({"smoke": "true"} if self.smoke else {})}
        opts = pb.SubmitOptions(idempotency_key=key, labels=labels, smoke=self.smoke)
        if self.resources is not None and not stage.startswith(LIGHT_STAGES):
            opts.resources.CopyFrom(self.resources)
        return opts

    def find(self, key: str) -> pb.Job | None:
        try:
            return self.c.get_job(key)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def run(self, stage: str, what: str, submit: Callable[[pb.SubmitOptions], pb.Job], *,
            redo: bool = False) -> pb.Job:
        """The stage's job, by key: a running or succeeded one is re-attached to; a failed or cancelled one is
        retried under the next key (`<pipeline>-<stage>-r2`, ...). `redo`: a succeeded one too (what it made is
        gone, e.g. a deployment whose cluster restarted)."""
        self.current = stage
        base = f"{self.pid}-{stage}"
        done = {pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED} | ({pb.JOB_STATE_SUCCEEDED} if redo else set())
        for attempt in range(1, 20):
            key = base if attempt == 1 else f"{base}-r{attempt}"
            job = self.find(key)
            if job is not None and job.state in done:
                continue
            reattached = job is not None
            if job is None:
                try:
                    job = submit(self.options(stage, key))
                except grpc.RpcError as e:  # refused before anything ran: the service's own words
                    raise StageFailed(f"{stage}: refused: {e.code().name}: {e.details()}") from None
            break
        else:
            raise StageFailed(f"{stage}: its job failed 19 times ({base}-r19): read its events")
        step = len(self.runs) + 1
        self.ctx.event(f"{stage}: {what}: {'re-attached to' if reattached else 'started'} job {job.id}",
                       step=step, metrics={f"stage_{stage.replace('-', '_')}": float(step)})
        t0 = time.monotonic()
        while job.state not in TERMINAL:
            reason = self.ctx.cancel_requested()
            if reason is not None:
                self.c.cancel_job(job.id, f"pipeline {self.pid} cancelled: {reason}")
                raise JobCancelled(f"{reason} (during {stage}; its job {job.id} was cancelled too)")
            time.sleep(self.POLL_S)
            job = self.c.get_job(job.id)
        run = StageRun(stage, job.id, pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(), reattached,
                       round(max(0.0, seconds(job.finished_at) - seconds(job.started_at)), 1),
                       round(time.monotonic() - t0, 1), [o.uri for o in job.outputs])
        self.runs[stage] = run
        if job.state != pb.JOB_STATE_SUCCEEDED:
            raise StageFailed(f"{stage} ({job.id}) {run.state}: {job.state_reason}; submit the pipeline again to "
                              "retry from this stage (the stages before it are re-used)")
        self.ctx.event(f"{stage}: done in {run.seconds:.1f}s ({job.id})", step=step)
        return job


@dataclass
class Form:
    """One form of the model as evaluated: what it is, its report, how it compared, whether it may be served."""

    name: str                          # base+adapter, merged, gptq-w4a16, ...
    artifact: str                      # the model artifact ("" for base + adapter: the adapter's pair)
    report: str = ""
    compared_with: str = ""
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    greedy_agreement: float = 0.0
    comparison: str = ""
    metrics: dict = field(default_factory=dict)
    paired: dict = field(default_factory=dict)   # per block: pairs, gained, lost (against compared_with)

    @property
    def passed(self) -> bool:
        return self.verdict in ("PASS", "")


def broken(reasons: list[str]) -> str:
    """The reasons that broke a gate ('target pass rate 37.5% < gate 80.0%'), else the first reason."""
    hits = [r for r in reasons if "< gate" in r or "> gate" in r or " > " in r]
    return "; ".join(hits[:2]) or (reasons[0] if reasons else "the gate failed")


def block_name(b: int) -> str:
    return evaluation_pb2.EvalBlock.Name(b).removeprefix("EVAL_BLOCK_").lower()


def deployment_state(dep: serving_pb2.Deployment) -> str:
    return serving_pb2.DeploymentState.Name(dep.state).removeprefix("DEPLOYMENT_STATE_")


def deployment_said(dep: serving_pb2.Deployment) -> str:
    """'FAILED: <Serve's message>', or the state alone."""
    return deployment_state(dep) + (f": {dep.message}" if dep.message else "")


def verdict_name(v: int) -> str:
    return evaluation_pb2.Verdict.Name(v).removeprefix("VERDICT_")


class Pipeline:
    def __init__(self, ctx: JobContext, job: PipelineJobSpec):
        self.ctx, self.job = ctx, job
        self.spec = json_format.ParseDict(job.spec, pipeline_pb2.PipelineSpec())
        self.smoke = job.smoke
        self.slice = smoke_slice(self.spec)
        self.c = TuneryClient(endpoints=job.endpoints, token=token_for(job), timeout=120)
        resources = self.spec.resources if self.spec.HasField("resources") else None
        self.stages = Stages(ctx, self.c, job.pipeline_id, job.smoke, resources)
        self.skip = set(self.spec.skip_stages)
        self.made: dict[str, str] = {}         # what the pipeline made, by role (the report's lineage)
        self.forms: list[Form] = []
        self.gate: dict = {}
        self.notes: list[str] = []
        self.deployment: dict = {}
        self.sampling = self.spec.sampling if self.spec.HasField("sampling") else DEFAULT_SAMPLING

    @property
    def work(self) -> Path:
        """The job's scratch folder for the files it downloads (the mix's parts, the holdout, the loss curve)."""
        path = Path(self.ctx.settings.cache_dir) / "pipeline" / self.job.pipeline_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def name(self, suffix: str = "") -> str:
        base = self.spec.name or "pipeline"
        return f"{base}{'-' + suffix if suffix else ''}{'-smoke' if self.smoke else ''}"

    # ------------------------------------------------------------------ stages
    def import_base(self) -> str:
        s = registry_pb2.ImportModelSpec()
        s.CopyFrom(self.spec.base)
        s.name = s.name or self.name("base")
        job = self.stages.run("import-base", f"import the base {s.source}", lambda o: self.c.call(
            self.c.registry.ImportModel, registry_pb2.ImportModelRequest(spec=s, options=o)))
        return job.outputs[0].uri

    def import_data(self, stage: str, d: registry_pb2.ImportDatasetSpec, default_name: str) -> str:
        s = registry_pb2.ImportDatasetSpec()
        s.CopyFrom(d)
        s.name = s.name or default_name
        job = self.stages.run(stage, f"import {s.source}", lambda o: self.c.call(
            self.c.registry.ImportDataset, registry_pb2.ImportDatasetRequest(spec=s, options=o)))
        return job.outputs[0].uri

    def generate(self, base: str) -> str:
        s = datagen_pb2.GenerateDatasetSpec()
        s.CopyFrom(self.spec.generate)
        if s.teacher.model.uri == TEACHER_IS_BASE:
            s.teacher.model.uri = base
        s.name = s.name or self.name("generated")
        if self.smoke:
            s.num_examples = min(s.num_examples or self.slice["num_examples"], self.slice["num_examples"])
        job = self.stages.run("generate", "generate data with the teacher", lambda o: self.c.call(
            self.c.datagen.GenerateDataset, datagen_pb2.GenerateDatasetRequest(spec=s, options=o)))
        return job.outputs[0].uri

    def prepare(self, stage: str, raw: str, base: str, *, holdout: float | None = None, name: str = "") -> str:
        s = datagen_pb2.PrepareDatasetSpec()
        s.CopyFrom(self.spec.prepare)
        s.dataset.CopyFrom(ref(raw))
        s.base_model.CopyFrom(ref(base))
        s.name = name or s.name or self.name("data")
        if holdout is not None:
            s.holdout_fraction = holdout
        job = self.stages.run(stage, "validate, dedup and hold out" if holdout is None else
                              "prepare the training mix (no holdout: the held-out split is the test set)",
                              lambda o: self.c.call(self.c.datagen.PrepareDataset,
                                                    datagen_pb2.PrepareDatasetRequest(spec=s, options=o)))
        return job.outputs[-1].uri

    def training_mix(self, prepared: str, extras: list[str], base: str) -> str:
        """The prepared train split with the train_extra datasets mixed in (never held out, never tested), as a raw
        dataset of this job's own (identical content: the same artifact again), then prepared without holdout."""
        work = self.work
        parts = [self.c.download(prepared, "train.jsonl", work / "train.jsonl").read_text()]
        for uri in extras:
            art = self.c.get_artifact(uri)
            fname = art.metadata["file"] if "file" in art.metadata else art.files[0].path
            parts.append(self.c.download(uri, fname, work / f"extra-{art.id}.jsonl").read_text())
        text = "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts)
        writer = self.ctx.writer("dataset", self.name("mix"), parents=[self._ref(prepared), *map(self._ref, extras)])
        writer.add_bytes(text.encode(), "mix.jsonl")
        mix = self.ctx.commit(writer, metadata={"stage": "raw", "format_hint": "auto", "file": "mix.jsonl",
                                                "source": "pipeline " + self.job.pipeline_id,
                                                **({"smoke": True} if self.smoke else {})})
        return self.prepare("data-mix", mix.uri, base, holdout=0.0, name=self.name("mix"))

    def _ref(self, uri: str):
        from services.core.artifacts import ArtifactRef

        return self.ctx.artifacts.resolve(ArtifactRef(uri=uri)).ref()

    def suite(self, heldout: str, probes: str) -> evaluation_pb2.EvalSuite:
        s = evaluation_pb2.EvalSuite()
        s.CopyFrom(self.spec.suite)
        if not s.heldout_dataset.uri and (s.heldout_assertion or not s.promptfoo_suite.uri):
            s.heldout_dataset.CopyFrom(ref(heldout))
        if probes:
            s.fact_probes = True
            s.fact_probe_source.CopyFrom(ref(probes))
        if self.smoke:
            n = self.slice["max_tests_per_block"]
            s.max_tests_per_block = min(s.max_tests_per_block or n, n)
        return s

    def evaluate(self, stage: str, what: str, target: evaluation_pb2.EvalTarget, suite, name: str) -> pb.Job:
        spec = evaluation_pb2.EvalSpec(target=target, suite=suite, name=name, sampling=self.sampling)
        return self.stages.run(stage, what, lambda o: self.c.call(
            self.c.evaluation.SubmitEval, evaluation_pb2.SubmitEvalRequest(spec=spec, options=o)))

    def compare_forms(self, form: Form, against: Form) -> None:
        drop = self.spec.max_form_drop_points if self.spec.HasField("max_form_drop_points") else DEFAULT_FORM_DROP
        cmp = self.c.compare_reports(against.report, form.report, form_comparison=True, max_form_drop_points=drop)
        form.compared_with, form.verdict = against.name, verdict_name(cmp.verdict)
        form.reasons, form.differences = list(cmp.verdict_reasons), list(cmp.form_differences)
        form.greedy_agreement, form.comparison = cmp.greedy_agreement, cmp.report.uri
        form.paired = {p.block: {"pairs": p.pairs, "gained": p.gained, "lost": p.lost} for p in cmp.paired}
        self.ctx.event(f"{form.name} vs {against.name}: {form.verdict}: " + "; ".join(form.reasons[:3]),
                       level="info" if form.passed else "warning")
        if not form.passed and form.artifact:
            self.notes.append(f"{form.name} against {against.name}: {broken(form.reasons)}: not serving it")

    # ------------------------------------------------------------------ the arc
    def run(self) -> None:
        spec, ctx = self.spec, self.ctx
        ctx.event(f"pipeline {self.job.pipeline_id}{' (smoke: ' + str(self.slice) + ')' if self.smoke else ''}")
        base = self.import_base()
        self.made["base"] = base
        raw = self.import_data("import-data", spec.data, self.name("data")) if spec.data.source else ""
        extras = [self.import_data(f"import-extra-{i + 1}", d, self.name(f"extra-{i + 1}"))
                  for i, d in enumerate(spec.train_extra)]
        if spec.HasField("generate"):
            generated = self.generate(base)
            self.made["generated"] = generated
            if raw:  # real data to hold out and test on, synthetic data to train on as well
                extras.insert(0, generated)
            else:
                raw = generated
        raw = raw or spec.prepare.dataset.uri
        self.made["raw"] = raw
        probes = self.import_data("import-facts", spec.fact_probes, self.name("facts")) \
            if spec.fact_probes.source else ""
        data = self.prepare("data", raw, base)
        self.made["dataset"] = data
        train_data = self.training_mix(data, extras, base) if extras else data
        if extras:
            self.made["training_mix"] = train_data
        suite = self.suite(data, probes)
        if probes:
            self.made["fact_probes"] = probes

        # the prompting baseline (is a system prompt and k examples enough?) runs on the eval stage's engine, beside
        # the base and the adapter; only a pipeline that skips eval gives it a stage (and an engine) of its own
        prompted, prompting = "", None
        if "prompting" not in self.skip and (spec.system_prompt or spec.few_shot_k):
            prompting = evaluation_pb2.PromptedTarget(system_prompt=spec.system_prompt, few_shot_k=spec.few_shot_k,
                                                      few_shot_dataset=ref(data))
            if "eval" in self.skip:
                prompting.model.CopyFrom(ref(base))
                prompted = self.evaluate("prompting", f"baseline: base + system prompt + {spec.few_shot_k}-shot",
                                         evaluation_pb2.EvalTarget(prompted=prompting), suite,
                                         self.name("prompting")).outputs[0].uri
                self.made["prompting_report"] = prompted

        t = training_pb2.TrainingSpec()
        t.CopyFrom(spec.train)
        t.base_model.CopyFrom(ref(base))
        t.dataset.CopyFrom(ref(train_data))
        t.name = t.name or self.name("adapter")
        if self.smoke:
            t.max_steps = self.slice["max_steps"]
            t.micro_batch_size = self.slice["micro_batch_size"]
        method = training_pb2.FinetuneMethod.Name(t.method).removeprefix("FINETUNE_METHOD_").lower()
        trained = self.stages.run("train", f"train a {method} adapter", lambda o: self.c.call(
            self.c.training.SubmitTraining, training_pb2.SubmitTrainingRequest(spec=t, options=o)))
        adapter = next(o.uri for o in trained.outputs if "/adapter-" in o.uri)
        self.made["adapter"] = adapter
        self.train_metrics = dict(self.c.get_artifact(adapter).metrics)

        adapter_form = Form("base+adapter", adapter)
        if "eval" not in self.skip:
            evaluated = self.evaluate(
                "eval", "evaluate base, base + adapter" + (" and the prompting baseline" if prompting else "")
                + " on one engine", evaluation_pb2.EvalTarget(adapter=evaluation_pb2.AdapterTarget(
                    base_model=ref(base), adapter=ref(adapter), prompting=prompting)), suite, self.name("eval"))
            labels = {self.c.get_artifact(o.uri).metadata["label"]: o.uri for o in evaluated.outputs}
            self.made["baseline_report"], self.made["candidate_report"] = labels["baseline"], labels["candidate"]
            if "prompting" in labels:
                prompted = self.made["prompting_report"] = labels["prompting"]
            adapter_form.report = labels["candidate"]
            self.gates(labels["baseline"], labels["candidate"], prompted)
            if self.gate["verdict"] != "PASS" and not spec.force and not self.smoke:
                self.notes.append(f"{broken(self.gate['reasons'])}: not merging (--force runs past the gates and "
                                  "stamps the report)")
                return
        self.forms.append(adapter_form)

        if "merge" in self.skip:
            return self.serve(adapter_form, base, suite)
        m = merging_pb2.MergeSpec()
        m.CopyFrom(spec.merge)
        m.base_model.CopyFrom(ref(base))
        m.adapter.CopyFrom(ref(adapter))
        m.name = m.name or self.name("merged")
        merged_job = self.stages.run("merge", "merge the adapter into the base, proved equal to base + adapter",
                                     lambda o: self.c.call(self.c.merging.SubmitMerge,
                                                           merging_pb2.SubmitMergeRequest(spec=m, options=o)))
        merged = merged_job.outputs[-1].uri
        self.made["merged"] = merged
        merged_art = self.c.get_artifact(merged)
        merged_form = Form("merged", merged, metrics={k: merged_art.metrics[k] for k in (
            "max_abs_logit_diff", "mean_kl", "greedy_identical", "probe_prompts", "greedy_ties", "bytes_written")
            if k in merged_art.metrics})
        self.forms.append(merged_form)
        if "eval" not in self.skip:
            merged_form.report = self.evaluate("eval-merged", "evaluate the merged model", evaluation_pb2.EvalTarget(
                model=ref(merged)), suite, self.name("eval-merged")).outputs[0].uri
            self.compare_forms(merged_form, adapter_form)

        if "quantize" not in self.skip:
            forms = ([spec.quantize] if spec.HasField("quantize") else []) + list(spec.quantize_forms)
            for q in forms:
                self.quantize(q, merged, suite, merged_form)
        # the smallest form that passed its gate (the last made), never a GGUF file (llama.cpp's, not vLLM's); when
        # none did, base + adapter on the base's engine, which passed the pipeline's gates
        best = next(f for f in reversed(self.forms) if f.passed and not f.name.startswith("gguf"))
        self.serve(best, base, suite)

    def gates(self, baseline: str, candidate: str, prompted: str) -> None:
        spec = self.spec
        cmp = self.c.compare_reports(baseline, candidate, prompting_baseline=prompted,
                                     gates=spec.gates if spec.HasField("gates") else None)
        up = sum(f.now_passes for f in cmp.flips)
        self.gate = {
            "verdict": verdict_name(cmp.verdict), "reasons": list(cmp.verdict_reasons),
            "default_gates": cmp.default_gates, "comparison": cmp.report.uri,
            "beats_prompting_baseline": cmp.beats_prompting_baseline if prompted else None,
            "adapter_had_no_effect": cmp.adapter_had_no_effect,
            "flips": {"fail_to_pass": up, "pass_to_fail": len(cmp.flips) - up,
                      "tests": [{"test": f.test_id, "block": block_name(f.block), "now_passes": f.now_passes,
                                 "prompt": f.prompt[:300], "baseline": f.baseline_output[:300],
                                 "candidate": f.candidate_output[:300]} for f in list(cmp.flips)[:100]]},
            "block_deltas": dict(cmp.block_deltas),
            "paired": [{"block": p.block, "pairs": p.pairs, "gained": p.gained, "lost": p.lost,
                        "difference": p.difference, "ci": [p.ci_low, p.ci_high], "mcnemar_p": p.mcnemar_p,
                        "forgetting_points": p.forgetting_points, "lost_tests": list(p.lost_tests)}
                       for p in cmp.paired],
            "lm_eval_deltas": [{"task": x.task, "metric": x.metric, "baseline": x.baseline,
                                "candidate": x.candidate, "delta": x.delta, "ci": [x.ci_low, x.ci_high],
                                "worse": x.worse} for x in cmp.lm_eval_deltas],
        }
        self.made["comparison"] = cmp.report.uri
        passed = self.gate["verdict"] == "PASS"
        self.ctx.event(f"gates: {self.gate['verdict']}: " + "; ".join(self.gate["reasons"][:4]),
                       level="info" if passed else "warning")
        if not passed and (spec.force or self.smoke):
            self.notes.append(f"the gates failed ({broken(self.gate['reasons'])}) and the arc ran on: "
                              + ("forced" if spec.force else "smoke mode reports gates but never stops on them"))

    def quantize(self, q: quantization_pb2.QuantizeSpec, merged: str, suite, merged_form: Form) -> None:
        s = quantization_pb2.QuantizeSpec()
        s.CopyFrom(q)
        scheme = SCHEME_NAMES.get(s.scheme, str(s.scheme))
        s.model.CopyFrom(ref(merged))
        # calibration data unset: the quantization service takes the adapter's training data from the lineage
        s.name = s.name or self.name(scheme)
        if self.smoke:
            n = self.slice["calibration_samples"]
            s.num_calibration_samples = min(s.num_calibration_samples or n, n)
        job = self.stages.run(f"quantize-{scheme}", f"quantize the merged model to {scheme}", lambda o: self.c.call(
            self.c.quantization.SubmitQuantize, quantization_pb2.SubmitQuantizeRequest(spec=s, options=o)))
        uri = job.outputs[-1].uri
        self.made[f"quantized-{scheme}"] = uri
        art = self.c.get_artifact(uri)
        form = Form(scheme, uri, metrics={k: art.metrics[k] for k in (
            "model_bytes", "output_bytes", "compression_ratio", "greedy_agreement", "quantize_peak_rss_bytes",
            "planned_peak_bytes") if k in art.metrics})
        self.forms.append(form)
        if scheme.startswith("gguf") and suite.tool_calling:
            self.notes.append(f"{scheme}: made, not evaluated: the suite's tool-calling block needs tool-call parsing, "
                              "which llama.cpp's server here lacks (the merged model's tool calls are measured)")
            form.verdict = "NOT EVALUATED"
            return
        if "eval" not in self.skip:
            try:
                form.report = self.evaluate(f"eval-{scheme}", f"evaluate the {scheme} form", evaluation_pb2.EvalTarget(
                    model=ref(uri)), suite, self.name(f"eval-{scheme}")).outputs[0].uri
            except StageFailed as e:
                if UNSUPPORTED_HERE not in str(e):
                    raise
                # the form is made and stays; this cluster's engine cannot run it (say, W4A16 on a CPU without
                # AVX-512): not evaluated, never served here, and the arc goes on
                form.verdict = "NOT EVALUATED"
                reason = str(e).split(UNSUPPORTED_HERE + ": ", 1)[-1].split("\n")[0].split("; submit the pipeline")[0]
                self.notes.append(f"{scheme}: made, not evaluated: {reason}")
                self.ctx.event(f"{scheme}: not evaluated here ({reason})", level="warning")
                return
            self.compare_forms(form, merged_form)

    def serve(self, form: Form, base: str, suite) -> None:
        spec = self.spec
        if "serve" in self.skip:
            return
        d = serving_pb2.DeploymentSpec()
        d.CopyFrom(spec.serve)
        d.name = self.name() if not d.name else (d.name + ("-smoke" if self.smoke else ""))
        if form.name == "base+adapter":
            d.model.CopyFrom(ref(base))
            d.adapters.add(name=self.spec.name or "adapter", adapter=ref(form.artifact))
        else:
            d.model.CopyFrom(ref(form.artifact))
        dep = self.deploy(d, form)
        if dep.state != serving_pb2.DEPLOYMENT_STATE_READY and self.stages.runs["serve"].reattached:
            # re-attached to a serve job that succeeded, but its deployment is gone (the cluster restarted, or
            # someone deleted it): deploy it again, as the resubmitted pipeline asks
            self.ctx.event(f"serve: deployment {d.name} is {deployment_said(dep)}; deploying it again",
                           level="warning")
            try:
                self.c.delete_deployment(d.name)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            dep = self.deploy(d, form, redo=True)
        if dep.state != serving_pb2.DEPLOYMENT_STATE_READY:
            raise StageFailed(f"serve: deployment {d.name} is {deployment_said(dep)}")
        self.deployment = {"name": d.name, "form": form.name, "model": form.artifact or base,
                           "base_url": dep.base_url, "served_models": list(dep.served_models),
                           "state": deployment_state(dep),
                           "answered": self.ask(dep)}
        if "eval" not in self.skip:
            served = d.adapters[0].name if form.name == "base+adapter" else ""
            job = self.evaluate("eval-deployment", f"evaluate deployment {d.name} (what clients get)",
                                evaluation_pb2.EvalTarget(deployment=evaluation_pb2.DeploymentTarget(
                                    name=d.name, model=served)), suite, self.name("eval-deployment"))
            dform = Form(f"deployment {d.name}", "", report=job.outputs[0].uri)
            self.compare_forms(dform, form)
            self.deployment.update(report=dform.report, verdict=dform.verdict, reasons=dform.reasons)
        if self.smoke:
            self.c.delete_deployment(d.name)
            self.deployment["state"] = "DELETED (smoke: never promoted)"
            self.ctx.event(f"smoke: deployment {d.name} deleted after its evaluation")

    def deploy(self, d: serving_pb2.DeploymentSpec, form: Form, redo: bool = False) -> serving_pb2.Deployment:
        self.stages.run("serve", f"serve {form.name} as deployment {d.name}", lambda o: self.c.call(
            self.c.serving.CreateDeployment, serving_pb2.CreateDeploymentRequest(spec=d, options=o)), redo=redo)
        return self.c.get_deployment(d.name)

    def ask(self, dep) -> dict:
        """One request through the openai client, as a user's program sends it: the first held-out prompt."""
        from openai import OpenAI

        work = self.work
        rows = self.c.download(self.made["dataset"], "holdout.jsonl", work / "holdout.jsonl").read_text().splitlines()
        messages = json.loads(rows[0])["messages"] if rows else [{"role": "user", "content": "Hello!"}]
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        model = dep.served_models[-1]
        t0 = time.monotonic()
        reply = OpenAI(base_url=dep.base_url, api_key=dep.api_key or "none", timeout=300).chat.completions.create(
            model=model, messages=messages, max_tokens=self.sampling.max_tokens or 64, temperature=0.0)
        answer = {"model": model, "prompt": messages[-1]["content"][:500],
                  "reply": (reply.choices[0].message.content or "")[:500], "seconds": round(time.monotonic() - t0, 2)}
        self.ctx.event(f"{dep.name} answered an openai-client request in {answer['seconds']:.1f}s: "
                       f"{answer['reply'][:120]!r}")
        return answer

    # ------------------------------------------------------------------ save
    def report_uris(self) -> dict[str, str]:
        """Each evaluated form's report (and the baseline's and the prompting baseline's), by its name here."""
        named = {"base": self.made.get("baseline_report", ""), "base+prompting": self.made.get("prompting_report", "")}
        named |= {f.name: f.report for f in self.forms}
        if self.deployment.get("report"):
            named[f"deployment {self.deployment['name']}"] = self.deployment["report"]
        return {k: u for k, u in named.items() if u}

    def reports(self) -> dict[str, evaluation_pb2.EvalReport]:
        return {k: self.c.eval_report(u) for k, u in self.report_uris().items()}

    def loss_curve(self) -> bytes:
        adapter = self.made.get("adapter")
        if not adapter or "loss_curve.png" not in {f.path for f in self.c.get_artifact(adapter).files}:
            return b""
        work = self.work
        return self.c.download(adapter, "loss_curve.png", work / "loss_curve.png").read_bytes()

    def save(self, error: str = "") -> str:
        from services.pipeline.report import build_report, render_html

        loss_png = self.loss_curve()
        data = build_report(self, error)
        writer = self.ctx.writer("report", self.name("report"),
                                 parents=[self._ref(u) for u in dict.fromkeys(self.made.values()) if u])
        writer.add_bytes(json.dumps(data, indent=1, sort_keys=True).encode(), "pipeline.json")
        writer.add_bytes(render_html(data, loss_png).encode(), "pipeline.html")
        if loss_png:
            writer.add_bytes(loss_png, "loss_curve.png")
        report = self.ctx.commit(writer, metadata={"report": "pipeline", "pipeline": self.job.pipeline_id,
                                                   "smoke": self.smoke, "verdict": data["verdict"],
                                                   "forced": bool(self.spec.force)},
                                 metrics={f"{r.stage.replace('-', '_')}_s": r.seconds for r in self.stages.runs.values()})
        return report.uri


def pipeline_job(ctx: JobContext, spec: PipelineJobSpec) -> None:
    # setup
    ctx.stop_gracefully_on_sigterm()  # a cancel reaches the stage job that is running
    p = Pipeline(ctx, spec)
    # run
    try:
        p.run()
    except StageFailed as e:
        p.save(error=str(e))  # the report says how far it got
        ctx.fail(str(e))
    except JobCancelled:
        raise
    except Exception as e:  # a defect of its own: the report still says how far it got, the traceback stays
        try:
            p.save(error=f"{type(e).__name__}: {e}")
        except Exception:
            pass
        raise
    # save
    p.save()
    if p.gate and p.gate["verdict"] != "PASS" and not (spec.smoke or p.spec.force):
        ctx.fail(f"the gates failed: {broken(p.gate['reasons'])}; nothing was merged, quantized or served (the report "
                 "says why; --force runs past the gates)")


def main() -> None:
    run_job("pipeline", {"pipeline.run": (pipeline_job, PipelineJobSpec)})


if __name__ == "__main__":
    main()
