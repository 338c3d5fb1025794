"""Training checkpoints in the artifact store: one `checkpoint` artifact per save, named for the run
(`ckpt-<run key>`), so a re-submitted spec finds them; the last K kept. No torch.

A checkpoint is the trainer's checkpoint folder as written by transformers' Trainer: the adapter, optimizer.pt,
scheduler.pt, rng_state*.pth and trainer_state.json (global step, hence the data position the Trainer skips to
on resume). It becomes visible only when its manifest is written, after every file is uploaded, so a job killed
mid-upload leaves the previous checkpoint as the latest.

Retention holds at every instant, a kill included: with keep=K, the oldest checkpoints beyond K-1 are deleted
after the new one's files are uploaded and before its manifest makes it visible, so a run never lists more than
K and always lists at least one complete checkpoint (K=1 is the exception: the only checkpoint is deleted just
after its successor is visible, so for that instant two are listed).
"""

from __future__ import annotations

from pathlib import Path

from services.core.artifacts import ArtifactRef, ArtifactStore, Manifest


def checkpoints(artifacts: ArtifactStore, name: str) -> list[Manifest]:
    """A run's checkpoints, oldest step first."""
    out, after = [], ""
    while True:
        page, after = artifacts.list("checkpoint", name, after=after, limit=200)
        out += page
        if not after:
            break
    return sorted(out, key=lambda m: (int(m.metadata.get("step", 0)), m.created_at))


def latest(artifacts: ArtifactStore, name: str) -> Manifest | None:
    found = checkpoints(artifacts, name)
    return found[-1] if found else None


def upload(artifacts: ArtifactStore, folder: Path, *, name: str, step: int, job_id: str, run_key: str,
           parents: list[ArtifactRef], keep: int, metadata: dict | None = None) -> tuple[Manifest, int, list[str]]:
    """Upload a checkpoint folder and prune the run to its newest `keep`; returns (manifest, bytes, pruned ids)."""
    writer = artifacts.writer("checkpoint", name, parents=parents, job_id=job_id)
    for _ in writer.add_dir(folder):
        pass
    pruned = prune(artifacts, name, keep - 1) if keep > 1 else []
    manifest, _ = writer.commit({"step": step, "run_key": run_key, "job_id": job_id, **(metadata or {})},
                                {"step": float(step)})
    if keep <= 1:
        pruned += prune(artifacts, name, keep)
    return manifest, writer.bytes_uploaded, pruned


def prune(artifacts: ArtifactStore, name: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints of a run; returns the deleted ids."""
    found = checkpoints(artifacts, name)
    doomed = found[:-keep] if keep > 0 else found
    for m in doomed:
        artifacts.delete(m.id)
    return [m.id for m in doomed]
