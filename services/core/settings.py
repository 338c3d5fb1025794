"""Settings read from environment variables (pydantic-settings). Each service subclasses ServiceSettings."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["control", "train", "quantize", "serve"]
ROLES: tuple[str, ...] = ("control", "train", "quantize", "serve")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Each service's default port (env TUNERY_<SERVICE>_PORT overrides it): the one table the Settings classes, the
# SDK and the embedded stack read.
SERVICE_PORTS: dict[str, int] = {"registry": 50051, "datagen": 50052, "training": 50053, "merging": 50054,
                                 "quantization": 50055, "evaluation": 50056, "serving": 50057, "pipeline": 50058}


def default_endpoints() -> dict[str, str]:
    """Where each service answers by default: TUNERY_<SERVICE>_ADDR, else 127.0.0.1:<its default port>."""
    return {name: os.environ.get(f"TUNERY_{name.upper()}_ADDR", f"127.0.0.1:{port}")
            for name, port in SERVICE_PORTS.items()}


def tunery_home() -> Path:
    """$TUNERY_HOME, default ~/.tunery: the embedded stack's state, token, logs, local store and cache."""
    return Path(os.environ.get("TUNERY_HOME") or Path.home() / ".tunery")


def port_field(service: str):
    """The `port` field of a service's settings: its default from SERVICE_PORTS, env TUNERY_<SERVICE>_PORT."""
    return Field(SERVICE_PORTS[service], validation_alias=f"TUNERY_{service.upper()}_PORT")


class StoreSettings(BaseSettings):
    """Where artifacts live. file:///path (embedded default) or s3://bucket (MinIO or any S3)."""

    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    project: str = Field("default", description="Per-project key prefix: projects/<project>/...")
    store_url: str = Field(
        default_factory=lambda: "file://" + str(tunery_home() / "store"),
        description="file:///abs/path or s3://bucket",
    )
    s3_endpoint: str = Field("127.0.0.1:9000", description="host:port of the S3 API")
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_part_size: int = Field(16 * 1024 * 1024, description="multipart part size in bytes")
    s3_retries: int = 5
    cache_dir: Path = Field(
        default_factory=lambda: tunery_home() / "cache",
        description="where jobs materialise artifacts",
    )

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        from services.core.errors import InvalidArgument
        from services.core.keys import validate_name

        try:
            return validate_name(v, "project")
        except InvalidArgument as e:
            raise ValueError(str(e)) from None

    def job_env(self) -> dict[str, str]:
        """Non-secret store settings handed to jobs; credentials come from the workers' own environment."""
        return {
            "TUNERY_PROJECT": self.project,
            "TUNERY_STORE_URL": self.store_url,
            "TUNERY_S3_ENDPOINT": self.s3_endpoint,
            "TUNERY_S3_SECURE": str(self.s3_secure).lower(),
            "TUNERY_S3_REGION": self.s3_region,
        }


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    ray_address: str = Field("http://127.0.0.1:8265", description="Ray job API (dashboard) URL")
    role_resources: bool = Field(False, description="jobs ask for the custom resource tunery_<role>")
    worker_python_control: str = ""
    worker_python_train: str = ""
    worker_python_quantize: str = ""
    worker_python_serve: str = ""
    job_stop_grace_s: int = Field(60, ge=1, description="after a cancel's SIGTERM, how long a job may take to save "
                                  "its state (a training checkpoint) before Ray kills it")

    def python_for(self, role: str) -> str:
        """The interpreter a role's jobs run with: the setting, else the repo's .venvs/<role>, else ours."""
        configured = getattr(self, f"worker_python_{role}", "")
        if configured:
            return configured
        local = REPO_ROOT / ".venvs" / role / "bin" / "python"
        if role != "control" and local.exists():
            return str(local)
        return sys.executable


class ServiceSettings(StoreSettings, RaySettings):
    """What every gRPC service reads. Subclasses set `service` and the default port (env TUNERY_<SERVICE>_PORT)."""

    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore", validate_by_name=True)

    service: str = "core"
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 in containers")
    port: int = 0
    auth_tokens: str = Field("", description="comma-separated bearer tokens; empty disables auth")
    token_file: Path | None = Field(None, description="a file holding one token (the embedded stack writes it)")
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    import_roots: str = Field(
        default_factory=lambda: os.pathsep.join(dict.fromkeys([str(Path.home()), os.getcwd()])),
        description="the folders (separated by ':') under which a request may name a path on the service's host; "
                    "everything else must be uploaded by the client. Embedded default: the user's home and the "
                    "current directory; the containers set /imports")

    def roots(self) -> list[Path]:
        """The import roots as written and as resolved (a root reached through a symlink, /home -> /data/home, holds
        the paths a client writes either way)."""
        out: list[Path] = []
        for r in (r.strip() for r in self.import_roots.split(os.pathsep)):
            for p in (Path(os.path.normpath(os.path.abspath(r))), Path(r).resolve()) if r else ():
                if p not in out:
                    out.append(p)
        return out

    def tokens(self) -> set[str]:
        tokens = {t.strip() for t in self.auth_tokens.split(",") if t.strip()}
        if self.token_file and self.token_file.exists():
            tokens.add(self.token_file.read_text().strip())
        return tokens
