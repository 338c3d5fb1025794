"""The serving job's typed spec (the request's domain form too), and a deployment's record. No heavy imports: the
control plane builds them.

A deployment is a Ray Serve application named after it: replicas of `services.serving.replica.VLLMReplica`, each
running vLLM's OpenAI server with the model and every adapter on one engine, behind Serve's HTTP proxy at
`/<name>/v1`. Its adapters are the application's `user_config`: changing them reconfigures the running replicas
(vLLM's runtime LoRA loading), it never restarts them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from services.core.artifacts import ArtifactRef
from services.core.vllm import LORA_RANKS, TOOL_PARSERS

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Action = Literal["deploy", "adapters", "delete"]
State = Literal["STARTING", "READY", "FAILED", "STOPPED"]
DEFAULT_MAX_LORAS = 4


class LoraModule(BaseModel):
    name: str                      # the model name clients ask for
    adapter: ArtifactRef = Field(default_factory=ArtifactRef.unset)


class DeploymentSpec(BaseModel):
    """What a deployment serves; the request gives it, the service pins the refs and fills in the rest."""

    name: str = ""
    model: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    adapters: list[LoraModule] = Field(default_factory=list)
    replicas: int = Field(1, ge=1, le=64, description="replicas (with scale_to_zero: the most, on demand)")
    scale_to_zero: bool = False
    idle_timeout_s: float = Field(300.0, gt=0, le=86400, description="scale_to_zero: idle this long, then none")
    max_model_len: int = Field(0, ge=0, le=1 << 20, description="0: the model's context, capped at 4096")
    gpu_memory_utilization: float = Field(0.0, ge=0.0, le=1.0, description="GPU only; 0: 0.85")
    kv_cache_bytes: int = Field(0, ge=0, le=1 << 40, description="CPU only; 0: 512 MiB")
    tool_call_parser: str = ""
    dtype: Dtype = "auto"
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    max_loras: int = Field(0, ge=0, le=256, description="adapters loaded at once; 0: max(4, the adapters given)")
    max_lora_rank: int = Field(0, ge=0, le=LORA_RANKS[-1], description="0: the largest adapter's rank, at least 16")
    # filled in by the service
    served_name: str = ""          # the base's model name (the model artifact's name)
    engine_dtype: str = "auto"     # the activations' dtype on the engine (services.core.vllm.engine_dtype)
    quantization: str = ""         # the model's scheme, "" for full precision
    device: Literal["cpu", "cuda"] = "cpu"
    cpus_per_replica: float = 1.0
    replica_resources: dict[str, float] = Field(default_factory=dict)  # Ray custom resources (tunery_serve)

    @field_validator("tool_call_parser")
    @classmethod
    def _parser(cls, v: str) -> str:
        if v and v not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {v!r}; one of {', '.join(TOOL_PARSERS)} (or empty: none)")
        return v

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v and v not in LORA_RANKS:
            raise ValueError(f"vLLM accepts a max LoRA rank of {', '.join(map(str, LORA_RANKS))} (got {v})")
        return v

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def served_models(self) -> list[str]:
        return [self.served_name, *self.adapter_names()]


class ServeJobSpec(BaseModel):
    """The serving job's input: deploy (create, or redeploy the same spec), change the adapters, or delete."""

    action: Action
    deployment: DeploymentSpec
    http_host: str = "127.0.0.1"   # where Serve's HTTP proxy listens (set when Serve starts on the cluster)
    http_port: int = 8000
    public_url: str = ""           # how clients reach that proxy ("" = http://<http_host>:<http_port>)
    startup_timeout_s: float = 900.0

    @property
    def base_url(self) -> str:
        root = (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")
        return f"{root}/{self.deployment.name}/v1"


class DeploymentRecord(BaseModel):
    """projects/<project>/deployments/<name>.json: what was asked and what the last job made of it. Serve is the
    live source of the state; the record keeps what Serve does not (the spec, the key, the job, a failure)."""

    name: str
    spec: DeploymentSpec
    api_key: str
    state: State = "STARTING"
    message: str = ""
    base_url: str = ""
    job_id: str = ""
    # the engine's controls, as an eval report records them (engine, version, precision, template, parser, LoRA)
    controls: dict = Field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
