"""The merge job: `python -m services.merging.job <spec-uri>` (train environment).

merging.merge: setup (materialise the base and the adapter, the probe prompts from the adapter's held-out split)
-> run (the streaming merge, shard by shard: services.merging.merge; then the equivalence check in its own process:
services.merging.equivalence) -> save (a `model` artifact, form merged: the shards and their index, the base's
tokenizer, chat template and generation config, a model card; parents the base and the adapter) only when the check
passed. A failed check fails the job and commits nothing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.core.jobctx import JobContext, run_job
from services.core.memory import PeakRss
from services.core.processes import die_with_parent
from services.core.settings import REPO_ROOT
from services.merging.spec import MergeSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", "tunery_fixture.json"}


@dataclass
class Inputs:
    base_dir: Path
    adapter_dir: Path
    conversations: list
    base_uri: str
    adapter_uri: str
    dataset_uri: str
    training_spec: dict
    report_uri: str


def setup(ctx: JobContext, spec: MergeSpec) -> Inputs:
    from services.merging.equivalence import probe_conversations

    cache = ctx.settings.cache_dir
    base = ctx.artifacts.resolve(spec.base_model)
    adapter = ctx.artifacts.resolve(spec.adapter)
    holdout = None
    if spec.probe_dataset is not None:
        data = ctx.artifacts.resolve(spec.probe_dataset)
        if "holdout.jsonl" in {f.path for f in data.files}:
            holdout = ctx.artifacts.materialize(data.ref(), cache, paths=["holdout.jsonl"]) / "holdout.jsonl"
    conversations = probe_conversations(holdout, spec.num_probe_prompts)
    source = "from the adapter's held-out split" if holdout else "from a fixed set"
    ctx.event(f"merging {adapter.id} ({adapter.metadata.get('method', 'lora')}, r={adapter.metadata.get('rank', '?')}) "
              f"into {base.id} as {spec.output_dtype}; {len(conversations)} probe prompts {source}")
    if adapter.metadata.get("method") == "qlora":
        ctx.event("a QLoRA adapter: trained against the 4-bit quantization of this base, merged into its "
                  f"{spec.output_dtype} weights (the merged model is the adapter on the full-precision base, not on "
                  "the 4-bit one it was trained against)", level="warning")
    return Inputs(ctx.artifacts.materialize(base.ref(), cache), ctx.artifacts.materialize(adapter.ref(), cache),
                  conversations, base.uri, adapter.uri, adapter.metadata.get("dataset", ""),
                  adapter.metadata.get("spec") or {}, latest_report_of(ctx, adapter))


def latest_report_of(ctx: JobContext, adapter) -> str:
    """The newest eval report made from the adapter (a parent of the report), for the model card; "" if none."""
    found, after = [], ""
    while True:
        page, after = ctx.artifacts.list("report", after=after, limit=200)
        found += [m for m in page if adapter.ref() in m.parents and m.metadata.get("report") == "eval"]
        if not after:
            break
    return max(found, key=lambda m: m.created_at).uri if found else ""


def copy_companions(base_dir: Path, out: Path) -> list[str]:
    """The base's files that are not weights (tokenizer, chat template, generation config), as they are."""
    copied = []
    for p in sorted(base_dir.rglob("*")):
        rel = p.relative_to(base_dir).as_posix()
        if p.is_file() and not p.name.startswith(".") and p.suffix not in WEIGHT_SUFFIXES and rel not in SKIP_FILES \
                and rel != "config.json":
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, out / rel)
            copied.append(rel)
    return copied


