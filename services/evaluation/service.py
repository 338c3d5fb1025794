"""Evaluation service logic and settings: validate eval requests and queue them; read and compare reports.
No grpc.

A bad suite or target is refused before anything is queued: a malformed promptfoo YAML (with its line), an
unknown assertion type, a suite with zero tests, a target artifact of the wrong kind, an adapter trained on
another base, an endpoint that does not answer; for lm-eval: a malformed task file (file and line), an unknown
task, key, metric or data file, an empty split, hub tasks on offline workers, log-likelihood tasks against an
endpoint that serves no tokenizer.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from pydantic import Field

from services.core.artifacts import ArtifactRef, ArtifactStore, Manifest
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRunner, Resources, SubmitOptions
from services.core.keys import validate_name
from services.core.settings import ServiceSettings, port_field
from services.core.specs import OpenAIEndpointSpec
from services.evaluation import scoring
from services.evaluation.spec import EvalJobSpec, LmEvalSpec, SuiteSpec, TargetSpec


class EvaluationSettings(ServiceSettings):
    service: str = "evaluation"
    port: int = port_field("evaluation")
    eval_cpus: float = Field(1.0, description="CPUs an eval job asks Ray for (add a GPU through options)")
    endpoint_check_timeout_s: float = Field(5.0, gt=0)
    lm_eval_hub: bool = Field(True, description="eval workers may fetch standard lm-eval tasks' datasets from the "
                                                "Hugging Face hub; false refuses such tasks up front (offline "
                                                "deployments: give local task files)")
    max_inline_suite_bytes: int = Field(32 << 20, gt=0, description="the most an inline suite (promptfoo YAML + "
                                                                     "lm-eval task files) may hold")


@dataclass
class InlineSuite:
    """Suite sources a request carries itself; each is stored as a `suite` artifact once the request is valid."""

    promptfoo_yaml: str = ""
    lm_eval_files: dict[str, bytes] = dataclass_field(default_factory=dict)

    def size(self) -> int:
        return len(self.promptfoo_yaml.encode()) + sum(len(p) + len(b) for p, b in self.lm_eval_files.items())


@dataclass
class FormComparison:
    """CompareReports between two forms of one model (services.evaluation.scoring.compare_forms)."""

    max_drop_points: float = scoring.DEFAULT_FORM_DROP_POINTS


class EvaluationService:
    SERVICE = "evaluation"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: EvaluationSettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _endpoint_headers(api_key_env: str) -> dict[str, str]:
        import os

        return {"Authorization": f"Bearer {os.environ[api_key_env]}"} if os.environ.get(api_key_env) else {}

    def _check_endpoint(self, base_url: str, api_key_env: str) -> None:
        import requests

        try:
            r = requests.get(base_url.rstrip("/") + "/models", headers=self._endpoint_headers(api_key_env),
                             timeout=self.settings.endpoint_check_timeout_s)
        except requests.RequestException as e:
            raise FailedPrecondition(f"spec.target.endpoint: {base_url} does not answer ({type(e).__name__}); "
                                     "check the URL and that the server is up") from None
        if r.status_code >= 400:
            raise FailedPrecondition(f"spec.target.endpoint: {base_url}/models answered HTTP {r.status_code}")

    def _deployment(self, t: TargetSpec) -> tuple[TargetSpec, Manifest]:
        """A live deployment: its record gives the URL and what it serves; it must be READY and answer with its key
        (the key itself stays in the store: the job reads it there)."""
        import requests

        from services.core.deployments import read_record

        name = validate_name(t.deployment, "spec.target.deployment.name")
        record = read_record(self.artifacts, name)
        if record is None:
            raise NotFound(f"spec.target.deployment: no deployment named {name} in project {self.artifacts.project}")
        if record.get("state") != "READY":
            raise FailedPrecondition(f"spec.target.deployment: {name} is {record.get('state')}; evaluate a READY "
                                     "deployment (tunery serve get shows why it is not)")
        d = record["spec"]
        adapters = {a["name"]: a["adapter"] for a in d.get("adapters") or []}
        served = t.served_model or d["served_name"]
        if served != d["served_name"] and served not in adapters:
            raise NotFound(f"spec.target.deployment.model: {name} serves no model named {served!r}; it serves "
                           f"{', '.join([d['served_name'], *adapters])}")
        try:
            r = requests.get(record["base_url"] + "/models", timeout=self.settings.endpoint_check_timeout_s,
                             headers={"Authorization": f"Bearer {record['api_key']}"})
            listed = [m["id"] for m in r.json().get("data", [])] if r.ok else []
        except (requests.RequestException, ValueError) as e:
            raise FailedPrecondition(f"spec.target.deployment: {name} does not answer at {record['base_url']} "
                                     f"({type(e).__name__}); tunery serve get {name}") from e
        if served not in listed:
            raise FailedPrecondition(f"spec.target.deployment: {name} does not list {served!r} at "
                                     f"{record['base_url']}/models (HTTP {r.status_code}); tunery serve get {name}")
        model = self.artifacts.require(ArtifactRef(**d["model"]), "spec.target.deployment", "model")
        adapter = ArtifactRef(**adapters[served]) if served in adapters else None
        return t.model_copy(update={"served_model": served, "model": model.ref(), "adapter": adapter,
                                    "endpoint": OpenAIEndpointSpec(base_url=record["base_url"], model=served)}), model

    def _target(self, t: TargetSpec) -> tuple[TargetSpec, Manifest | None]:
        if t.kind == "deployment":
            return self._deployment(t)
        if t.kind == "endpoint":
            if t.endpoint is None or t.endpoint.problem():
                raise InvalidArgument.field("spec.target.endpoint", "needs an http(s) base_url and a model name")
            self._check_endpoint(t.endpoint.base_url, t.endpoint.api_key_env)
            return t, None
        field = "spec.target.adapter.base_model" if t.kind == "adapter" else (
            "spec.target.prompted.model" if t.kind == "prompted" else "spec.target.model")
        model = self.artifacts.require(t.model, field, "model")
        if model.metadata.get("format") == "gguf" and t.kind == "adapter":
            raise FailedPrecondition(f"{field}: {model.id} is a GGUF file, which the eval job serves with llama.cpp "
                                     "(no LoRA there): evaluate the adapter on its full-precision base, or merge it "
                                     "and quantize the merged model")
        if not model.metadata.get("is_causal_lm", False):
            raise FailedPrecondition(f"{field}: {model.id} is not a causal LM")
        t = t.model_copy(update={"model": model.ref()})
        if t.kind == "adapter":
            adapter = self.artifacts.require(t.adapter, "spec.target.adapter.adapter", "adapter")
            trained_on = adapter.metadata.get("base_model", "")
            if trained_on and trained_on != model.uri:
                raise FailedPrecondition(f"spec.target.adapter: {adapter.id} was trained on {trained_on}, not "
                                         f"{model.uri}; evaluate it on its own base")
            t = t.model_copy(update={"adapter": adapter.ref()})
        prompted = "spec.target.prompted" if t.kind == "prompted" else "spec.target.adapter.prompting"
        if t.kind == "prompted" and not t.prompting:
            raise InvalidArgument.field(prompted, "give a system prompt, few-shot examples or both")
        if t.prompting and t.few_shot_k:
            data = self.artifacts.require(t.few_shot_dataset, f"{prompted}.few_shot_dataset", "dataset")
            if "train.jsonl" not in {f.path for f in data.files}:
                raise FailedPrecondition(f"{prompted}.few_shot_dataset: {data.id} is not a prepared dataset (no "
                                         "train split to take examples from)")
            t = t.model_copy(update={"few_shot_dataset": data.ref()})
        return t, model

    def _suite(self, s: SuiteSpec, inline_suite: InlineSuite, target: TargetSpec,
               model: Manifest | None) -> SuiteSpec:
        from services.evaluation.promptfoo_suite import load_user_suite

        if inline_suite.size() > self.settings.max_inline_suite_bytes:
            raise ResourceExhausted(f"spec.suite: the inline suite holds {inline_suite.size():,} bytes, more than "
                                    f"the {self.settings.max_inline_suite_bytes:,} allowed; import large data "
                                    "as a dataset or keep fewer documents")
        promptfoo_yaml = inline_suite.promptfoo_yaml
        blocks = 0
        inline = bool(promptfoo_yaml.strip())
        if inline:
            load_user_suite(promptfoo_yaml, "spec.suite.promptfoo_yaml")  # line-numbered errors, zero tests, types
            blocks += 1
        elif s.promptfoo_suite is not None:
            suite = self.artifacts.require(s.promptfoo_suite, "spec.suite.promptfoo_suite", "suite")
            load_user_suite(self.artifacts.read_file(suite.id, "promptfooconfig.yaml").decode(),
                            f"{suite.id}/promptfooconfig.yaml")
            s = s.model_copy(update={"promptfoo_suite": suite.ref()})
            blocks += 1
        if s.heldout_dataset is not None:
            data = self.artifacts.require(s.heldout_dataset, "spec.suite.heldout_dataset", "dataset")
            if not data.metadata.get("num_holdout"):
                raise FailedPrecondition(f"spec.suite.heldout_dataset: {data.id} has no held-out split; prepare it "
                                         "with a holdout fraction > 0")
            s = s.model_copy(update={"heldout_dataset": data.ref()})
            blocks += 1
        if s.fact_probes is not None:
            m = self.artifacts.resolve(s.fact_probes)
            if "facts.jsonl" not in {f.path for f in m.files}:
                raise FailedPrecondition(f"spec.suite.fact_probe_source: {m.id} holds no facts.jsonl")
            s = s.model_copy(update={"fact_probes": m.ref()})
            blocks += 1
        if s.tool_calling:
            if model is not None and model.metadata.get("format") == "gguf":
                raise FailedPrecondition(f"spec.suite.tool_calling: {model.id} is a GGUF file, served by llama.cpp "
                                         "without tool-call parsing here: evaluate tool calling on "
                                         f"{model.metadata.get('quantized_from') or 'the model it was made from'}")
            if model is not None and not self._template_has_tools(model):
                raise FailedPrecondition(f"spec.suite.tool_calling: {model.id}'s chat template does not render "
                                         "tools, so tool calls cannot be asked for")
            blocks += 1
        from services.evaluation import lm_eval_tasks

        lm_eval, task_files = None, None
        if s.lm_eval is not None or inline_suite.lm_eval_files:
            lm_eval, task_files = self._lm_eval(s.lm_eval or LmEvalSpec(), inline_suite.lm_eval_files, target)
            blocks += 1
        if not blocks:
            raise InvalidArgument.field("spec.suite", "has no tests: give a promptfoo suite, a held-out dataset, "
                                        "fact probes, tool_calling or lm-eval tasks")
        # stored only once the whole request is valid (content-addressed: the same files, one artifact)
        if inline:
            w = self.artifacts.writer("suite", "promptfoo-suite")
            w.add_bytes(promptfoo_yaml.encode(), "promptfooconfig.yaml")
            s = s.model_copy(update={"promptfoo_suite": w.commit({"format": "promptfoo"})[0].ref()})
        if inline_suite.lm_eval_files:  # (given with an artifact as well, _lm_eval has refused the request)
            w = self.artifacts.writer("suite", "lm-eval-tasks")
            for path, data in sorted(task_files.files.items()):
                w.add_bytes(data, path)
            m, _ = w.commit({"format": "lm-eval", "lm_eval_version": lm_eval_tasks.LM_EVAL_VERSION,
                             "tasks": sorted(task_files.tasks)})
            lm_eval = lm_eval.model_copy(update={"task_files": m.ref()})
        return s.model_copy(update={"lm_eval": lm_eval})

    def _lm_eval(self, spec: LmEvalSpec, inline_files: dict[str, bytes],
                 target: TargetSpec) -> tuple[LmEvalSpec, Any]:
        """Task names resolved against the task files (inline, or a stored lm-eval suite) and the pinned lm-eval's
        index; refuses hub tasks where workers are offline, and log-likelihood tasks an endpoint cannot score."""
        from services.evaluation import lm_eval_tasks

        index = lm_eval_tasks.standard_index()
        task_files = None
        if inline_files and spec.task_files is not None:
            raise InvalidArgument.field("spec.suite.lm_eval_files", "give task files inline or as an artifact "
                                        "(lm_eval_task_files), not both")
        if inline_files:
            task_files = lm_eval_tasks.load_task_files(inline_files, "spec.suite.lm_eval_files", index)
        elif spec.task_files is not None:
            m = self.artifacts.require(spec.task_files, "spec.suite.lm_eval_task_files", "suite")
            if m.metadata.get("format") != "lm-eval":
                raise FailedPrecondition(f"spec.suite.lm_eval_task_files: {m.id} is a "
                                         f"{m.metadata.get('format', '?')} suite, not lm-eval task files")
            task_files = lm_eval_tasks.load_task_files({f.path: self.artifacts.read_file(m.id, f.path) for f in m.files},
                                                 m.id, index)
            spec = spec.model_copy(update={"task_files": m.ref()})
        resolved = lm_eval_tasks.resolve(spec.tasks, task_files, index)
        hub = [r.name for r in resolved if r.hub]
        if hub and not self.settings.lm_eval_hub:
            raise FailedPrecondition(f"spec.suite.lm_eval_tasks: {', '.join(hub)} need the Hugging Face hub (a "
                                     "standard task's dataset, or a hub dataset or metric in the task files), "
                                     "which this deployment's eval workers cannot reach (TUNERY_EVALUATION_LM_EVAL_HUB"
                                     "=false); give local task files with the data instead")
        if target.kind in ("endpoint", "deployment"):
            scored = [r.name for r in resolved if r.output_types & lm_eval_tasks.LOGLIKELIHOOD_TYPES]
            if scored and not self._endpoint_tokenizes(target.endpoint.base_url, target.endpoint.api_key_env):
                raise FailedPrecondition(
                    f"spec.suite.lm_eval_tasks: {', '.join(scored)} score log-likelihoods over the model's own "
                    f"tokens, and {target.endpoint.base_url} serves no tokenizer (/tokenize and /tokenizer_info; "
                    "vLLM serves them with --enable-tokenizer-info-endpoint); run generate_until tasks only")
        return spec.model_copy(update={
            "tasks": [r.name for r in resolved], "sources": {r.name: r.source for r in resolved},
            "output_types": {r.name: sorted(r.output_types) for r in resolved}, "hub": bool(hub)}), task_files

    def _endpoint_tokenizes(self, base_url: str, api_key_env: str) -> bool:
        """Whether the endpoint serves its tokenizer the way lm-eval's remote tokenizer asks for it."""
        import requests

        root, headers = base_url.rstrip("/").removesuffix("/v1"), self._endpoint_headers(api_key_env)
        timeout = self.settings.endpoint_check_timeout_s
        try:
            info = requests.get(f"{root}/tokenizer_info", headers=headers, timeout=timeout)
            tok = requests.post(f"{root}/tokenize", json={"prompt": "test", "add_special_tokens": False},
                                headers=headers, timeout=timeout)
            return info.ok and tok.ok and isinstance(tok.json().get("tokens"), list)
        except (requests.RequestException, ValueError):
            return False

    def _template_has_tools(self, model: Manifest) -> bool:
        for path in ("chat_template.jinja", "tokenizer_config.json"):
            if path in {f.path for f in model.files}:
                if "tools" in self.artifacts.read_file(model.id, path).decode(errors="replace"):
                    return True
        return False

    def _validate(self, spec: EvalJobSpec, inline: InlineSuite) -> EvalJobSpec:
        target, model = self._target(spec.target)
        default = (f"{model.name}-" if model is not None else "endpoint-") + target.kind
        name = validate_name(spec.name or default, "spec.name")
        suite = self._suite(spec.suite, inline, target, model)  # last: it stores inline suites
        return spec.model_copy(update={"target": target, "suite": suite, "name": name})

    async def submit(self, spec: EvalJobSpec, inline: InlineSuite, options: SubmitOptions) -> JobRecord:
        """Validate and queue; `inline`: the suite sources the request carries."""
        return await self.jobs.submit("evaluation.run", "serve", lambda: self._validate(spec, inline), options,
                                      Resources(cpus=self.settings.eval_cpus))

    # ------------------------------------------------------------------ reports
    def _report(self, ref: ArtifactRef, field: str) -> tuple[Manifest, dict[str, Any]]:
        if not ref.uri:
            raise InvalidArgument.field(field, "is required (an eval report artifact)")
        m = self.artifacts.resolve(ref)
        if m.kind != "report" or m.metadata.get("report") != "eval":
            raise FailedPrecondition(f"{field}: {m.id} is not an eval report")
        return m, json.loads(self.artifacts.read_file(m.id, "report.json"))

    async def report(self, ref: ArtifactRef) -> tuple[Manifest, dict[str, Any]]:
        return await asyncio.to_thread(self._report, ref, "report")

    def _compare(self, baseline: ArtifactRef, candidate: ArtifactRef, prompting: ArtifactRef | None,
                 gates: scoring.Gates | None, allow_uncontrolled: bool, forms: FormComparison | None = None
                 ) -> tuple[scoring.Comparison, Manifest]:
        from services.evaluation.html import comparison_html

        bm, b = self._report(baseline, "baseline")
        cm, c = self._report(candidate, "candidate")
        pm, p = self._report(prompting, "prompting_baseline") if prompting and prompting.uri else (None, None)
        if forms is not None:
            if p is not None or gates is not None or allow_uncontrolled:
                raise InvalidArgument("a form comparison takes max_form_drop_points only: no prompting baseline, "
                                      "no adapter gates, no allow_uncontrolled")
            self._one_model(bm, cm)
            try:
                result = scoring.compare_forms(b, c, max_drop_points=forms.max_drop_points)
            except scoring.UncontrolledComparison as e:
                raise FailedPrecondition("two forms may differ only in precision, quantization and engine; these "
                                         "differ too: " + "; ".join(e.mismatches)
                                         + " (run the same suite with the same sampling on both forms)") from None
        else:
            try:
                result = scoring.compare(b, c, gates=gates, prompting=p, allow_uncontrolled=allow_uncontrolled)
            except scoring.UncontrolledComparison as e:
                raise FailedPrecondition("the reports were not produced under the same controls: "
                                         + "; ".join(e.mismatches)
                                         + " (compare runs of one engine, precision, sampling and suite, or set "
                                         "allow_uncontrolled to compare anyway, stamped uncontrolled; two forms of "
                                         "one model: a form comparison)") from None
        body = {"baseline": bm.uri, "candidate": cm.uri, "prompting_baseline": pm.uri if pm else "",
                "gates": ({"max_form_drop_points": forms.max_drop_points} if forms else (gates or scoring.Gates()).__dict__),
                **result.as_dict()}
        w = self.artifacts.writer("report", f"{cm.name}-vs-{bm.name}"[:90].rstrip("-."),
                                  parents=[bm.ref(), cm.ref(), *([pm.ref()] if pm else [])])
        w.add_bytes(json.dumps(body, indent=1, default=str).encode(), "comparison.json")
        w.add_bytes(comparison_html(body, b, c, p).encode(), "comparison.html")
        manifest, _ = w.commit({"report": "eval-comparison", "verdict": result.verdict,
                                "uncontrolled": result.uncontrolled},
                               {f"delta_{k}": v for k, v in result.block_deltas.items()})
        return result, manifest

    def _one_model(self, bm: Manifest, cm: Manifest) -> None:
        """Both reports are of one model in two forms: one's model is in the other's lineage (merged -> quantized)."""
        def model_of(report: Manifest) -> str:
            return self.artifacts.parse_id(report.parents[0].uri) if report.parents else ""

        a, b = model_of(bm), model_of(cm)
        if not a or not b:
            raise FailedPrecondition("a form comparison needs two reports of model targets (an endpoint's has no model)")
        lineage_b = {m.id for m in self.artifacts.lineage(b, max_depth=4)}
        lineage_a = {m.id for m in self.artifacts.lineage(a, max_depth=4)}
        if a not in lineage_b and b not in lineage_a:
            raise FailedPrecondition(f"{a} and {b} are not two forms of one model (neither is in the other's "
                                     "lineage); compare a model with its quantization, or use a plain comparison")

    async def compare(self, baseline: ArtifactRef, candidate: ArtifactRef, prompting: ArtifactRef | None = None,
                      gates: scoring.Gates | None = None, allow_uncontrolled: bool = False,
                      forms: FormComparison | None = None):
        return await asyncio.to_thread(self._compare, baseline, candidate, prompting, gates, allow_uncontrolled, forms)

    # ------------------------------------------------------------------ blind A/B
    def _save_arena(self, a_ref: ArtifactRef, b_ref: ArtifactRef, votes: list[dict], name: str,
                    voter: str) -> tuple[dict[str, Any], Manifest]:
        import math

        from services.core.errors import FieldViolation, check
        from services.core.keys import validate_name
        from services.evaluation.arena import CHOICES, arena_html, pairs, result_body

        am, a = self._report(a_ref, "report_a")
        bm, b = self._report(b_ref, "report_b")
        if am.id == bm.id:
            raise InvalidArgument.field("report_b", "is report_a: vote between two different reports")
        shown, identical = pairs(a, b)
        known = {p.test_id for p in shown}
        problems, seen = [], set()
        if not votes:
            problems.append(FieldViolation("votes", "no votes: vote on at least one pair"))
        for i, v in enumerate(votes):
            if v["choice"] not in CHOICES:
                problems.append(FieldViolation(f"votes[{i}].choice", f"one of {', '.join(CHOICES)}"))
            if v["test_id"] not in known:
                problems.append(FieldViolation(f"votes[{i}].test_id", f"{v['test_id'][:80]!r} is not a test both "
                                               "reports answered with different outputs"))
            elif v["test_id"] in seen:
                problems.append(FieldViolation(f"votes[{i}].test_id", f"{v['test_id'][:80]!r} is voted on twice"))
            seen.add(v["test_id"])
            if not (math.isfinite(v["seconds"]) and v["seconds"] >= 0):
                problems.append(FieldViolation(f"votes[{i}].seconds", "must be ≥ 0"))
        check(problems)
        name = validate_name(name or f"arena-{bm.name}-vs-{am.name}"[:90].rstrip("-."), "name")
        body = result_body(name, am.uri, bm.uri, votes, identical, voter[:200])
        w = self.artifacts.writer("report", name, parents=[am.ref(), bm.ref()])
        w.add_bytes(json.dumps(body, indent=1).encode(), "arena.json")
        w.add_bytes(arena_html(body).encode(), "arena.html")
        manifest, _ = w.commit({"report": "arena", "report_a": am.uri, "report_b": bm.uri},
                               {k: float(v) for k, v in body["tally"].items()})
        return body, manifest

    async def save_arena(self, a_ref: ArtifactRef, b_ref: ArtifactRef, votes: list[dict], name: str = "",
                         voter: str = "") -> tuple[dict[str, Any], Manifest]:
        return await asyncio.to_thread(self._save_arena, a_ref, b_ref, votes, name, voter)

