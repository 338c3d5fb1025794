"""prepare end to end on small files: counts, byte-identical reruns, no train/holdout on errors, progress,
length limits, dedup actions, stratification and every input kind."""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.datagen.prepare import PrepareOptions, prepare
from tests.unit.datagen.helpers import GOLDEN, alpaca, write_jsonl

WORDS = "apple river stone cloud maple violet copper lantern meadow harbor falcon ember quartz willow".split()


def stories(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = " ".join(rng.sample(WORDS, 4))
        rows.append({"instruction": f"Write one sentence about {topic} number {i}.", "input": "",
                     "output": f"The {topic} story {i} ends well {rng.randint(0, 10**6)}.",
                     "category": ["poem", "story", "fact"][i % 3]})
    return rows


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_counts_duplicates_and_split(tmp_path, tok):
    rows = stories(60)
    dup = dict(rows[5])
    dup["output"] += "!"  # a near duplicate of line 6
    rows += [dup, dict(rows[10])]  # and an exact one of line 11
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    r = prepare(src, tmp_path / "a", PrepareOptions(holdout_fraction=0.2, seed=7), tok)
    assert r.ok and r.detected_format == "alpaca"
    assert (r.num_input, r.num_exact_duplicates, r.num_near_duplicates, r.num_train, r.num_holdout) == (62, 1, 1, 48, 12)
    train, hold = lines(tmp_path / "a" / "train.jsonl"), lines(tmp_path / "a" / "holdout.jsonl")
    assert not {e["id"] for e in train} & {e["id"] for e in hold}
    assert all(e["messages"][-1]["role"] == "assistant" and e["source"]["format"] == "alpaca" for e in train)
    assert r.train_sha256 == hashlib.sha256((tmp_path / "a" / "train.jsonl").read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["holdout.jsonl", "report.html", "report.json",
                                                                  "train.jsonl"]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [(c["kind"], [line for line, _ in c["members"]]) for c in report["duplicate_clusters"]] == [
        ("near", [6, 61]), ("exact", [11, 62])]
    # the same input and options: byte-identical files; another seed: another split
    again = prepare(src, tmp_path / "b", PrepareOptions(holdout_fraction=0.2, seed=7), tok)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert (again.train_sha256, again.holdout_sha256) == (r.train_sha256, r.holdout_sha256)
    other = prepare(src, tmp_path / "c", PrepareOptions(holdout_fraction=0.2, seed=8), tok)
    assert other.holdout_sha256 != r.holdout_sha256 and other.num_holdout == 12


def test_errors_leave_no_split_files(tmp_path, tok):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", stories(20))
    assert prepare(good, out, PrepareOptions(), tok).ok and (out / "train.jsonl").exists()
    rows = [json.dumps(r) for r in stories(200)]
    for i in range(6, 200, 3):
        rows[i] = rows[i][:25]  # 65 truncated lines: 7, 10, 13, ...
    r = prepare(write_jsonl(tmp_path / "broken.jsonl", rows, raw=True), out,
                PrepareOptions(max_reported_problems=5), tok)
    assert not r.ok and r.num_errors == 65 and len(r.errors) == 5 and r.errors[0].line == 7
    assert r.summary() == "65 errors (first: broken.jsonl:7: not valid JSON (Unterminated string starting at column 17))"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # stale split files are gone too
    assert (r.num_train, r.num_holdout, r.train_sha256) == (0, 0, "")


def test_empty_file_and_min_examples(tmp_path, tok):
    (tmp_path / "e.jsonl").write_text("\n \n")
    r = prepare(tmp_path / "e.jsonl", tmp_path / "o1", PrepareOptions(), tok)
    assert not r.ok and [str(p) for p in r.errors] == ["e.jsonl: the file is empty",
                                                       "e.jsonl: 0 usable examples after validation and "
                                                       "deduplication; min_examples is 1"]
    r = prepare(write_jsonl(tmp_path / "few.jsonl", stories(3)), tmp_path / "o2", PrepareOptions(min_examples=5), tok)
    assert not r.ok and r.summary().startswith("1 error (first: few.jsonl: 3 usable examples")


def test_record_errors_name_line_and_field(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"},
                          {"role": "assistant", "content": "!"}]},
            {"instruction": "alpaca in a chat file", "output": "x"}]
    r = prepare(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "o", PrepareOptions(), tok)
    assert [str(p) for p in r.errors] == [
        "c.jsonl:2: messages[0].role: a conversation starts with system or user, not assistant",
        "c.jsonl:3: does not fit the file's format chat: expected messages (a list of {role, content}); optional "
        "tools; got instruction, output"]
    r = prepare(tmp_path / "c.jsonl", tmp_path / "o", PrepareOptions(format="alpaca"), tok)
    assert r.num_errors == 2 and r.errors[0].line == 1


def test_progress_every_1000_records(tmp_path, tok):
    calls = []
    src = write_jsonl(tmp_path / "p.jsonl", [alpaca(i) for i in range(2500)])
    r = prepare(src, tmp_path / "o", PrepareOptions(dedup="exact"), tok, on_progress=lambda n, m: calls.append((n, m)))
    assert r.ok and [n for n, _ in calls] == [1000, 2000, 2500]
    assert calls[-1][1] == "read: 2,500 records, 2,500 kept, 0 errors, 0 warnings"


