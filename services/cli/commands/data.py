"""`tunery data prepare | generate | report`."""

from __future__ import annotations

import typer

from services.cli import stack
from services.cli.console import OPTS, client, emit, err, follow, out, rpc, to_dict
from services.gen.tunery.v1 import common_pb2 as pb

data_app = typer.Typer(help="Data: prepare (validate, dedup, split, report) and generate.", no_args_is_help=True)

DEDUP_NAMES = {"none": 1, "exact": 2, "near": 3}


@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help="A raw dataset artifact (id or tunery:// uri)."),
    base: str = typer.Option(..., "--base", help="The base model artifact: its tokenizer and chat template."),
    holdout: float = typer.Option(0.1, help="Fraction held out for evaluation (0..0.5)."),
    dedup: str = typer.Option("near", help="none, exact or near."),
    max_tokens: int = typer.Option(0, help="Warn about longer examples (0: no limit)."),
    seed: int = typer.Option(0),
    min_examples: int = typer.Option(1),
    stratify: str = typer.Option("", help="A label field to stratify the split on."),
    name: str = typer.Option("", help="Artifact name (default <dataset>-prepared)."),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Parse, validate, deduplicate and split a dataset into the canonical chat form, with an inspection report."""
    if dedup not in DEDUP_NAMES:
        err.print(f"--dedup must be one of {', '.join(DEDUP_NAMES)}")
        raise typer.Exit(2)
    c = client()
    job = rpc(c.prepare_dataset, dataset, base, name=name, holdout=holdout, dedup=DEDUP_NAMES[dedup],
              max_tokens=max_tokens, seed=seed, min_examples=min_examples, stratify_field=stratify, key=key)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"prepared dataset: {final.outputs[-1].uri}  (tunery data report {final.outputs[-1].uri})")


@data_app.command("generate")
def data_generate(
    recipe: str = typer.Argument(..., help="A recipe YAML (see services/datagen/recipes/)."),
    teacher: str = typer.Option("", "--teacher", help="A model artifact to run with vLLM inside the job."),
    endpoint: str = typer.Option("", help="Or an OpenAI-compatible base URL (with --endpoint-model)."),
    endpoint_model: str = typer.Option(""),
    api_key_env: str = typer.Option("", help="Env var on the workers that holds the endpoint's key."),
    num: int = typer.Option(0, "--num", help="How many examples to keep (default: the recipe's)."),
    name: str = typer.Option(""),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Generate synthetic data with a local teacher; the result is a raw dataset to prepare and inspect."""
    from pathlib import Path

    c = client()
    ep = pb.OpenAIEndpoint(base_url=endpoint, model=endpoint_model, api_key_env=api_key_env) if endpoint else None
    job = rpc(c.generate_dataset, Path(recipe).read_text(), teacher=teacher, endpoint=ep, name=name,
              num_examples=num, key=key)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"synthetic dataset: {final.outputs[-1].uri}  (next: tunery data prepare {final.outputs[-1].uri} --base ...)")


@data_app.command("report")
def data_report(artifact: str = typer.Argument(..., help="A prepared dataset (or a failed prepare's report)."),
                open_it: bool = typer.Option(False, "--open", help="Open the HTML report in a browser.")) -> None:
    """Print a dataset's inspection report and save its HTML locally."""
    c = client()
    report = rpc(c.dataset_report, artifact)
    path = rpc(c.download, artifact, "report.html", stack.home() / "reports" / report.dataset.uri.rsplit("/", 1)[-1] / "report.html")
    if OPTS["json"]:
        emit({**to_dict(report), "html": str(path)})
    else:
        out.print(f"{report.dataset.uri}: {report.num_input} read, {report.num_train} train, {report.num_holdout} "
                  f"held out, {report.num_duplicates} duplicates, {report.num_errors} errors, {report.num_warnings} warnings")
        for issue in report.issues[:20]:
            out.print(f"  {issue.file}:{issue.line}: {issue.field + ': ' if issue.field else ''}{issue.message}")
        out.print(f"report: {path}")
    if open_it:
        import webbrowser

        webbrowser.open(path.as_uri())
