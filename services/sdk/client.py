"""The typed Python SDK: wraps the generated stubs, attaches the bearer token, resumes watches.

    with TuneryClient("127.0.0.1:50051", token=...) as c:
        job = c.import_model("/models/llama", name="llama")
        for ev in c.watch(job.id):
            print(ev.text)
        job = c.wait(job.id)

The CLI is built on it. Methods return the generated message types (typed by mypy-protobuf stubs).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from services.core.settings import default_endpoints, tunery_home
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import (
    datagen_pb2,
    datagen_pb2_grpc,
    evaluation_pb2,
    evaluation_pb2_grpc,
    merging_pb2,
    merging_pb2_grpc,
    pipeline_pb2,
    pipeline_pb2_grpc,
    quantization_pb2,
    quantization_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    serving_pb2,
    serving_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)


URL = re.compile(r"^[a-z][a-z0-9+.-]*://")
Progress = Callable[[int, int], None]   # (bytes done, bytes in all)
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def default_token() -> str:
    if os.environ.get("TUNERY_TOKEN"):
        return os.environ["TUNERY_TOKEN"]
    path = tunery_home() / "token"
    return path.read_text().strip() if path.exists() else ""


def training_spec(d: dict | training_pb2.TrainingSpec) -> training_pb2.TrainingSpec:
    """A training spec from its YAML/dict form (services/training/recipes/*.yaml): plain words for the enums
    (method: qlora, lora.preset: attention, precision: bf16, strategy: fsdp), artifact ids for the refs."""
    from google.protobuf import json_format

    if isinstance(d, training_pb2.TrainingSpec):
        return d
    d = {k: v for k, v in d.items() if v is not None}
    enums = {"method": ("FINETUNE_METHOD_", d.pop("method", "")), "precision": ("PRECISION_", d.pop("precision", "")),
             "strategy": ("DISTRIBUTED_STRATEGY_", d.pop("strategy", ""))}
    lora = dict(d.pop("lora", None) or {})
    qlora = dict(d.pop("qlora", None) or {})
    preset = str(lora.pop("preset", "") or "").replace("-", "_")
    compute = qlora.pop("compute_dtype", "")
    refs = {k: d.pop(k) for k in ("base_model", "dataset") if d.get(k)}
    spec = json_format.ParseDict({**d, "lora": lora, "qlora": qlora}, training_pb2.TrainingSpec())
    for k, uri in refs.items():
        getattr(spec, k).CopyFrom(ref(uri))
    for field, (prefix, word) in enums.items():
        if word:
            setattr(spec, field, prefix + str(word).upper())
    if preset:
        spec.lora.preset = "TARGET_MODULES_PRESET_" + preset.upper()
    if compute:
        spec.qlora.compute_dtype = "PRECISION_" + str(compute).upper()
    if not lora and not preset:
        spec.ClearField("lora")
    if not qlora and not compute:
        spec.ClearField("qlora")
    return spec


def ref(artifact: str) -> pb.ArtifactRef:
    """An artifact id or tunery:// uri as a reference."""
    return pb.ArtifactRef(uri=artifact)


# DeleteDeployment's deadline: above the serving service's own wait for its delete job (delete_timeout_s, 120 s)
DELETE_DEPLOYMENT_TIMEOUT_S = 180.0


class TuneryClient:
    """`target` is the registry's address; `endpoints` (or TUNERY_<SERVICE>_ADDR) name the other services'."""

    def __init__(self, target: str = "", token: str | None = None, *, endpoints: dict[str, str] | None = None,
                 timeout: float = 30.0):
        self.endpoints = default_endpoints()
        self.endpoints.update(endpoints or {})
        if target:
            self.endpoints["registry"] = target
        self.target = self.endpoints["registry"]
        self.token = default_token() if token is None else token
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}
        self.channel = self._channel("registry")
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.datagen = datagen_pb2_grpc.DatagenServiceStub(self._channel("datagen"))
        self.training = training_pb2_grpc.TrainingServiceStub(self._channel("training"))
        self.evaluation = evaluation_pb2_grpc.EvaluationServiceStub(self._channel("evaluation"))
        self.merging = merging_pb2_grpc.MergingServiceStub(self._channel("merging"))
        self.quantization = quantization_pb2_grpc.QuantizationServiceStub(self._channel("quantization"))
        self.serving = serving_pb2_grpc.ServingServiceStub(self._channel("serving"))
        self.pipeline = pipeline_pb2_grpc.PipelineServiceStub(self._channel("pipeline"))

    def _channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.insecure_channel(self.endpoints[service])
        return self._channels[service]

    def __enter__(self) -> "TuneryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _call(self, method, request, timeout: float | None = None):
        return method(request, metadata=self.metadata, timeout=timeout or self.timeout)

    def call(self, method, request, timeout: float | None = None):
        """Any RPC of the stubs above with this client's token, e.g. `c.call(c.merging.SubmitMerge, request)`:
        for a caller that builds whole specs itself (the pipeline job)."""
        return self._call(method, request, timeout)

    # ------------------------------------------------------------------ registry
    @staticmethod
    def _options(key: str, options: pb.SubmitOptions | None) -> pb.SubmitOptions:
        opts = pb.SubmitOptions()
        if options is not None:
            opts.CopyFrom(options)
        if key:
            opts.idempotency_key = key
        return opts

    def import_model(self, source: str, name: str, *, key: str = "", allow_trust_remote_code: bool = False,
                     revision: str = "", options: pb.SubmitOptions | None = None, upload: bool | None = None,
                     progress: Progress | None = None) -> pb.Job:
        """`source`: a model folder on this machine (uploaded: `upload=None` does so whenever the path exists
        here; `upload=False` sends it as a path on the services' host), upload://…, s3://…, or hf://org/name."""
        source, origin = self._uploaded(source, upload, progress)
        spec = registry_pb2.ImportModelSpec(source=source, name=name, revision=revision, uploaded_from=origin,
                                            allow_trust_remote_code=allow_trust_remote_code)
        return self._call(self.registry.ImportModel,
                          registry_pb2.ImportModelRequest(spec=spec, options=self._options(key, options)))

    def import_dataset(self, source: str, name: str, *, key: str = "", format: int = 0,
                       options: pb.SubmitOptions | None = None, upload: bool | None = None,
                       progress: Progress | None = None) -> pb.Job:
        """`source`: a file on this machine (uploaded, as for import_model), upload://…, s3://… or https://…."""
        source, origin = self._uploaded(source, upload, progress)
        spec = registry_pb2.ImportDatasetSpec(source=source, name=name, format=format, uploaded_from=origin)
        return self._call(self.registry.ImportDataset,
                          registry_pb2.ImportDatasetRequest(spec=spec, options=self._options(key, options)))

    # ------------------------------------------------------------------ uploads
    def _uploaded(self, source: str, upload: bool | None, progress: Progress | None) -> tuple[str, str]:
        """(what the import names, the client path it came from): a local path becomes its upload."""
        local = not URL.match(source) and os.path.exists(source)
        if upload is None:
            upload = local
        if not upload:
            return source, ""
        if not local:
            raise FileNotFoundError(f"{source}: no such file or folder on this machine to upload")
        return self.upload(source, progress), os.path.abspath(source)

    def upload(self, path: str | Path, progress: Progress | None = None) -> str:
        """Send a file or a folder (its files, dotfiles left out) to the store; returns the upload:// uri an
        import names. Blobs already stored are not sent again; a dropped connection resumes where it broke."""
        from services.core.artifacts import FileEntry, sha256_file
        from services.core.uploads import listing_bytes, upload_uri

        root = Path(path)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(root).parts))
            if not files:
                raise FileNotFoundError(f"{root}: the folder holds no files to upload")
        else:
            root, files = root.parent, [root]
        total = sum(f.stat().st_size for f in files)
        entries, done = [], 0
        for f in files:
            entry = FileEntry(path=f.relative_to(root).as_posix(), size=f.stat().st_size, sha256=sha256_file(f))
            self.upload_file(f, entry.sha256, entry.size,
                             (lambda d, t, base=done: progress(base + d, total)) if progress else None)
            done += entry.size
            entries.append(entry)
        listing = listing_bytes(entries)
        import hashlib
        import tempfile

        with tempfile.NamedTemporaryFile(prefix="tunery-listing-") as tmp:
            tmp.write(listing)
            tmp.flush()
            sha = hashlib.sha256(listing).hexdigest()
            self.upload_file(Path(tmp.name), sha, len(listing))
        return upload_uri(sha)

    def upload_file(self, path: Path, sha256: str, size: int, progress: Progress | None = None,
                    chunk: int = 1 << 20, attempts: int = 5) -> registry_pb2.UploadStatus:
        """One file's bytes: asks what the store holds (StatUpload), streams the rest, resumes after a broken
        stream (up to `attempts` streams)."""
        for attempt in range(attempts):
            st = self._call(self.registry.StatUpload, registry_pb2.StatUploadRequest(sha256=sha256, size=size))
            if progress:
                progress(st.received_bytes, size)
            if st.stored:
                return st

            def chunks(offset: int = st.received_bytes):
                with open(path, "rb") as f:
                    f.seek(offset)
                    first = True
                    while first or offset < size:
                        data = f.read(chunk)
                        yield registry_pb2.UploadChunk(sha256=sha256, size=size, offset=offset, data=data)
                        offset += len(data)
                        first = False
                        if progress:
                            progress(offset, size)
                        if not data:
                            return

            try:
                st = self.registry.UploadFile(chunks(), metadata=self.metadata, timeout=max(600.0, size / 1e6))
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == attempts - 1:
                    raise
                time.sleep(min(2 ** attempt, 10))
                continue
            if st.stored:
                return st
        raise IOError(f"{path}: the upload did not complete after {attempts} streams")

    def list_artifacts(self, kind: int = 0, name: str = "", page_size: int = 100) -> Iterator[pb.Artifact]:
        token = ""
        while True:
            resp = self._call(self.registry.ListArtifacts, registry_pb2.ListArtifactsRequest(
                kind=kind, name=name, page_size=page_size, page_token=token))
            yield from resp.artifacts
            token = resp.next_page_token
            if not token:
                return

    def get_artifact(self, artifact_id: str) -> pb.Artifact:
        return self._call(self.registry.GetArtifact, registry_pb2.GetArtifactRequest(id=artifact_id))

    def lineage(self, artifact_id: str, max_depth: int = 0) -> list[pb.Artifact]:
        return list(self._call(self.registry.GetLineage,
                               registry_pb2.GetLineageRequest(id=artifact_id, max_depth=max_depth)).artifacts)

    def download(self, artifact_id: str, path: str, dest: Path) -> Path:
        """Save one file of an artifact to `dest`, checking its sha256."""
        import hashlib

        h, want = hashlib.sha256(), ""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with open(tmp, "wb") as f:
            for chunk in self.registry.DownloadFile(registry_pb2.DownloadFileRequest(id=artifact_id, path=path),
                                                    metadata=self.metadata, timeout=600):
                f.write(chunk.data)
                h.update(chunk.data)
                want = chunk.sha256
        if want and h.hexdigest() != want:
            tmp.unlink()
            raise IOError(f"{artifact_id}/{path}: received bytes do not match sha256 {want}")
        tmp.replace(dest)
        return dest

    def delete_artifact(self, artifact_id: str) -> str:
        return self._call(self.registry.DeleteArtifact, registry_pb2.DeleteArtifactRequest(id=artifact_id)).id

    # ------------------------------------------------------------------ data
    def prepare_dataset(self, dataset: str, base_model: str, *, name: str = "", holdout: float | None = None,
                        dedup: int = 0, max_tokens: int = 0, seed: int = 0, min_examples: int = 0,
                        stratify_field: str = "", key: str = "", options: pb.SubmitOptions | None = None) -> pb.Job:
        spec = datagen_pb2.PrepareDatasetSpec(dataset=ref(dataset), base_model=ref(base_model), name=name,
                                              holdout_fraction=holdout, dedup=dedup, max_tokens=max_tokens, seed=seed,
                                              min_examples=min_examples, stratify_field=stratify_field)
        return self._call(self.datagen.PrepareDataset,
                          datagen_pb2.PrepareDatasetRequest(spec=spec, options=self._options(key, options)))

    def generate_dataset(self, recipe_yaml: str, *, teacher: str = "", endpoint: pb.OpenAIEndpoint | None = None,
                         name: str = "", num_examples: int = 0, key: str = "",
                         options: pb.SubmitOptions | None = None) -> pb.Job:
        t = datagen_pb2.TeacherSpec(model=ref(teacher)) if teacher else datagen_pb2.TeacherSpec(endpoint=endpoint)
        spec = datagen_pb2.GenerateDatasetSpec(recipe_yaml=recipe_yaml, teacher=t, name=name, num_examples=num_examples)
        return self._call(self.datagen.GenerateDataset,
                          datagen_pb2.GenerateDatasetRequest(spec=spec, options=self._options(key, options)))

    def dataset_report(self, dataset: str) -> datagen_pb2.DatasetReport:
        return self._call(self.datagen.GetDatasetReport, datagen_pb2.GetDatasetReportRequest(dataset=ref(dataset)))

    # ------------------------------------------------------------------ training
    def submit_training(self, spec: dict | training_pb2.TrainingSpec, *, key: str = "",
                        options: pb.SubmitOptions | None = None) -> pb.Job:
        return self._call(self.training.SubmitTraining, training_pb2.SubmitTrainingRequest(
            spec=training_spec(spec), options=self._options(key, options)))

    def plan_training(self, spec: dict | training_pb2.TrainingSpec) -> training_pb2.TrainingPlan:
        return self._call(self.training.PlanTraining, training_pb2.PlanTrainingRequest(spec=training_spec(spec)))

    # ------------------------------------------------------------------ evaluation
    def submit_eval(self, target: evaluation_pb2.EvalTarget, suite: evaluation_pb2.EvalSuite, *, name: str = "",
                    sampling: pb.SamplingParams | None = None, with_baseline: bool | None = None, key: str = "",
                    options: pb.SubmitOptions | None = None) -> pb.Job:
        spec = evaluation_pb2.EvalSpec(target=target, suite=suite, name=name, sampling=sampling)
        if with_baseline is not None:
            spec.with_baseline = with_baseline
        return self._call(self.evaluation.SubmitEval,
                          evaluation_pb2.SubmitEvalRequest(spec=spec, options=self._options(key, options)))

    def eval_report(self, report: str) -> evaluation_pb2.EvalReport:
        return self._call(self.evaluation.GetReport, evaluation_pb2.GetReportRequest(report=ref(report)))

    def compare_reports(self, baseline: str, candidate: str, *, prompting_baseline: str = "",
                        gates: evaluation_pb2.Gates | None = None, allow_uncontrolled: bool = False,
                        form_comparison: bool = False,
                        max_form_drop_points: float | None = None) -> evaluation_pb2.Comparison:
        """Baseline vs candidate reports; form_comparison: two forms of one model (only precision, quantization and
        engine may differ), gated on max_form_drop_points (default 2) of any block's tests lost."""
        req = evaluation_pb2.CompareReportsRequest(
            baseline=ref(baseline), candidate=ref(candidate),
            prompting_baseline=ref(prompting_baseline) if prompting_baseline else None, gates=gates,
            allow_uncontrolled=allow_uncontrolled, form_comparison=form_comparison)
        if max_form_drop_points is not None:
            req.max_form_drop_points = max_form_drop_points
        return self._call(self.evaluation.CompareReports, req)

    ARENA_CHOICES = {"a": evaluation_pb2.ARENA_CHOICE_A, "b": evaluation_pb2.ARENA_CHOICE_B,
                     "tie": evaluation_pb2.ARENA_CHOICE_TIE, "both_bad": evaluation_pb2.ARENA_CHOICE_BOTH_BAD}

    def save_arena_votes(self, report_a: str, report_b: str, votes: list[dict], *, name: str = "",
                         voter: str = "") -> evaluation_pb2.ArenaResult:
        """Blind A/B votes ({test_id, choice: a|b|tie|both_bad, a_on_left, seconds}) stored as an arena report."""
        return self._call(self.evaluation.SaveArenaVotes, evaluation_pb2.SaveArenaVotesRequest(
            report_a=ref(report_a), report_b=ref(report_b), name=name, voter=voter,
            votes=[evaluation_pb2.ArenaVote(test_id=v["test_id"], choice=self.ARENA_CHOICES.get(v["choice"], 0),
                                            a_on_left=bool(v.get("a_on_left")), seconds=float(v.get("seconds", 0)))
                   for v in votes]))

    # ------------------------------------------------------------------ merging
    def submit_merge(self, base_model: str, adapter: str, *, output_dtype: int = 0, max_shard_bytes: int = 0,
                     memory_budget_bytes: int = 0, name: str = "", num_probe_prompts: int = 0, key: str = "",
                     options: pb.SubmitOptions | None = None) -> pb.Job:
        """Merge `adapter` into `base_model` (output_dtype: a common_pb2.Precision, default the base's)."""
        spec = merging_pb2.MergeSpec(base_model=ref(base_model), adapter=ref(adapter), output_dtype=output_dtype,
                                     max_shard_bytes=max_shard_bytes, memory_budget_bytes=memory_budget_bytes,
                                     name=name, num_probe_prompts=num_probe_prompts)
        return self._call(self.merging.SubmitMerge,
                          merging_pb2.SubmitMergeRequest(spec=spec, options=self._options(key, options)))

    SCHEMES = {"gptq-w4a16": quantization_pb2.QUANT_SCHEME_GPTQ_W4A16, "awq-w4a16": quantization_pb2.QUANT_SCHEME_AWQ_W4A16,
               "w8a8-int8": quantization_pb2.QUANT_SCHEME_W8A8_INT8, "fp8-dynamic": quantization_pb2.QUANT_SCHEME_FP8_DYNAMIC,
               "gguf-q4_k_m": quantization_pb2.QUANT_SCHEME_GGUF_Q4_K_M, "gguf-q8_0": quantization_pb2.QUANT_SCHEME_GGUF_Q8_0,
               "gguf-f16": quantization_pb2.QUANT_SCHEME_GGUF_F16}

    def quantize_spec(self, model: str, scheme: str | int, *, calibration_dataset: str = "", samples: int = 0,
                      max_seq_len: int = 0, ignore: list[str] | None = None, group_size: int = 0, name: str = "",
                      memory_budget_bytes: int = 0, seed: int = 0) -> quantization_pb2.QuantizeSpec:
        """A QuantizeSpec; `scheme` a name (gptq-w4a16, awq-w4a16, w8a8-int8, fp8-dynamic, gguf-…) or its enum."""
        if isinstance(scheme, str):
            if scheme not in self.SCHEMES:
                raise ValueError(f"unknown scheme {scheme!r}; one of {', '.join(self.SCHEMES)}")
            scheme = self.SCHEMES[scheme]
        return quantization_pb2.QuantizeSpec(
            model=ref(model), scheme=scheme, calibration_dataset=ref(calibration_dataset) if calibration_dataset else None,
            num_calibration_samples=samples, calibration_max_seq_len=max_seq_len, ignore=ignore or [],
            group_size=group_size, name=name, memory_budget_bytes=memory_budget_bytes, seed=seed)

    def submit_quantize(self, model: str, scheme: str | int, *, key: str = "", options: pb.SubmitOptions | None = None,
                        **kw) -> pb.Job:
        """Quantize a full-precision model artifact (see quantize_spec for the options)."""
        return self._call(self.quantization.SubmitQuantize, quantization_pb2.SubmitQuantizeRequest(
            spec=self.quantize_spec(model, scheme, **kw), options=self._options(key, options)))

    def plan_quantize(self, model: str, scheme: str | int, **kw) -> quantization_pb2.QuantizePlan:
        """What submit_quantize would run: the checks, the ignore list, the memory estimate; nothing is queued."""
        return self._call(self.quantization.PlanQuantize,
                          quantization_pb2.SubmitQuantizeRequest(spec=self.quantize_spec(model, scheme, **kw)))

    # ------------------------------------------------------------------ serving
    def create_deployment(self, name: str, model: str, adapters: dict[str, str] | None = None, *, replicas: int = 1,
                          scale_to_zero: bool = False, idle_timeout_s: float = 0, max_model_len: int = 0,
                          kv_cache_bytes: int = 0, tool_call_parser: str = "", max_loras: int = 0,
                          max_lora_rank: int = 0, key: str = "",
                          options: pb.SubmitOptions | None = None) -> pb.Job:
        """Deploy `model` with `adapters` ({served name: adapter artifact}); the job ends when it is READY."""
        spec = serving_pb2.DeploymentSpec(
            name=name, model=ref(model), replicas=replicas, scale_to_zero=scale_to_zero,
            idle_timeout_s=idle_timeout_s, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
            tool_call_parser=tool_call_parser, max_loras=max_loras, max_lora_rank=max_lora_rank,
            adapters=[serving_pb2.LoraModule(name=n, adapter=ref(a)) for n, a in (adapters or {}).items()])
        return self._call(self.serving.CreateDeployment, serving_pb2.CreateDeploymentRequest(
            spec=spec, options=self._options(key, options)))

    def get_deployment(self, name: str) -> serving_pb2.Deployment:
        return self._call(self.serving.GetDeployment, serving_pb2.GetDeploymentRequest(name=name))

    def list_deployments(self, page_size: int = 100) -> Iterator[serving_pb2.Deployment]:
        token = ""
        while True:
            resp = self._call(self.serving.ListDeployments,
                              serving_pb2.ListDeploymentsRequest(page_size=page_size, page_token=token))
            yield from resp.deployments
            token = resp.next_page_token
            if not token:
                return

    def delete_deployment(self, name: str, timeout: float | None = None) -> serving_pb2.Deployment:
        """Stops the deployment and answers when it is gone: the serving service waits for its delete job (up to
        its delete_timeout_s, 120 s by default), so the call's default deadline is longer than the client's."""
        return self._call(self.serving.DeleteDeployment, serving_pb2.DeleteDeploymentRequest(name=name),
                          timeout=timeout or max(DELETE_DEPLOYMENT_TIMEOUT_S, self.timeout))

    def add_adapter(self, deployment: str, name: str, adapter: str, *, key: str = "") -> pb.Job:
        return self._call(self.serving.AddAdapter, serving_pb2.AddAdapterRequest(
            deployment=deployment, adapter=serving_pb2.LoraModule(name=name, adapter=ref(adapter)),
            options=self._options(key, None)))

    def remove_adapter(self, deployment: str, name: str, *, key: str = "") -> pb.Job:
        return self._call(self.serving.RemoveAdapter, serving_pb2.RemoveAdapterRequest(
            deployment=deployment, name=name, options=self._options(key, None)))

    # ------------------------------------------------------------------ pipeline
    def submit_pipeline(self, spec: pipeline_pb2.PipelineSpec, *, smoke: bool = False, key: str = "",
                        options: pb.SubmitOptions | None = None) -> pb.Job:
        """The whole arc as one job (services.pipeline.spec.load_file reads a pipeline file into the spec)."""
        opts = self._options(key, options)
        opts.smoke = smoke or opts.smoke
        return self._call(self.pipeline.SubmitPipeline, pipeline_pb2.SubmitPipelineRequest(spec=spec, options=opts))

    # ------------------------------------------------------------------ jobs (any service's; routed via the registry)
    def get_job(self, job_id: str) -> pb.Job:
        return self._call(self.registry.GetJob, pb.GetJobRequest(job_id=job_id))

    def list_jobs(self, *, states: list[int] | None = None, kind: str = "", page_size: int = 100) -> Iterator[pb.Job]:
        token = ""
        while True:
            resp = self._call(self.registry.ListJobs, pb.ListJobsRequest(
                states=states or [], kind=kind, page_size=page_size, page_token=token, all_services=True))
            yield from resp.jobs
            token = resp.next_page_token
            if not token:
                return

    def cancel_job(self, job_id: str, reason: str = "") -> pb.Job:
        return self._call(self.registry.CancelJob, pb.CancelJobRequest(job_id=job_id, reason=reason))

    def watch(self, job_id: str, after_cursor: int = 0, *, follow: bool = True,
              reconnect_for_s: float = 60.0) -> Iterator[pb.JobEvent]:
        """Every event after `after_cursor`; on a dropped connection it reconnects from the last cursor seen,
        so nothing is missed or repeated."""
        cursor, down_since = after_cursor, None
        while True:
            try:
                stream = self.registry.WatchJob(
                    pb.WatchJobRequest(job_id=job_id, after_cursor=cursor, no_follow=not follow),
                    metadata=self.metadata)
                for ev in stream:
                    down_since = None
                    if ev.cursor > cursor:
                        cursor = ev.cursor
                    yield ev
                return
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect_for_s:
                    raise
                time.sleep(0.3)

    def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.2, max_poll_s: float = 1.0) -> pb.Job:
        """The job once it has ended. Polls GetJob (each poll reads the job's files and asks Ray) every `poll_s`
        at first, backing off to every `max_poll_s` while it runs: a short job is seen ending at once, a long one
        costs the service one poll a second."""
        deadline = time.monotonic() + timeout
        delay = poll_s
        while True:
            job = self.get_job(job_id)
            if job.state in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {pb.JobState.Name(job.state)} after {timeout:.0f}s")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic()) + 0.01))
            delay = min(delay * 1.5, max_poll_s)
