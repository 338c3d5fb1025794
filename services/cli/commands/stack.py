"""`tunery up | down | status`: the embedded stack."""

from __future__ import annotations

import typer
from rich.table import Table

from services.cli import stack
from services.cli.console import OPTS, emit, err, out


def up(
    store_url: str = typer.Option("", help="file:///path (default ~/.tunery/store) or s3://bucket for MinIO/S3."),
    s3_endpoint: str = typer.Option("", help="MinIO/S3 host:port."),
    s3_access_key: str = typer.Option("", envvar="TUNERY_S3_ACCESS_KEY"),
    s3_secret_key: str = typer.Option("", envvar="TUNERY_S3_SECRET_KEY"),
    s3_secure: bool = typer.Option(False, help="Use TLS to reach S3."),
    ray_address: str = typer.Option("", help="Use this Ray cluster's job API instead of starting a head."),
    num_cpus: int = typer.Option(0, help="CPUs the local Ray head offers (default: all)."),
) -> None:
    """Start the embedded stack: a local Ray head and every service on 127.0.0.1."""
    s3 = {"TUNERY_S3_ENDPOINT": s3_endpoint, "TUNERY_S3_ACCESS_KEY": s3_access_key,
          "TUNERY_S3_SECRET_KEY": s3_secret_key, "TUNERY_S3_SECURE": str(s3_secure).lower() if s3_endpoint else ""}
    with err.status("starting") as st:
        state = stack.up(store_url=store_url, s3=s3, ray_address=ray_address, num_cpus=num_cpus,
                         on_step=lambda s: st.update(s))
    if OPTS["json"]:
        emit(stack.asdict(state))
    else:
        err.print(f"[green]up[/green]: Ray {state.ray_address} (head start {state.ray_start_s:.1f}s), "
                  f"services ready in {state.ready_s:.1f}s, store {state.store_url}")


def down() -> None:
    """Stop the embedded stack."""
    err.print("stopped" if stack.down() else "nothing to stop")


def status() -> None:
    """Show the embedded stack: processes and each service's health."""
    state = stack.StackState.load()
    if state is None:
        err.print("the embedded stack is not running (tunery up)")
        raise typer.Exit(1)
    rows = {name: stack.health(port) for name, port in state.ports.items()}
    if OPTS["json"]:
        emit({"ray_address": state.ray_address, "store_url": state.store_url, "health": rows})
        return
    t = Table("service", "port", "health")
    for name, port in state.ports.items():
        t.add_row(name, str(port), rows[name])
    out.print(f"Ray {state.ray_address} (pid {state.ray_pid}, {'alive' if stack.alive(state.ray_pid) else 'gone'}); "
              f"store {state.store_url}")
    out.print(t)
