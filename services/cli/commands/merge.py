"""`tunery merge BASE ADAPTER`: an adapter merged into its full-precision base, checked equal to base + adapter."""

from __future__ import annotations

import re

import typer

from services.cli.console import OPTS, client, err, follow, out, rpc
from services.gen.tunery.v1 import common_pb2 as pb

DTYPES = {"auto": pb.PRECISION_UNSPECIFIED, "fp32": pb.PRECISION_FP32, "bf16": pb.PRECISION_BF16,
          "fp16": pb.PRECISION_FP16}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str) -> int:
    """'2GB', '512MiB', '1500000' -> bytes ('' or '0': the service's default)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text or "0")
    if not m or m.group(2).upper() not in UNITS:
        err.print(f"[red]INVALID_ARGUMENT[/red]: {option} {text!r}: give a size such as 2GB, 512MiB or 1500000")
        raise typer.Exit(2)
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def merge(
    base: str = typer.Argument(..., help="The full-precision base model artifact the adapter was trained on."),
    adapter: str = typer.Argument(..., help="The adapter artifact."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's), fp32, bf16 or fp16."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="The largest output shard, e.g. 2GB."),
    memory_budget: str = typer.Option("0", "--memory-budget", help="Refuse if the merge would need more, e.g. 8GB."),
    name: str = typer.Option("", help="Artifact name (default <adapter>-merged)."),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Merge an adapter into its base, shard by shard in bounded memory; publish it only if it answers like base +
    adapter (a progress bar per shard, then the equivalence figures)."""
    if dtype not in DTYPES:
        err.print(f"--dtype must be one of {', '.join(DTYPES)}")
        raise typer.Exit(2)
    c = client()
    job = rpc(c.submit_merge, base, adapter, output_dtype=DTYPES[dtype],
              max_shard_bytes=parse_size(max_shard_size, "--max-shard-size"),
              memory_budget_bytes=parse_size(memory_budget, "--memory-budget"), name=name, key=key)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        merged = final.outputs[-1].uri
        m = rpc(c.get_artifact, merged).metrics
        out.print(f"merged model: {merged}  (max |Δlogit| {m.get('max_abs_logit_diff', 0):.3g}, mean KL "
                  f"{m.get('mean_kl', 0):.3g}, greedy identical {m.get('greedy_identical', 0):.0f}/"
                  f"{m.get('probe_prompts', 0):.0f}; peak RSS {m.get('merge_peak_rss_bytes', 0) / 2**20:.0f} MiB)")
