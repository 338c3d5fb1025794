"""`tunery artifacts list | show | lineage | download | delete`."""

from __future__ import annotations

import typer
from rich.table import Table

from services.cli.console import OPTS, client, emit, err, out, rpc
from services.gen.tunery.v1 import common_pb2 as pb

artifacts_app = typer.Typer(help="Artifacts in the store.", no_args_is_help=True)

KIND_NAMES = {"model": pb.ARTIFACT_KIND_MODEL, "dataset": pb.ARTIFACT_KIND_DATASET, "adapter": pb.ARTIFACT_KIND_ADAPTER,
              "report": pb.ARTIFACT_KIND_REPORT, "checkpoint": pb.ARTIFACT_KIND_CHECKPOINT, "suite": pb.ARTIFACT_KIND_SUITE}



@artifacts_app.command("list")
def artifacts_list(kind: str = typer.Option("", help="model, dataset, adapter, report, checkpoint, suite"),
                   name: str = typer.Option("")) -> None:
    """List artifacts."""
    if kind and kind not in KIND_NAMES:
        err.print(f"--kind must be one of {', '.join(KIND_NAMES)}")
        raise typer.Exit(2)
    arts = rpc(lambda: list(client().list_artifacts(KIND_NAMES.get(kind, 0), name)))
    if OPTS["json"]:
        return emit(arts)
    t = Table("id", "kind", "size", "files", "created by")
    for a in arts:
        t.add_row(a.id, pb.ArtifactKind.Name(a.kind).removeprefix("ARTIFACT_KIND_").lower(),
                  f"{a.total_bytes / 1e6:.2f} MB", str(len(a.files)), a.created_by_job)
    out.print(t)


@artifacts_app.command("show")
def artifacts_show(artifact_id: str) -> None:
    """Print an artifact's manifest."""
    emit(rpc(client().get_artifact, artifact_id))


@artifacts_app.command("lineage")
def artifacts_lineage(artifact_id: str, max_depth: int = typer.Option(0)) -> None:
    """The artifact and its ancestors."""
    chain = rpc(client().lineage, artifact_id, max_depth)
    if OPTS["json"]:
        return emit(chain)
    for i, a in enumerate(chain):
        out.print(("  " * min(i, 1)) + ("└─ " if i else "") + f"{a.id}  ({a.created_by_job or 'no job'})")


@artifacts_app.command("download")
def artifacts_download(artifact_id: str, path: str = typer.Argument(..., help="A file of the artifact."),
                       out_path: str = typer.Option("", "--out", help="Where to write it (default: its name).")) -> None:
    """Download one file of an artifact (sha256-verified), e.g. an adapter's loss_curve.png."""
    from pathlib import Path

    dest = Path(out_path or Path(path).name)
    rpc(client().download, artifact_id, path, dest)
    out.print(str(dest))


@artifacts_app.command("delete")
def artifacts_delete(artifact_id: str) -> None:
    """Delete an artifact (refused while another artifact names it as a parent)."""
    deleted = rpc(client().delete_artifact, artifact_id)
    emit({"deleted": deleted}) if OPTS["json"] else out.print(f"deleted {deleted}")