def run_check(inputs: Inputs, merged: Path, spec: MergeSpec, work: Path) -> dict:
    prompts, result = work / "prompts.json", work / "equivalence.json"
    prompts.write_text(json.dumps(inputs.conversations))
    cmd = [sys.executable, "-m", "services.merging.equivalence", "--base", str(inputs.base_dir), "--adapter",
           str(inputs.adapter_dir), "--merged", str(merged), "--prompts", str(prompts), "--dtype", spec.output_dtype,
           "--greedy-tokens", str(spec.greedy_tokens), "--out", str(result)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          preexec_fn=die_with_parent if sys.platform == "linux" else None)
    if proc.returncode != 0:
        raise RuntimeError(f"the equivalence check crashed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(result.read_text())


def model_card(spec: MergeSpec, inputs: Inputs, figures: dict, result) -> str:
    t = inputs.training_spec
    lines = [f"# {spec.name}", "",
             f"A merged model made by Tunery: the adapter `{inputs.adapter_uri}` folded into its base "
             f"`{inputs.base_uri}`, in {spec.output_dtype}.", "",
             "| | |", "|---|---|",
             f"| base | `{inputs.base_uri}` |", f"| adapter | `{inputs.adapter_uri}` |",
             f"| training data | `{inputs.dataset_uri or 'unknown'}` |",
             f"| method | {t.get('method', '?')}, rank {(t.get('lora') or {}).get('rank', '?')}, modules "
             f"{', '.join((t.get('lora') or {}).get('target_modules') or []) or '?'} |",
             f"| eval report of the adapter | `{inputs.report_uri or 'none yet'}` |",
             f"| tensors merged / replaced / copied | {len(result.merged)} / {len(result.replaced)} / {result.copied} |",
             "", "## Equal to base + adapter", "",
             f"Checked on {figures['prompts']} prompts in {spec.output_dtype} before publishing: largest logit "
             f"difference {figures['max_abs_logit_diff']:.3g} (tolerance {figures['tolerance']['max_abs_logit']:g}), "
             f"mean KL {figures['mean_kl']:.3g} (tolerance {figures['tolerance']['mean_kl']:g}), greedy "
             f"continuations identical on {figures['greedy_identical']} of {figures['prompts']}"
             + (f" ({figures['greedy_ties']} differ only at a tie)" if figures["greedy_ties"] else "") + ".", ""]
    if t:
        lines += ["## Training spec", "", "```json", json.dumps(t, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def merge_job(ctx: JobContext, spec: MergeSpec) -> None:
    from services.core.modeldir import inspect_model
    from services.merging.merge import load_adapter, merge

    # setup
    inputs = setup(ctx, spec)
    work = Path(tempfile.mkdtemp(prefix="tunery-merge-"))
    out = work / "merged"
    out.mkdir()
    try:
        # run: the streaming merge
        t0 = time.monotonic()

        def on_shard(i: int, n: int, written: int) -> None:
            ctx.check_cancelled()
            ctx.metrics(i, {"shard": float(i), "bytes_written": float(written), "rss_bytes": float(PeakRss.now())},
                        total_steps=n + 1, text=f"writing shard {i} of {n}; {written / 2**20:.1f} MiB written")

        with PeakRss() as rss:
            result = merge(inputs.base_dir, load_adapter(inputs.adapter_dir), out, spec.output_dtype,
                           spec.max_shard_bytes, on_shard)
        merge_s = time.monotonic() - t0
        job_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the job process's whole life so far
        companions = copy_companions(inputs.base_dir, out)
        ctx.event(f"merged: {len(result.merged)} tensors by PEFT's merge, {len(result.replaced)} replaced, "
                  f"{result.copied} copied; {len(result.shards)} shards, {result.bytes_written / 2**20:.1f} MiB in "
                  f"{merge_s:.1f}s, peak RSS {rss.peak / 2**20:.0f} MiB (planned {spec.planned_peak_bytes / 2**20:.0f})"
                  + ("; tied embeddings untied (the adapter changes one side)" if result.untied else ""),
                  metrics={"merge_peak_rss_bytes": float(rss.peak), "bytes_written": float(result.bytes_written)})
        # run: equal to base + adapter?
        ctx.phase("checking the merged model against base + adapter")
        ctx.check_cancelled()
        t1 = time.monotonic()
        figures = run_check(inputs, out, spec, work)
        check_s = time.monotonic() - t1
        metrics = {"max_abs_logit_diff": figures["max_abs_logit_diff"], "mean_kl": figures["mean_kl"],
                   "greedy_identical": float(figures["greedy_identical"]), "probe_prompts": float(figures["prompts"]),
                   "greedy_ties": float(figures["greedy_ties"]), "merge_peak_rss_bytes": float(rss.peak),
                   "job_peak_rss_bytes": float(job_peak), "planned_peak_bytes": float(spec.planned_peak_bytes),
                   "check_peak_rss_bytes": float(figures["peak_rss_bytes"]), "merge_s": merge_s, "check_s": check_s,
                   "shards": float(len(result.shards)), "bytes_written": float(result.bytes_written)}
        ctx.event(f"equivalence on {figures['prompts']} prompts ({spec.output_dtype}): max |Δlogit| "
                  f"{figures['max_abs_logit_diff']:.3g}, mean KL {figures['mean_kl']:.3g}, greedy identical "
                  f"{figures['greedy_identical']}/{figures['prompts']}", type="metrics",
                  metrics={k: metrics[k] for k in ("max_abs_logit_diff", "mean_kl", "greedy_identical")},
                  step=len(result.shards) + 1, total_steps=len(result.shards) + 1)
        if not figures["passed"]:
            first = figures["failures"][0]
            ctx.fail(f"the merged model differs from base + adapter on prompt {first['prompt']} "
                     f"({first['text'][-160:]!r}): {'; '.join(first['why'])}; nothing was published")
        # save
        # the figures as the artifact keeps them: what was compared, not how this run went (its memory is in the
        # metrics), so the same merge twice is the same artifact
        (out / "equivalence.json").write_text(json.dumps({k: v for k, v in figures.items() if k != "peak_rss_bytes"},
                                                         indent=1))
        (out / "README.md").write_text(model_card(spec, inputs, figures, result))
        writer = ctx.writer("model", spec.name, parents=[spec.base_model, spec.adapter])
        for _ in writer.add_dir(out):
            pass
        metadata = inspect_model(out, allow_trust_remote_code=False) | {
            "form": "merged", "base_model": inputs.base_uri, "adapter": inputs.adapter_uri,
            "merged_dtype": spec.output_dtype, "untied_embeddings": result.untied, "companions": companions,
            "merged_tensors": len(result.merged), "replaced_tensors": len(result.replaced)}
        ctx.commit(writer, metadata=metadata, metrics=metrics)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    run_job("merging", {"merging.merge": (merge_job, MergeSpec)})


if __name__ == "__main__":
    main()
