"""Checkpoint retention holds at every instant, a kill between publish and prune included.

A SIGKILLed training job once listed keep+1 checkpoints: the new one was published, the oldest not yet
deleted. Here every store operation is a possible kill point: the listing seen at each one has at most `keep`
complete checkpoints and at least one, so the run stays resumable and within its retention.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.artifacts import ArtifactStore
from services.core.store import LocalObjectStore
from services.training import checkpoints


class Killed(Exception):
    pass


class KillAfter(LocalObjectStore):
    """A local object store whose process 'dies' after the n-th write or delete."""

    def __init__(self, root: Path, n: int):
        super().__init__(root)
        self.left = n

    def _tick(self):
        self.left -= 1
        if self.left < 0:
            raise Killed

    def put_file(self, *a, **k):
        self._tick()
        return super().put_file(*a, **k)

    def put_bytes(self, *a, **k):
        self._tick()
        return super().put_bytes(*a, **k)

    def delete(self, *a, **k):
        self._tick()
        return super().delete(*a, **k)


def _folder(tmp: Path, step: int) -> Path:
    d = tmp / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (d / "optimizer.pt").write_bytes(bytes([step]) * 64)
    return d


def _save(store: ArtifactStore, tmp: Path, step: int, keep: int):
    return checkpoints.upload(store, _folder(tmp, step), name="ckpt-run", step=step, job_id="j", run_key="k",
                              parents=[], keep=keep)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_a_kill_at_any_store_operation_leaves_between_one_and_keep(tmp_path, keep):
    limit = keep if keep > 1 else 2  # keep=1 cannot delete the only checkpoint before its successor is visible
    seen = set()
    for n in range(0, 60):
        root = tmp_path / f"s{n}"
        objects = KillAfter(root, 10**9)
        store = ArtifactStore(objects, "p")
        for step in range(1, keep + 2):  # a run already at its retention
            _save(store, tmp_path, step * 6, keep)
        assert len(checkpoints.checkpoints(store, "ckpt-run")) == keep
        objects.left = n
        try:
            _save(store, tmp_path, 99, keep)
            done = True
        except Killed:
            done = False
        after = checkpoints.checkpoints(ArtifactStore(LocalObjectStore(root), "p"), "ckpt-run")
        assert 1 <= len(after) <= limit, (n, [m.metadata["step"] for m in after])
        for m in after:  # every listed checkpoint is complete
            assert {f.path for f in m.files} == {"trainer_state.json", "optimizer.pt"}
        seen.add(done)
        if done:
            assert len(after) == keep and after[-1].metadata["step"] == 99
            break
    assert seen == {False, True}  # some kill points were inside the save, and the last save completed
