"""Serving service logic and settings: check a deployment request against the store, record it, hand it to a
serving job (which deploys it as a Ray Serve application); read deployments back with Serve as the live source.
No grpc.

Refused before anything is written:
- INVALID_ARGUMENT: a bad name, an adapter name used twice or equal to the base's, an unknown tool-call parser, a max
  LoRA rank vLLM does not take, more adapters than max_loras;
- FAILED_PRECONDITION: an adapter trained on another base (its lineage names the base by sha256) or another
  architecture; an adapter whose rank is above max_lora_rank; LoRA adapters over a quantized model (vLLM has open
  bugs on LoRA over quantized bases: serve the adapter on the full-precision base, or merge it and quantize that);
- ALREADY_EXISTS: a name taken by a deployment with another spec (the same spec answers with its job);
- NOT_FOUND: an artifact or a deployment that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from pydantic import Field

from services.core.artifacts import ArtifactStore, Manifest
from services.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRunner, JobState, Resources, SubmitOptions, check_resources
from services.core.keys import validate_name
from services.core.settings import ServiceSettings, port_field
from services.core.vllm import engine_dtype, lora_rank_bucket
from services.serving.records import DeploymentRecords
from services.serving.spec import DEFAULT_MAX_LORAS, DeploymentRecord, DeploymentSpec, LoraModule, ServeJobSpec

# Serve's application status -> the deployment's state
LIVE_STATES = {"RUNNING": "READY", "DEPLOYING": "STARTING", "NOT_STARTED": "STARTING", "DEPLOY_FAILED": "FAILED",
               "UNHEALTHY": "FAILED", "DELETING": "STOPPED"}
METRICS = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_cache_usage", "vllm:request_success_total": "requests",
           "vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generation_tokens"}


class ServingSettings(ServiceSettings):
    service: str = "serving"
    port: int = port_field("serving")
    serve_http_host: str = Field("127.0.0.1", description="where Ray Serve's HTTP proxy listens (0.0.0.0 in "
                                 "containers); set once, when Serve first starts on the cluster")
    serve_http_port: int = Field(8000, ge=1, le=65535, description="Ray Serve's HTTP port")
    serve_public_url: str = Field("", description="how clients reach Serve's proxy (a load balancer, an ingress); "
                                  "empty: http://<serve_http_host>:<serve_http_port>")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs a replica asks Ray for (options.resources overrides)")
    startup_timeout_s: float = Field(900.0, gt=0, description="how long a deployment may take to be READY")
    delete_timeout_s: float = Field(120.0, gt=0)


@dataclass
class Live:
    state: str
    message: str


class ServingService:
    SERVICE = "serving"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: ServingSettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)
        self.records = DeploymentRecords(artifacts)

    # ------------------------------------------------------------------ create / change / delete
    async def create(self, spec: DeploymentSpec, options: SubmitOptions) -> JobRecord:
        if options.resources is not None:
            check_resources(options.resources)  # a replica's resources: NaN, negatives, absurd sizes refused
        resources = options.resources or Resources(cpus=self.settings.replica_cpus)
        existing: list[JobRecord] = []

        def check() -> ServeJobSpec:
            job_spec = self._check(spec, resources)
            record = self.records.get(job_spec.deployment.name)
            if record is not None and record.state != "STOPPED":
                if record.spec == job_spec.deployment and record.job_id:
                    existing.append(self.runner.get(record.job_id))
                    return job_spec
                raise AlreadyExists(f"spec.name: a deployment named {record.name} exists ({record.state}) with "
                                    "another spec; delete it first, or pick another name")
            now = time.time()
            self.records.put(DeploymentRecord(name=job_spec.deployment.name, spec=job_spec.deployment,
                                              api_key=secrets.token_urlsafe(24), created_at=now, updated_at=now,
                                              base_url=job_spec.base_url))
            return job_spec

        job_spec = await asyncio.to_thread(check)
        if existing:
            return existing[0]
        job = await self._submit("serving.deploy", job_spec, options)
        await asyncio.to_thread(self._set_job, job_spec.deployment.name, job.id)
        return job

    async def add_adapter(self, name: str, module: LoraModule, options: SubmitOptions) -> JobRecord:
        def change() -> ServeJobSpec:
            record = self._running(name)
            if module.name in record.spec.adapter_names():
                raise AlreadyExists(f"adapter.name: {name} already serves an adapter named {module.name}; remove it "
                                    "first, or pick another name")
            spec = record.spec.model_copy(update={"adapters": [*record.spec.adapters, module]})
            return self._check(spec, None, pinned=record.spec)

        return await self._change(name, change, options)

    async def remove_adapter(self, name: str, adapter_name: str, options: SubmitOptions) -> JobRecord:
        def change() -> ServeJobSpec:
            record = self._running(name)
            if adapter_name not in record.spec.adapter_names():
                raise NotFound(f"name: {name} serves no adapter named {adapter_name!r} (it serves "
                               f"{', '.join(record.spec.adapter_names()) or 'none'})")
            spec = record.spec.model_copy(update={"adapters": [a for a in record.spec.adapters
                                                               if a.name != adapter_name]})
            return self._job_spec(spec)

        return await self._change(name, change, options)

    async def _change(self, name: str, change, options: SubmitOptions) -> JobRecord:
        job_spec = await asyncio.to_thread(change)
        job = await self._submit("serving.adapters", job_spec, options)
        await asyncio.to_thread(self._set_job, name, job.id, job_spec.deployment)
        return job

    async def delete(self, name: str) -> DeploymentRecord:
        record = await asyncio.to_thread(self._record, name)
        if record.state == "STOPPED":
            return record
        if record.job_id:  # a deployment still starting (a replica no node can place, say): its job stops too
            last = await asyncio.to_thread(self.runner.get, record.job_id, with_spec=False)
            if not last.state.is_terminal():
                await asyncio.to_thread(self.runner.cancel, record.job_id, f"deployment {name} deleted")
        job = await self._submit("serving.delete", self._job_spec(record.spec), SubmitOptions())
        final = await asyncio.to_thread(self._wait, job.id, self.settings.delete_timeout_s)
        if final.state != JobState.SUCCEEDED:
            raise Unavailable(f"deleting {name} did not finish: job {job.id} is {final.state.value} "
                              f"({final.state_reason}); try again")
        return await asyncio.to_thread(self._record, name)

    # ------------------------------------------------------------------ read
    def get(self, name: str, with_metrics: bool = False) -> tuple[DeploymentRecord, dict[str, float]]:
        record = self._record(name)
        live = self._live().get(name)
        record = self._with_live(record, live)
        metrics = self.metrics(record) if with_metrics and record.state == "READY" else {}
        return record, metrics

    def list(self, page_size: int, after: str) -> tuple[list[DeploymentRecord], str]:
        names = self.records.names(after)
        live = self._live()
        page = names[:page_size]
        out = [self._with_live(r, live.get(n)) for n in page if (r := self.records.get(n)) is not None]
        return out, (page[-1] if len(names) > page_size else "")

    def metrics(self, record: DeploymentRecord) -> dict[str, float]:
        """vLLM's Prometheus figures through the deployment's URL (one replica's: Serve picks it)."""
        url = record.base_url.removesuffix("/v1") + "/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except (OSError, ValueError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, _, value = line.rpartition(" ")
            metric = series.split("{", 1)[0]
            if metric in METRICS:
                try:
                    out[METRICS[metric]] = out.get(METRICS[metric], 0.0) + float(value)
                except ValueError:
                    pass
        return out

    # ------------------------------------------------------------------ checks
    def _check(self, spec: DeploymentSpec, resources: Resources | None,
               pinned: DeploymentSpec | None = None) -> ServeJobSpec:
        model = self.artifacts.require(spec.model, "spec.model", "model")
        if model.metadata.get("format") == "gguf":
            raise FailedPrecondition(f"spec.model: {model.id} is a GGUF file: vLLM serves the safetensors forms; "
                                     "run this one with its Modelfile (`ollama create NAME -f Modelfile`) or "
                                     "`llama-server -m FILE`")
        name = validate_name(spec.name or model.name, "spec.name")  # default: the model's name
        adapters = []
        seen = {model.name}
        for i, module in enumerate(spec.adapters):
            field = f"spec.adapters[{i}]"
            validate_name(module.name, f"{field}.name")
            if module.name in seen:
                raise InvalidArgument.field(f"{field}.name", f"{module.name!r} is already the name of the base or "
                                            "of another adapter; every model a deployment serves needs its own name")
            seen.add(module.name)
            manifest = self.artifacts.require(module.adapter, f"{field}.adapter", "adapter")
            self._check_adapter(field, manifest, model)
            adapters.append((module.name, manifest))
        if pinned is not None:  # a change to a running deployment: its engine's limits stay
            max_loras, max_rank = pinned.max_loras, pinned.max_lora_rank
        else:
            max_loras = spec.max_loras or max(DEFAULT_MAX_LORAS, len(adapters))
            ranks = [int(m.metadata.get("rank") or 0) for _, m in adapters]
            max_rank = spec.max_lora_rank or lora_rank_bucket(max([16, *ranks]))
        if len(adapters) > max_loras:
            raise InvalidArgument.field("spec.adapters", f"{len(adapters)} adapters, above max_loras {max_loras}"
                                        + ("" if pinned is None else " of the running deployment (delete and create "
                                           "it with a larger max_loras)"))
        for i, (aname, manifest) in enumerate(adapters):
            rank = int(manifest.metadata.get("rank") or 0)
            if rank > max_rank:
                raise FailedPrecondition(f"spec.adapters[{i}]: {aname} ({manifest.id}) has rank {rank}, above the "
                                         f"deployment's max_lora_rank {max_rank}; "
                                         + ("create the deployment with a larger max_lora_rank" if pinned else
                                            f"set max_lora_rank to {lora_rank_bucket(rank)} or more"))
        if adapters and (model.metadata.get("form") == "quantized" or model.metadata.get("quantization")):
            raise FailedPrecondition(
                f"spec.adapters: {model.id} is quantized ({model.metadata.get('quantization') or 'form quantized'}) "
                "and vLLM has open bugs on LoRA over quantized bases; serve the adapters on the full-precision base, "
                "or merge the adapter and serve its quantized merge")
        quantization = str(model.metadata.get("quantization") or "")
        resolved = spec.model_copy(update={
            "name": name, "model": model.ref(), "served_name": model.name, "quantization": quantization,
            "adapters": [LoraModule(name=n, adapter=m.ref()) for n, m in adapters],
            "max_loras": max_loras, "max_lora_rank": max_rank})
        if pinned is not None:
            resolved = pinned.model_copy(update={"adapters": resolved.adapters})
        elif resources is not None:
            device = "cuda" if resources.gpus > 0 else "cpu"
            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(spec.dtype) or \
                engine_dtype(device, bool(quantization))  # the precision an eval job's own engine runs at
            custom = dict(resources.custom) | ({"tunery_serve": 0.001} if self.settings.role_resources else {})
            resolved = resolved.model_copy(update={
                "cpus_per_replica": resources.cpus, "device": device, "engine_dtype": dtype,
                "replica_resources": custom,
                "tensor_parallel_size": max(spec.tensor_parallel_size, int(resources.gpus) or 1)})
        return self._job_spec(resolved)

    @staticmethod
    def _check_adapter(field: str, adapter: Manifest, model: Manifest) -> None:
        md, amd = model.metadata, adapter.metadata
        arch, trained_arch = md.get("architecture", ""), amd.get("base_architecture", "")
        if arch and trained_arch and arch != trained_arch:
            raise FailedPrecondition(f"{field}.adapter: {adapter.id} was trained on a {trained_arch}, and {model.id} "
                                     f"is a {arch}; serve it on the base it was trained on")
        trained_on = adapter.parents[0] if adapter.parents else None
        # a quantized model is refused with its adapters below; its lineage's base is the adapter's base
        bases = {model.sha256} | {p.sha256 for p in model.parents[:1]
                                  if md.get("form") == "quantized" or md.get("quantization")}
        if trained_on is not None and trained_on.sha256 and trained_on.sha256 not in bases:
            raise FailedPrecondition(f"{field}.adapter: {adapter.id} was trained on {trained_on.uri} (sha256 "
                                     f"{trained_on.sha256[:12]}…), not on {model.uri} (sha256 {model.sha256[:12]}…); "
                                     "serve it on the base it was trained on")

    def _job_spec(self, d: DeploymentSpec) -> ServeJobSpec:
        s = self.settings
        return ServeJobSpec(action="deploy", deployment=d, http_host=s.serve_http_host, http_port=s.serve_http_port,
                            public_url=s.serve_public_url, startup_timeout_s=s.startup_timeout_s)

    # ------------------------------------------------------------------ helpers
    async def _submit(self, kind: str, job_spec: ServeJobSpec, options: SubmitOptions) -> JobRecord:
        job_spec = job_spec.model_copy(update={"action": kind.split(".")[1]})
        # the job only drives Serve: a sliver of a CPU; the replicas ask for their own resources
        return await self.jobs.submit(kind, "control", lambda: job_spec,
                                      options.model_copy(update={"resources": None}), Resources(cpus=0.1))

    def _record(self, name: str) -> DeploymentRecord:
        validate_name(name, "name")
        record = self.records.get(name)
        if record is None:
            raise NotFound(f"no deployment named {name} in project {self.artifacts.project}")
        return record

    def _running(self, name: str) -> DeploymentRecord:
        record, _ = self.get(name)
        if record.state != "READY":
            raise FailedPrecondition(f"{name} is {record.state}{': ' + record.message if record.message else ''}; "
                                     "adapters change on a READY deployment")
        return record

    def _set_job(self, name: str, job_id: str, spec: DeploymentSpec | None = None) -> None:
        record = self.records.get(name)
        if record is not None:
            update = {"job_id": job_id, "updated_at": time.time()}
            if spec is not None:
                update |= {"spec": spec, "state": "STARTING"}
            self.records.put(record.model_copy(update=update))

    def _wait(self, job_id: str, timeout: float) -> JobRecord:
        deadline = time.monotonic() + timeout
        while True:
            job = self.runner.get(job_id, with_spec=False)
            if job.state.is_terminal() or time.monotonic() > deadline:
                return job
            time.sleep(0.5)

    def _live(self) -> dict[str, Live]:
        """Serve's applications on the cluster (the dashboard's REST API); {} when Serve is not running there."""
        url = self.settings.ray_address.rstrip("/") + "/api/serve/applications/"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError:
            return {}
        except (OSError, ValueError) as e:
            raise Unavailable(f"Ray's dashboard at {self.settings.ray_address} did not answer: {e}") from e
        out = {}
        for name, app in (body.get("applications") or {}).items():
            messages = [app.get("message") or ""] + [d.get("message") or "" for d in
                                                     (app.get("deployments") or {}).values()]
            out[name] = Live(LIVE_STATES.get(app.get("status", ""), "STARTING"),
                             "; ".join(m for m in messages if m))
        return out

    def _with_live(self, record: DeploymentRecord, live: Live | None) -> DeploymentRecord:
        if live is None:
            if record.state in ("READY", "STARTING") and record.job_id:
                job = self.runner.get(record.job_id, with_spec=False)
                if job.state.is_terminal() and record.state == "READY":
                    return record.model_copy(update={"state": "FAILED", "message": "its Serve application is gone "
                                                     "from the cluster (a restarted cluster?); create it again"})
                if job.state.is_terminal() and job.state != JobState.SUCCEEDED:
                    return record.model_copy(update={"state": "FAILED", "message": job.state_reason})
            return record
        if record.state == "STOPPED":
            return record
        if live.state == "READY" and record.state == "STARTING":
            return record  # an adapter change: READY once its job has reconfigured every replica
        return record.model_copy(update={"state": live.state, "message": live.message if live.state != "READY"
                                         else ""})
