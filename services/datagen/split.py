"""Deterministic, seeded, optionally stratified held-out split; streaming over a JSONL of kept examples.

Pass 1 (the caller) keeps (id, label) per example. `choose_holdout` picks, per label group, round(fraction * n) ids
(at least 1 when the group has two or more and fraction > 0) in the order of sha256(f"{seed}:{id}"); the rest is
train. Copies of an id (kept duplicates, dedup_action="flag") follow their id, so held-out ids never occur in
train. `write_split` streams the file into train.jsonl / holdout.jsonl in input order and hashes both.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

CHUNK = 4 * 1024 * 1024


class SplitResult(BaseModel):
    num_train: int
    num_holdout: int
    train_sha256: str
    holdout_sha256: str
    labels: dict[str, dict[str, int]] = {}  # label -> {"train": n, "holdout": n} (stratified splits)


def _order(seed: int, example_id: str) -> str:
    return hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()


def group_size(fraction: float, n: int) -> int:
    k = round(fraction * n)
    if k == 0 and n >= 2 and fraction > 0:
        k = 1
    return min(k, n)


def choose_holdout(entries: Sequence[tuple[str, str | None]], fraction: float, seed: int) -> set[str]:
    """The held-out ids among (id, label) entries. A repeated id counts once, in the group of its first entry."""
    groups: dict[str | None, list[str]] = {}
    seen: set[str] = set()
    for example_id, label in entries:
        if example_id not in seen:
            seen.add(example_id)
            groups.setdefault(label, []).append(example_id)
    held: set[str] = set()
    for ids in groups.values():
        k = group_size(fraction, len(ids))
        if k:
            held.update(sorted(ids, key=lambda i: _order(seed, i))[:k])
    return held


def write_split(src: Path, entries: Sequence[tuple[str, str | None]], held: set[str], train_path: Path,
                holdout_path: Path) -> SplitResult:
    """Copy src's lines (one per entry, in order) into the two files; each is written under a temporary name and
    renamed once complete."""
    hashes = {"train": hashlib.sha256(), "holdout": hashlib.sha256()}
    counts = {"train": 0, "holdout": 0}
    labels: dict[str, dict[str, int]] = {}
    tmp = {"train": train_path.with_name(f".{train_path.name}.tmp"),
           "holdout": holdout_path.with_name(f".{holdout_path.name}.tmp")}
    try:
        with open(src, "rb") as f, open(tmp["train"], "wb") as train, open(tmp["holdout"], "wb") as hold:
            out = {"train": train, "holdout": hold}
            n = 0
            for line in f:
                if n >= len(entries):
                    raise ValueError(f"{src} has more lines than the {len(entries)} entries given")
                example_id, label = entries[n]
                n += 1
                side = "holdout" if example_id in held else "train"
                out[side].write(line)
                hashes[side].update(line)
                counts[side] += 1
                if label is not None:
                    per = labels.setdefault(label, {"train": 0, "holdout": 0})
                    per[side] += 1
            if n != len(entries):
                raise ValueError(f"{src} has {n} lines for {len(entries)} entries")
        os.replace(tmp["train"], train_path)
        os.replace(tmp["holdout"], holdout_path)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return SplitResult(num_train=counts["train"], num_holdout=counts["holdout"],
                       train_sha256=hashes["train"].hexdigest(), holdout_sha256=hashes["holdout"].hexdigest(),
                       labels=dict(sorted(labels.items())))
