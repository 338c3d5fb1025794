"""The held-out split: exact sizes, seeded and deterministic, stratified on request, disjoint from train."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from services.datagen.split import choose_holdout, group_size, write_split


def entries(n: int, labels: int = 0) -> list[tuple[str, str | None]]:
    return [(hashlib.sha256(str(i).encode()).hexdigest()[:16], f"l{i % labels}" if labels else None) for i in range(n)]


def test_sizes():
    assert [group_size(0.1, n) for n in (0, 1, 2, 9, 10, 15, 100)] == [0, 0, 1, 1, 1, 2, 10]
    assert group_size(0.0, 100) == 0 and group_size(0.5, 3) == 2
    assert len(choose_holdout(entries(60), 0.2, 7)) == 12


def test_deterministic_and_seeded():
    e = entries(500)
    a, b, c = choose_holdout(e, 0.1, 0), choose_holdout(list(reversed(e)), 0.1, 0), choose_holdout(e, 0.1, 1)
    assert a == b and len(a) == 50 and a != c and len(c) == 50


def test_stratified_per_label():
    e = entries(103, labels=3) + [("single", "rare"), ("pair-1", "two"), ("pair-2", "two")]
    held = choose_holdout(e, 0.1, 0)
    per_label = Counter(label for i, label in e if i in held)
    sizes = Counter(label for _, label in e)
    assert per_label == {label: group_size(0.1, n) for label, n in sizes.items() if group_size(0.1, n)}
    assert per_label["two"] == 1 and "rare" not in per_label


def test_write_split_is_disjoint_and_hashed(tmp_path):
    e = entries(50, labels=2)
    e.append(e[0])  # a kept duplicate (dedup_action="flag") follows its id
    src = tmp_path / "kept.jsonl"
    src.write_text("".join(json.dumps({"id": i, "label": label}) + "\n" for i, label in e))
    held = choose_holdout(e, 0.2, 3)
    r = write_split(src, e, held, tmp_path / "train.jsonl", tmp_path / "holdout.jsonl")
    train = [json.loads(x)["id"] for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    hold = [json.loads(x)["id"] for x in (tmp_path / "holdout.jsonl").read_text().splitlines()]
    assert not set(train) & set(hold) and set(hold) == held
    assert (r.num_train, r.num_holdout) == (len(train), len(hold)) and len(train) + len(hold) == 51
    assert r.train_sha256 == hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest()
    assert r.holdout_sha256 == hashlib.sha256((tmp_path / "holdout.jsonl").read_bytes()).hexdigest()
    assert sum(v["holdout"] for v in r.labels.values()) == len(hold)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holdout.jsonl", "kept.jsonl", "train.jsonl"]
