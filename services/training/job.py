"""The training job: `python -m services.training.job <spec-uri>` (train environment).

training.sft: setup (materialise the base and the prepared dataset's splits, tokenize with the base's chat
template, load the model, 4-bit for QLoRA, wrap it with the adapter, find the run's latest checkpoint) -> run
(TRL SFTTrainer; metrics events, checkpoints to the store, cancel at a step boundary with a checkpoint) ->
save (an `adapter` artifact: PEFT files, tokenizer, metrics, loss curve, TensorBoard logs, lineage).

With num_workers > 1 the run step goes through Ray Train's TorchTrainer (services.training.distributed);
setup and save stay here, on the driver.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from services.core.jobctx import JobCancelled, JobContext, run_job
from services.training import checkpoints
from services.training.spec import TrainingJobSpec

DATA_FILES = ("train.jsonl", "holdout.jsonl")


def train(ctx: JobContext, spec: TrainingJobSpec) -> None:
    from services.training.sft import hardware, library_versions, loss_curve_png

    # setup
    ctx.stop_gracefully_on_sigterm()
    cache = ctx.settings.cache_dir
    base = ctx.artifacts.resolve(spec.base_model)
    dataset = ctx.artifacts.resolve(spec.dataset)
    model_dir = ctx.artifacts.materialize(base.ref(), cache)
    data_dir = ctx.artifacts.materialize(dataset.ref(), cache, paths=DATA_FILES)
    work = Path(tempfile.mkdtemp(prefix="tunery-train-"))
    out = work / "run"
    out.mkdir()
    resume_from = checkpoints.latest(ctx.artifacts, spec.checkpoint_name(ctx.job_id))
    resume = None
    if resume_from is not None:
        step = int(resume_from.metadata["step"])
        resume = out / f"checkpoint-{step}"
        shutil.copytree(ctx.artifacts.materialize(resume_from.ref(), cache), resume)
        ctx.event(f"resuming from checkpoint {resume_from.id} at step {step} (written by job "
                  f"{resume_from.metadata.get('job_id', '?')})", step=step)
    try:
        # run
        if spec.num_workers > 1:
            from services.training.distributed import fit_distributed

            result = fit_distributed(ctx, spec, model_dir, data_dir, out, resume)
        else:
            from services.training.sft import fit

            result = fit(ctx, spec, model_dir, data_dir, out, resume)
        if "cancelled" in result:
            raise JobCancelled(f"{result['cancelled']}; checkpoint at step {result['step']} kept, submit the "
                               "same spec again to resume")
        # save
        adapter = out / "adapter"
        history = result.pop("log_history")
        (adapter / "training_log.json").write_text(json.dumps(history, indent=1))
        loss_curve_png(history, adapter / "loss_curve.png", f"{spec.name}: {spec.method} r={spec.lora.rank}")
        tb = out / "tensorboard"
        if tb.is_dir():
            shutil.copytree(tb, adapter / "tensorboard")
        writer = ctx.writer("adapter", spec.name, parents=[base.ref(), dataset.ref()])
        for _ in writer.add_dir(adapter):
            pass
        metrics = {k: float(result[k]) for k in ("train_loss", "final_loss", "num_tokens", "seconds", "step")}
        if result["eval_loss"] is not None:
            metrics["eval_loss"] = float(result["eval_loss"])
        metrics["tokens_per_s"] = metrics["num_tokens"] / max(metrics["seconds"], 1e-9)
        ctx.commit(writer, metadata={
            "method": spec.method, "base_model": base.uri, "dataset": dataset.uri,
            "base_architecture": base.metadata.get("architecture", ""), "spec": spec.model_dump(mode="json"),
            "run_key": spec.run_key(), "resumed_from": resume_from.id if resume_from else "",
            "seed": spec.seed, "libraries": library_versions(), "hardware": hardware(result["device"]),
            "dtype": result["dtype"], "trainable_parameters": result["trainable_parameters"],
            "total_parameters": result["total_parameters"], "num_examples": result["num_examples"],
            "loss_on": "assistant turns" if result["assistant_markers"] else "final assistant turn",
            "target_modules": spec.lora.target_modules, "rank": spec.lora.rank, "alpha": spec.lora.alpha,
        }, metrics=metrics)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    run_job("training", {"training.sft": (train, TrainingJobSpec)})


if __name__ == "__main__":
    main()
