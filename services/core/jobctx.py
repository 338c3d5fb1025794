"""The small API a job uses: load its spec, emit events and metrics, write and commit artifacts, fail clearly.

    def main() -> None:
        with JobContext.from_argv() as ctx:          # setup
            spec = MySpec.model_validate(ctx.spec)
            ...                                       # run: ctx.event(), ctx.metrics()
            manifest = ctx.commit(writer, metadata)   # save (manifest last)

A TuneryError or any other exception inside the block becomes an ERROR event and state.json's error, and
the process exits non-zero so Ray marks the job FAILED.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from pydantic import BaseModel

from services.core import logs
from services.core.artifacts import ArtifactRef, ArtifactStore, ArtifactWriter, Manifest
from services.core.errors import TuneryError
from services.core.job_store import JobFiles
from services.core.jobs import JobEnvelope, JobEvent, JobState
from services.core.settings import StoreSettings
from services.core.store import ObjectStore, key_of, open_store

log = logging.getLogger("tunery.job")


class JobCancelled(Exception):
    pass


class JobContext:
    def __init__(self, objects: ObjectStore, envelope: JobEnvelope, settings: StoreSettings):
        self.settings = settings
        self.envelope = envelope
        self.job_id = envelope.job_id
        self.spec: dict[str, Any] = envelope.spec
        self.artifacts = ArtifactStore(objects, envelope.project)
        self.files = JobFiles(self.artifacts, self.job_id)
        self.progress = self.files.progress()
        self._cursor = self.progress.last_cursor
        self._last_cancel_check = 0.0
        self._cancel_reason: str | None = None
        self._stop_signal = ""

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> "JobContext":
        argv = sys.argv if argv is None else argv
        if len(argv) != 2:
            raise SystemExit(f"usage: python -m services.<service>.job <spec-uri>  (got {argv[1:]})")
        settings = StoreSettings()
        objects = open_store(settings)
        envelope = JobEnvelope.model_validate_json(objects.get_bytes(key_of(objects, argv[1])))
        logs.configure(job_id=envelope.job_id)
        return cls(objects, envelope, settings)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "JobContext":
        reason = self.files.cancel_reason()
        if reason is not None:  # cancelled while it was still queued
            self.event(f"cancelled before it started: {reason}", level="warning", state=JobState.CANCELLED)
            raise SystemExit(3)
        self.progress.started_at = self.progress.started_at or time.time()
        self.phase("running")
        self.event(f"{self.envelope.kind} started on {os.uname().nodename} (pid {os.getpid()})")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.phase("done")
            self.event(f"{self.envelope.kind} succeeded", state=JobState.SUCCEEDED)
            return False
        if isinstance(exc, SystemExit):
            return False
        if isinstance(exc, JobCancelled):
            self.event(f"cancelled: {exc}", level="warning", state=JobState.CANCELLED)
            raise SystemExit(3)
        if isinstance(exc, TuneryError):
            self.fail(str(exc))
        log.error("job crashed", exc_info=(exc_type, exc, tb))
        self.fail(f"{exc_type.__name__}: {exc}\n{''.join(traceback.format_exception(exc_type, exc, tb)[-3:])}")

    def fail(self, message: str) -> NoReturn:
        self.progress.error = message
        self.event(message, level="error", state=JobState.FAILED)
        raise SystemExit(1)

    # ------------------------------------------------------------------ events
    def phase(self, name: str) -> None:
        self.progress.phase = name
        self.files.put_progress(self.progress)

    def event(self, text: str, *, level: str = "info", type: str = "message", step: int = 0, total_steps: int = 0,
              metrics: dict[str, float] | None = None, artifact: ArtifactRef | None = None,
              state: JobState | None = None) -> JobEvent:
        self._cursor += 1
        ev = JobEvent(cursor=self._cursor, job_id=self.job_id, time=time.time(), level=level, type=type, text=text,
                      step=step, total_steps=total_steps, metrics=metrics or {}, artifact=artifact, state=state)
        self.files.append_event(ev)
        self.progress.last_cursor = self._cursor
        if metrics:
            self.progress.latest_metrics.update(metrics)
        if step:
            self.progress.last_step = step
        if state is not None and state.is_terminal():
            self.progress.state = state.value
        if artifact is not None and artifact not in self.progress.outputs:
            self.progress.outputs.append(artifact)
        self.files.put_progress(self.progress)
        getattr(log, "warning" if level == "warning" else ("error" if level == "error" else "info"))(text)
        return ev

    def metrics(self, step: int, metrics: dict[str, float], *, total_steps: int = 0, text: str = "") -> JobEvent:
        return self.event(text or ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), type="metrics",
                          step=step, total_steps=total_steps, metrics=metrics)

    def check_cancelled(self, every_s: float = 1.0) -> None:
        """Raise JobCancelled when a cancel was requested (polled at most every `every_s` seconds)."""
        reason = self.cancel_requested(every_s)
        if reason is not None:
            raise JobCancelled(reason)

    def cancel_requested(self, every_s: float = 1.0) -> str | None:
        """The cancel's reason once one was requested (a SIGTERM, or cancel.json polled at most every `every_s`
        seconds), else None. For jobs that stop on their own terms, e.g. after saving a checkpoint."""
        if self._stop_signal:
            return self._stop_signal
        now = time.monotonic()
        if now - self._last_cancel_check >= every_s:
            self._last_cancel_check = now
            self._cancel_reason = self.files.cancel_reason()
        return self._cancel_reason

    def stop_gracefully_on_sigterm(self) -> None:
        """Turn SIGTERM (Ray's stop_job) into a cancel request the job polls, instead of dying on the spot."""
        import signal

        def handler(signum, frame):
            self._stop_signal = f"stopped by {signal.Signals(signum).name}"
            log.warning("%s: finishing the current step and saving state", self._stop_signal)

        signal.signal(signal.SIGTERM, handler)

    # ------------------------------------------------------------------ artifacts
    def writer(self, kind: str, name: str, parents: Iterable[ArtifactRef] = ()) -> ArtifactWriter:
        return self.artifacts.writer(kind, name, parents=parents, job_id=self.job_id)

    def commit(self, writer: ArtifactWriter, metadata: dict[str, Any] | None = None,
               metrics: dict[str, float] | None = None) -> Manifest:
        manifest, created = writer.commit(metadata, metrics)
        verb = "committed" if created else "already present (identical content), reused"
        self.event(f"artifact {manifest.id} {verb}: {len(manifest.files)} files, {manifest.total_bytes} bytes, "
                   f"{writer.bytes_uploaded} bytes uploaded", type="artifact", artifact=manifest.ref(),
                   metrics={"bytes_uploaded": float(writer.bytes_uploaded), "bytes_total": float(writer.bytes_total)})
        return manifest


CPU_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def use_cpu_threads(cpus: float, env: dict[str, str] | None = None) -> int:
    """Ray starts a job's entrypoint with OMP_NUM_THREADS=1 whatever CPUs it reserved for it, so torch would train
    and merge on one core of two. Give the CPU thread pools the job's reserved CPUs (at least 1); set before torch
    is imported (the handlers import it lazily)."""
    env = os.environ if env is None else env
    n = max(1, int(cpus or 0))
    for k in CPU_THREAD_VARS:
        env[k] = str(n)
    return n


def run_job(service: str, handlers: dict[str, tuple[Callable[[JobContext, Any], None], type[BaseModel]]]) -> None:
    """A service's job entrypoint (`python -m services.<service>.job <spec-uri>`): the envelope's kind picks the
    handler, which gets the context and its typed spec. Every job's CPU thread pools get the CPUs it reserved:
    torch in train- and quantize-role jobs, and in serve-role jobs the engine they start (vLLM on CPU takes the
    job's OMP_NUM_THREADS, services.core.vllm.server_env). Control-role jobs compute nothing."""
    with JobContext.from_argv() as ctx:
        if ctx.envelope.role in ("train", "quantize", "serve"):
            use_cpu_threads(ctx.envelope.resources.cpus)
        entry = handlers.get(ctx.envelope.kind)
        if entry is None:
            ctx.fail(f"the {service} job does not know kind {ctx.envelope.kind!r}")
        handler, spec_type = entry
        handler(ctx, spec_type.model_validate(ctx.spec))
