"""`tunery train plan | submit`: LoRA / QLoRA / DoRA adapters."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from services.cli.console import OPTS, client, emit, err, follow, out, rpc

train_app = typer.Typer(help="Training: LoRA / QLoRA / DoRA adapters (plan, submit).", no_args_is_help=True)

def load_training_spec(path: str, base: str, dataset: str, sets: list[str]) -> dict[str, Any]:
    """A training recipe (YAML) plus the command line: --base/--dataset and dotted --set key=value overrides."""
    import yaml

    spec = yaml.safe_load(open(path, encoding="utf-8")) if path else {}
    if not isinstance(spec, dict):
        err.print(f"{path}: a training spec is a YAML mapping")
        raise typer.Exit(2)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(f"--set {item!r}: expected key=value, e.g. --set lora.rank=8")
            raise typer.Exit(2)
        *parents, leaf = key.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    if base:
        spec["base_model"] = base
    if dataset:
        spec["dataset"] = dataset
    return spec


def _training_request(spec: dict[str, Any]):
    from google.protobuf.json_format import ParseError

    from services.sdk.client import training_spec

    try:
        return training_spec(spec)
    except (ParseError, ValueError, TypeError) as e:
        err.print(f"[red]INVALID_ARGUMENT[/red]: the training spec does not parse: {e}")
        raise typer.Exit(2)


SPEC_ARG = typer.Argument("", help="A training spec YAML (services/training/recipes/); empty: defaults.")
BASE_OPT = typer.Option("", "--base", help="The base model artifact.")
DATA_OPT = typer.Option("", "--dataset", help="A prepared dataset artifact (its train split is used).")
SET_OPT = typer.Option([], "--set", help="Override a spec field: --set lora.rank=8 --set max_steps=20.")


@train_app.command("plan")
def train_plan(spec: str = SPEC_ARG, base: str = BASE_OPT, dataset: str = DATA_OPT,
               set_: list[str] = SET_OPT) -> None:
    """Estimate peak memory and the resources a training job needs, without submitting it."""
    c = client()
    plan = rpc(c.plan_training, _training_request(load_training_spec(spec, base, dataset, set_)))
    if OPTS["json"]:
        emit(plan)
        return
    b = plan.breakdown
    table = Table(title=f"training plan: ~{plan.peak_gib_per_gpu:.2f} GiB peak per device")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for name in ("weights", "adapter", "gradients", "optimizer", "activations", "overhead"):
        table.add_row(name, f"{getattr(b, name + '_gib'):.3f}")
    out.print(table)
    out.print(f"trainable {plan.trainable_parameters:,} of {plan.total_parameters:,} parameters; modules: "
              f"{', '.join(plan.target_modules)}")
    out.print(f"asks Ray for {plan.resources.cpus:g} CPU, {plan.resources.gpus:g} GPU")
    out.print(("[green]feasible[/green]: " if plan.feasible else "[red]infeasible[/red]: ") + plan.reason)
    for s in plan.suggestions:
        out.print(f"  try: {s}")
    for n in plan.notes:
        out.print(f"  note: {n}")
    if not plan.feasible:
        raise typer.Exit(1)


@train_app.command("submit")
def train_submit(spec: str = SPEC_ARG, base: str = BASE_OPT, dataset: str = DATA_OPT, set_: list[str] = SET_OPT,
                 key: str = typer.Option("", "--key"), watch: bool = typer.Option(True)) -> None:
    """Queue a fine-tuning job; with --watch (default) follow it with a progress bar until it ends."""
    c = client()
    job = rpc(c.submit_training, _training_request(load_training_spec(spec, base, dataset, set_)), key=key)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        adapters = [o.uri for o in final.outputs if "/adapter-" in o.uri]
        if adapters:
            out.print(f"adapter: {adapters[-1]}  (loss curve: tunery artifacts download {adapters[-1]} loss_curve.png)")