def test_too_long_examples(tmp_path, tok):
    rows = [alpaca(i, "word " * (i % 2) * 50) for i in range(20)]
    src = write_jsonl(tmp_path / "l.jsonl", rows)
    r = prepare(src, tmp_path / "o", PrepareOptions(max_tokens=40), tok)
    assert r.ok and r.num_too_long == 10 and r.num_train + r.num_holdout == 20
    assert r.warnings[0].line == 2 and "above max_tokens 40; training will truncate it" in r.warnings[0].message
    r = prepare(src, tmp_path / "o", PrepareOptions(max_tokens=40, drop_too_long=True), tok)
    assert r.ok and r.num_dropped == 10 and r.num_train + r.num_holdout == 10
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["stats"]["tokens"]["prompt"]["max"] + report["stats"]["tokens"]["response"]["max"] <= 40


def test_flag_keeps_duplicates_in_one_split(tmp_path, tok):
    rows = stories(30)
    rows += [rows[i] for i in range(0, 30, 2)]
    r = prepare(write_jsonl(tmp_path / "f.jsonl", rows), tmp_path / "o",
                PrepareOptions(dedup_action="flag", holdout_fraction=0.3), tok)
    assert r.ok and r.num_exact_duplicates == 15 and r.num_train + r.num_holdout == 45
    assert sum("kept (dedup_action=flag)" in w.message for w in r.warnings) == 15
    train, hold = lines(tmp_path / "o" / "train.jsonl"), lines(tmp_path / "o" / "holdout.jsonl")
    assert not {e["id"] for e in train} & {e["id"] for e in hold}


def test_stratified(tmp_path, tok):
    r = prepare(write_jsonl(tmp_path / "s.jsonl", stories(90)), tmp_path / "o",
                PrepareOptions(stratify_field="category", holdout_fraction=0.2), tok)
    hold = lines(tmp_path / "o" / "holdout.jsonl")
    assert r.ok and sorted(e["label"] for e in hold) == ["fact"] * 6 + ["poem"] * 6 + ["story"] * 6
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["labels"] == {k: {"train": 24, "holdout": 6} for k in ("fact", "poem", "story")}
    r = prepare(write_jsonl(tmp_path / "m.jsonl", stories(5) + [alpaca(9)]), tmp_path / "o",
                PrepareOptions(stratify_field="category"), tok)
    assert [str(p) for p in r.errors] == ["m.jsonl:6: category: is missing (the split is stratified on it)"]


@pytest.mark.parametrize("kind", ["csv", "json", "parquet"])
def test_every_file_kind(tmp_path, tok, kind):
    rows = stories(30)
    path = tmp_path / f"d.{kind}"
    if kind == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    r = prepare(path, tmp_path / "o", PrepareOptions(holdout_fraction=0.1), tok)
    assert r.ok and r.detected_format == "alpaca" and (r.num_train, r.num_holdout) == (27, 3)
    first = sorted(lines(tmp_path / "o" / "train.jsonl") + lines(tmp_path / "o" / "holdout.jsonl"),
                   key=lambda e: e["source"]["line"])[0]
    assert first["source"] == {"format": "alpaca", "file": path.name, "line": 2 if kind == "csv" else 1}


def test_preference_and_tools(tmp_path, tok):
    r = prepare(GOLDEN / "preference.jsonl", tmp_path / "p", PrepareOptions(holdout_fraction=0.0), tok)
    assert r.ok and r.num_train == 2 and r.detected_format == "preference"
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["sample"][0]["text"].endswith("<|im_start|>assistant\n13 is a prime number between 10 and 20."
                                                "<|im_end|>\n")
    assert "15 is a prime" in report["sample"][0]["rejected_text"]
    r = prepare(GOLDEN / "chat.jsonl", tmp_path / "c", PrepareOptions(holdout_fraction=0.0), tok)
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert r.ok and report["stats"]["tool_calls"] == {"get_weather": 1}
    assert report["stats"]["tools_declared"] == {"get_weather": 1}
    assert report["stats"]["roles"] == {"assistant": 4, "system": 1, "tool": 1, "user": 3}


def test_empty_replies_are_dropped_by_default_and_kept_on_request(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"Tell story {i} about a {w}"},
                          {"role": "assistant", "content": f"Once, a {w} number {i} went {i * 3 % 7} miles."}]}
            for i, w in enumerate(["cat", "dog", "owl", "fox", "bee"] * 4)]
    for i in (3, 9):
        rows[i] = {"messages": [{"role": "user", "content": f"Say something about {i}"},
                                {"role": "assistant", "content": "   "}]}
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    r = prepare(src, tmp_path / "a", PrepareOptions(holdout_fraction=0.0), tok)
    assert r.ok and r.num_train == 18
    kept = lines(tmp_path / "a" / "train.jsonl")
    assert all(e["messages"][-1]["content"].strip() for e in kept)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [(p["line"], p["message"]) for p in report["problems"]] == [
        (4, "the assistant reply is empty; dropped (keep_empty_replies to keep it)"),
        (10, "the assistant reply is empty; dropped (keep_empty_replies to keep it)")]
    assert report["counts"]["dropped"] == 2
    keep = prepare(src, tmp_path / "b", PrepareOptions(holdout_fraction=0.0, keep_empty_replies=True), tok)
    assert keep.ok and keep.num_train == 20
