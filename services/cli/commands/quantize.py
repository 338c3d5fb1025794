"""`tunery quantize MODEL --scheme S` and `tunery quantize plan MODEL --scheme S`: a full-precision model made
smaller (llmcompressor to compressed-tensors), calibrated on the data it was fine-tuned on."""

from __future__ import annotations

import json

import typer

from services.cli.commands.merge import parse_size
from services.cli.console import OPTS, client, err, follow, out, rpc
from services.core.convert import message_to_dict
from services.sdk.client import TuneryClient


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def quantize(
    model: str = typer.Argument(..., help="The model artifact to quantize (merged or base), or `plan`: only print "
                                "what would run (`tunery quantize plan MODEL --scheme ...`)."),
    planned: str = typer.Argument("", help="With `plan`: the model artifact.", show_default=False),
    scheme: str = typer.Option("gptq-w4a16", "--scheme", help=", ".join(TuneryClient.SCHEMES)),
    calibration: str = typer.Option("", "--calibration", help="A prepared dataset (default: the one the model was "
                                    "fine-tuned on, through its lineage)."),
    samples: int = typer.Option(0, "--samples", help="Calibration conversations (default 256)."),
    max_seq_len: int = typer.Option(0, "--max-seq-len", help="Calibration tokens per conversation (default 512)."),
    ignore: list[str] = typer.Option([], "--ignore", help="Another module kept at full precision (exact name or "
                                     "re:<pattern>); lm_head and MoE routers always are."),
    group_size: int = typer.Option(0, "--group-size", help="W4A16 group size (default 128, or 64/32 when 128 does "
                                   "not divide a layer)."),
    memory_budget: str = typer.Option("0", "--memory-budget", help="Refuse if the job would need more, e.g. 8GB."),
    name: str = typer.Option("", help="Artifact name (default <model>-<scheme>)."),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Quantize a model: compressed-tensors for vLLM (GPTQ/AWQ W4A16, W8A8 int8, FP8), one layer in memory at a
    time, lm_head and routers kept; the result reloaded and compared with the model before it is published."""
    if scheme not in TuneryClient.SCHEMES:
        err.print(f"[red]INVALID_ARGUMENT[/red]: --scheme {scheme!r}: one of {', '.join(TuneryClient.SCHEMES)}")
        raise typer.Exit(2)
    is_plan = model == "plan"
    target = planned if is_plan else model
    if not target or (planned and not is_plan):
        err.print("usage: tunery quantize MODEL --scheme S, or tunery quantize plan MODEL --scheme S")
        raise typer.Exit(2)
    kw = dict(calibration_dataset=calibration, samples=samples, max_seq_len=max_seq_len, ignore=ignore,
              group_size=group_size, name=name, memory_budget_bytes=parse_size(memory_budget, "--memory-budget"))
    c = client()
    if is_plan:
        p = rpc(c.plan_quantize, target, scheme, **kw)
        if OPTS["json"]:
            out.print_json(json.dumps(message_to_dict(p)))
            return
        out.print(f"{target} -> {scheme}: {p.quantized_modules} of {p.linear_modules} Linear layers quantized"
                  + (f", group size {p.spec.group_size}" if p.spec.group_size else ""))
        out.print(f"kept at full precision: {', '.join(p.ignore)}")
        if p.spec.calibration_dataset.uri:
            out.print(f"calibration: {p.spec.num_calibration_samples} conversations of "
                      f"{p.spec.calibration_dataset.uri} ({p.calibration_source}), up to "
                      f"{p.spec.calibration_max_seq_len} tokens each")
        out.print(f"peak memory: {p.memory}")
        out.print(f"size: {_gib(p.model_bytes)} -> ~{_gib(p.output_bytes)}; the largest node has "
                  f"{_gib(p.largest_node_bytes) if p.largest_node_bytes else 'unknown'} memory")
        for w in p.warnings:
            out.print(f"[yellow]warning[/yellow]: {w}")
        return
    job = rpc(c.submit_quantize, target, scheme, key=key, **kw)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        q = final.outputs[-1].uri
        m = rpc(c.get_artifact, q).metrics
        out.print(f"quantized model: {q}  ({_gib(m.get('output_bytes', 0))}, {m.get('compression_ratio', 0):.2f}x "
                  f"smaller; greedy agreement {m.get('greedy_agreement', 0):.0%}; peak RSS "
                  f"{_gib(m.get('quantize_peak_rss_bytes', 0))})")
