"""`tunery models import` and `tunery datasets import`."""

from __future__ import annotations

import typer

from services.cli.console import OPTS, UploadBar, client, err, follow, out, rpc

models_app = typer.Typer(help="Base models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets.", no_args_is_help=True)

def source_of(path: str, server_path: bool) -> str:
    """A local path as the SDK uploads it; a server path made absolute (against the client's directory, the
    one thing a relative path can mean); a URL as it is."""
    import os

    from services.sdk.client import URL

    if URL.match(path):
        return path
    if not server_path and not os.path.exists(path):
        err.print(f"[red]error[/red] NOT_FOUND: {path}: no such file or folder on this machine (--server-path: a "
                  "path on the services' host)")
        raise typer.Exit(2)
    return os.path.abspath(path)


@models_app.command("import")
def models_import(
    path: str = typer.Argument(..., help="A Hugging Face model folder on this machine (uploaded), s3://bucket/prefix/, "
                                         "or hf://org/name."),
    name: str = typer.Option(..., "--name", help="Artifact name."),
    key: str = typer.Option("", "--key", help="Idempotency key (becomes the job id)."),
    allow_trust_remote_code: bool = typer.Option(False, help="Import a model that ships custom code."),
    server_path: bool = typer.Option(False, "--server-path", help="PATH is a folder on the services' host (under "
                                     "its import roots): nothing is uploaded."),
    watch: bool = typer.Option(True, help="Follow the job until it ends."),
) -> None:
    """Import a base model into the store as a pristine, checksummed model artifact."""
    c = client()
    with UploadBar(path) as bar:
        job = rpc(c.import_model, source_of(path, server_path), name, key=key, progress=bar,
                  allow_trust_remote_code=allow_trust_remote_code, upload=False if server_path else None)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"model artifact: {final.outputs[0].uri}")


@datasets_app.command("import")
def datasets_import(
    path: str = typer.Argument(..., help="A JSONL, JSON, CSV or Parquet file on this machine (uploaded), "
                                         "s3://bucket/key or https://…"),
    name: str = typer.Option(..., "--name"),
    key: str = typer.Option("", "--key"),
    server_path: bool = typer.Option(False, "--server-path", help="PATH is a file on the services' host (under "
                                     "its import roots): nothing is uploaded."),
    watch: bool = typer.Option(True),
) -> None:
    """Store a dataset file as a dataset artifact (parsing and validation: tunery data prepare)."""
    c = client()
    with UploadBar(path) as bar:
        job = rpc(c.import_dataset, source_of(path, server_path), name, key=key, progress=bar,
                  upload=False if server_path else None)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"dataset artifact: {final.outputs[0].uri}")
