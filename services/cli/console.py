"""What every command shares: the global options, the client they make, printing (tables or --json), RPC errors as
exit code 2 with the field violations, and following a job (events as lines, metrics as a progress bar)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from services.cli import stack
from services.gen.tunery.v1 import common_pb2 as pb
from services.sdk.client import TuneryClient

out = Console()
err = Console(stderr=True)
OPTS: dict[str, Any] = {"json": False, "target": "", "token": None}


def client() -> TuneryClient:
    """--target / TUNERY_REGISTRY_ADDR, else the running embedded stack's registry, else 127.0.0.1:50051."""
    state = stack.StackState.load()
    endpoints = {name: f"127.0.0.1:{port}" for name, port in state.ports.items()} if state else {}
    return TuneryClient(OPTS["target"], OPTS["token"], endpoints=endpoints)


def to_dict(msg) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def emit(obj: Any) -> None:
    if isinstance(obj, list):
        obj = [to_dict(m) if hasattr(m, "DESCRIPTOR") else m for m in obj]
    elif hasattr(obj, "DESCRIPTOR"):
        obj = to_dict(obj)
    out.print_json(json.dumps(obj, default=str))


def state_name(s: int) -> str:
    return pb.JobState.Name(s).removeprefix("JOB_STATE_").lower()


def fail_rpc(e: grpc.RpcError) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    err.print(f"[red]error[/red] {e.code().name}: {e.details()}")
    status = rpc_status.from_call(e) if hasattr(e, "trailing_metadata") else None
    for detail in status.details if status else []:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            for v in br.field_violations:
                err.print(f"  {v.field}: {v.description}")
    raise typer.Exit(2)


def rpc(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:
        fail_rpc(e)


def follow(c: TuneryClient, job: pb.Job, watch: bool) -> pb.Job:
    if not watch:
        if OPTS["json"]:
            emit(job)
        else:
            out.print(f"job {job.id} {state_name(job.state)}")
        return job
    if not OPTS["json"]:
        render_watch(c, job.id)
    final = rpc(c.wait, job.id)
    if OPTS["json"]:
        emit(final)
    if final.state != pb.JOB_STATE_SUCCEEDED:
        err.print(f"[red]job {final.id} {state_name(final.state)}[/red]: {final.state_reason}")
        raise typer.Exit(1)
    return final


WATCHED_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "kept", "examples_read")


BAR_COLUMNS = 40  # what the bar, the percentage and the time left take of a line


def cut(text: str, width: int) -> str:
    """`text` whole if it fits in `width` characters, else cut with an ellipsis (never wrapped mid-phrase)."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class UploadBar:
    """Bytes sent and the rate while a local file or folder goes to the store (the SDK's `progress` callback);
    nothing under --json."""

    def __init__(self, what: str):
        self.what, self.progress, self.task = what, None, None

    def __enter__(self) -> "UploadBar":
        if not OPTS["json"]:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=err)
            self.progress.start()
            self.task = self.progress.add_task(f"upload {self.what}", total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def render_watch(c: TuneryClient, job_id: str, after: int = 0) -> None:
    """Events as whole lines (the terminal wraps them, nothing is inserted), metrics as a live progress bar whose
    description is cut to leave the bar and the percentage on the line."""
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), TaskProgressColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as progress:
        task = progress.add_task(job_id, total=None)
        width = max(progress.console.width - BAR_COLUMNS, 16)
        for ev in c.watch(job_id, after):
            if ev.type == pb.EVENT_TYPE_METRICS and ev.total_steps:
                shown = [k for k in WATCHED_METRICS if k in ev.metrics] or list(ev.metrics)[:3]
                description = " ".join(f"{k}={ev.metrics[k]:.3g}" for k in shown)
                progress.update(task, total=ev.total_steps, completed=ev.step,
                                description=cut(f"{job_id} {description}", width))
            else:
                colour = {pb.EVENT_LEVEL_ERROR: "red", pb.EVENT_LEVEL_WARNING: "yellow"}.get(ev.level, "")
                text = f"[{colour}]{ev.text}[/{colour}]" if colour else ev.text
                progress.console.print(f"[dim]#{ev.cursor}[/dim] {text}", markup=True, highlight=False,
                                       soft_wrap=True)
