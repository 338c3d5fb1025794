"""`tunery`: the command-line client (typer + rich), built on the SDK; one module per command group in
services/cli/commands/."""

from __future__ import annotations

import sys

import typer

from services.cli.commands import (
    arena,
    artifacts,
    data,
    evaluate,
    imports,
    jobs,
    merge,
    pipeline,
    quantize,
    serve,
    stack,
    train,
)
from services.cli.console import OPTS

app = typer.Typer(help="Tunery: turn an open-weight LLM into your own model.", no_args_is_help=True)
for command in (stack.up, stack.down, stack.status, merge.merge, quantize.quantize, arena.arena):
    app.command()(command)
app.add_typer(imports.models_app, name="models")
app.add_typer(imports.datasets_app, name="datasets")
app.add_typer(artifacts.artifacts_app, name="artifacts")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(data.data_app, name="data")
app.add_typer(train.train_app, name="train")
app.add_typer(evaluate.eval_app, name="eval")
app.add_typer(serve.serve_app, name="serve")
app.add_typer(pipeline.pipeline_app, name="pipeline")


@app.callback()
def root(
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    target: str = typer.Option("", "--target", envvar="TUNERY_REGISTRY_ADDR", help="Registry address host:port."),
    token: str = typer.Option(None, "--token", envvar="TUNERY_TOKEN", help="Bearer token (default ~/.tunery/token)."),
) -> None:
    OPTS.update(json=json_out, target=target, token=token)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
