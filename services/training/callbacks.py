"""The trainer's link to the job: metrics events, checkpoints to the store, cancel (train environment)."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

from services.core.jobctx import JobContext
from services.training import checkpoints

METRIC_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "eval_loss": "eval_loss",
               "mean_token_accuracy": "token_accuracy", "eval_mean_token_accuracy": "eval_token_accuracy",
               "epoch": "epoch"}


def agree(reason: str | None) -> str | None:
    """With several workers, all stop at the same step if any was asked to (else DDP would hang)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return reason
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if reason is not None else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (reason or "cancelled on another worker") if int(flag.item()) else None


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class JobCallback(TrainerCallback):
    """Rank 0 only: turns the trainer's logs into metrics events (loss, lr, grad norm, tokens/s, step/total, ETA),
    uploads each checkpoint the trainer saves and prunes old ones, and stops at a step boundary with a
    checkpoint when the job is cancelled."""

    def __init__(self, ctx: JobContext, *, name: str, run_key: str, parents, keep: int, is_main: bool = True):
        self.ctx, self.name, self.run_key, self.parents, self.keep = ctx, name, run_key, parents, keep
        self.is_main = is_main
        self.cancel_reason: str | None = None
        self.uploaded: list[str] = []
        self._t0 = self._last_t = time.monotonic()
        self._last_tokens = 0.0
        self._first_step: int | None = None

    # ------------------------------------------------------------------ metrics
    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._last_t = time.monotonic()
        self._first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs:
            return
        now = time.monotonic()
        m = {out: float(logs[k]) for k, out in METRIC_KEYS.items() if k in logs and logs[k] is not None}
        if "loss" not in m and "eval_loss" not in m:  # the trainer's end-of-run summary: the adapter has it
            return
        tokens = float(logs.get("num_tokens", 0.0))
        if tokens and now > self._last_t and tokens >= self._last_tokens and self._last_tokens:
            m["tokens_per_s"] = (tokens - self._last_tokens) / (now - self._last_t)
        if tokens:
            m["num_tokens"] = tokens
            self._last_tokens, self._last_t = tokens, now
        done = state.global_step - (self._first_step or 0)
        if done > 0 and state.max_steps:
            rate = (now - self._t0) / done
            m["eta_s"] = rate * (state.max_steps - state.global_step)
        m["step"] = float(state.global_step)
        text = (f"step {state.global_step}/{state.max_steps}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k not in ("step", "num_tokens")))
        self.ctx.metrics(state.global_step, m, total_steps=state.max_steps, text=text)

    # ------------------------------------------------------------------ cancel
    def on_step_end(self, args, state, control, **kwargs):
        reason = self.ctx.cancel_requested(every_s=0.5)
        reason = agree(reason)
        if reason is not None and self.cancel_reason is None:
            self.cancel_reason = reason
            control.should_save = True
            control.should_training_stop = True
        return control

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its rng_state_<rank>.pth before rank 0 uploads the folder
        if not self.is_main:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        t0 = time.monotonic()
        manifest, uploaded, pruned = checkpoints.upload(
            self.ctx.artifacts, folder, name=self.name, step=state.global_step, job_id=self.ctx.job_id,
            run_key=self.run_key, parents=self.parents, keep=self.keep,
            metadata={"epoch": state.epoch, "max_steps": state.max_steps})
        self.uploaded.append(manifest.id)
        self.ctx.event(f"checkpoint at step {state.global_step}: {manifest.id} ({uploaded} bytes uploaded in "
                       f"{time.monotonic() - t0:.1f}s" + (f"; pruned {', '.join(pruned)}" if pruned else "") + ")",
                       type="artifact", artifact=manifest.ref(), step=state.global_step, total_steps=state.max_steps)
