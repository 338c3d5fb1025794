"""`tunery jobs list | get | cancel | watch`."""

from __future__ import annotations

import json

import grpc
import typer
from rich.table import Table

from services.cli.console import (
    OPTS,
    client,
    emit,
    fail_rpc,
    out,
    render_watch,
    rpc,
    state_name,
    to_dict,
)
from services.gen.tunery.v1 import common_pb2 as pb

jobs_app = typer.Typer(help="Jobs of every service.", no_args_is_help=True)

@jobs_app.command("list")
def jobs_list(state: str = typer.Option("", help="validating, queued, running, succeeded, failed, cancelled"),
              kind: str = typer.Option("")) -> None:
    """List jobs of every service."""
    states = [getattr(pb, f"JOB_STATE_{state.upper()}")] if state else []
    jobs = rpc(lambda: list(client().list_jobs(states=states, kind=kind)))
    if OPTS["json"]:
        return emit(jobs)
    t = Table("id", "kind", "state", "reason")
    for j in jobs:
        t.add_row(j.id, j.kind, state_name(j.state), j.state_reason[:60])
    out.print(t)


@jobs_app.command("get")
def jobs_get(job_id: str) -> None:
    """Show a job."""
    job = rpc(client().get_job, job_id)
    if OPTS["json"]:
        return emit(job)
    out.print(f"{job.id}  {job.kind}  [bold]{state_name(job.state)}[/bold]  {job.state_reason}")
    for o in job.outputs:
        out.print(f"  output: {o.uri}")
    for k, v in sorted(job.latest_metrics.items()):
        out.print(f"  {k} = {v:g}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, reason: str = typer.Option("")) -> None:
    """Cancel a queued or running job."""
    job = rpc(client().cancel_job, job_id, reason)
    emit(job) if OPTS["json"] else out.print(f"{job.id} {state_name(job.state)} {job.state_reason}")


# What the progress bar shows when a job reports it (training: loss, lr, throughput).
@jobs_app.command("watch")
def jobs_watch(job_id: str, after: int = typer.Option(0, "--after", help="Resume after this event cursor.")) -> None:
    """Follow a job's events (a progress bar for metrics) until it ends; resumes after a disconnect."""
    c = client()
    try:
        if OPTS["json"]:
            for ev in c.watch(job_id, after):
                print(json.dumps(to_dict(ev)), flush=True)
        else:
            render_watch(c, job_id, after)
    except grpc.RpcError as e:
        fail_rpc(e)
