"""`tunery models import` and `tunery datasets import`."""

from __future__ import annotations

import typer

from services.cli.console import OPTS, client, follow, out, rpc

models_app = typer.Typer(help="Base models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets.", no_args_is_help=True)

@models_app.command("import")
def models_import(
    path: str = typer.Argument(..., help="A Hugging Face model directory (absolute path) or hf://org/name."),
    name: str = typer.Option(..., "--name", help="Artifact name."),
    key: str = typer.Option("", "--key", help="Idempotency key (becomes the job id)."),
    allow_trust_remote_code: bool = typer.Option(False, help="Import a model that ships custom code."),
    watch: bool = typer.Option(True, help="Follow the job until it ends."),
) -> None:
    """Import a base model into the store as a pristine, checksummed model artifact."""
    import os

    c = client()
    source = path if path.startswith("hf://") else os.path.abspath(path)
    job = rpc(c.import_model, source, name, key=key, allow_trust_remote_code=allow_trust_remote_code)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"model artifact: {final.outputs[0].uri}")


@datasets_app.command("import")
def datasets_import(
    path: str = typer.Argument(..., help="A JSONL, JSON, CSV or Parquet file."),
    name: str = typer.Option(..., "--name"),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Store a dataset file as a dataset artifact (parsing and validation: tunery data prepare)."""
    import os

    c = client()
    final = follow(c, rpc(c.import_dataset, os.path.abspath(path), name, key=key), watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"dataset artifact: {final.outputs[0].uri}")
