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
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from services.core.jobctx import JobCancelled, JobContext, run_job
from services.training import checkpoints
from services.training.spec import TrainingJobSpec

DATA_FILES = ("train.jsonl", "holdout.jsonl")


def fit(ctx: JobContext, spec: TrainingJobSpec, model_dir: Path, data_dir: Path, out: Path,
        resume: Path | None, *, is_main: bool = True) -> dict[str, Any]:
    """Load, wrap and train; returns what save needs. Runs in the driver (one worker) or in each Ray Train
    worker (several): the same code, the trainer finds torch.distributed already set up by Ray Train."""
    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    from services.training.callbacks import JobCallback
    from services.training.sft import (
        load_data,
        load_model,
        packed_micro_batch,
        select_device,
        sft_config,
        tracking_env,
    )

    device = select_device(spec.device)
    torch.manual_seed(spec.seed)
    os.environ.update(tracking_env(spec))
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_data(data_dir, tokenizer, spec)
    model, dtype = load_model(model_dir, spec, device)
    trainable, total = model.get_nb_trainable_parameters()
    if is_main:
        ctx.event(f"{spec.method} on {device} ({str(dtype).removeprefix('torch.')}): {trainable:,} trainable of "
                  f"{total:,} parameters, modules {', '.join(spec.lora.target_modules) or 'all-linear'}; "
                  f"{data.num_examples} examples, {data.num_tokens:,} tokens, loss on "
                  f"{'every assistant turn' if data.assistant_markers else 'the final assistant turn'}"
                  + (", packed" if spec.packing else ""))
    callback = JobCallback(ctx, name=spec.checkpoint_name(ctx.job_id), run_key=spec.run_key(),
                           parents=[spec.base_model, spec.dataset], keep=spec.keep_checkpoints, is_main=is_main)
    rows = packed_micro_batch(spec, data.num_tokens / max(data.num_examples, 1))
    if rows != spec.micro_batch_size and is_main:
        ctx.event(f"packing: {rows} packed row(s) of {spec.max_seq_len} tokens per micro-batch hold about "
                  f"{spec.micro_batch_size} examples")
    run_spec = spec.model_copy(update={"micro_batch_size": rows})
    trainer = SFTTrainer(model=model, args=sft_config(run_spec, out, device, dtype, has_eval=data.eval is not None),
                         train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                         callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the job's own events replace the printed dicts
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - t0
    if callback.cancel_reason is not None:
        return {"cancelled": callback.cancel_reason, "step": trainer.state.global_step}
    final = out / "adapter"
    if is_main:
        trainer.save_model(str(final))
        tokenizer.save_pretrained(str(final))
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    return {
        "step": trainer.state.global_step, "max_steps": trainer.state.max_steps, "seconds": seconds,
        "train_loss": float(result.training_loss), "final_loss": float(losses[-1]) if losses else float("nan"),
        "eval_loss": float(evals[-1]) if evals else None, "num_tokens": float(tokens),
        "trainable_parameters": int(trainable), "total_parameters": int(total), "device": device,
        "dtype": str(dtype).removeprefix("torch."), "assistant_markers": data.assistant_markers,
        "num_examples": data.num_examples, "log_history": history,
    }


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
