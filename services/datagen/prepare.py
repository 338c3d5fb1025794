"""prepare: one dataset file in; a clean, deduplicated, split dataset in the canonical chat schema and its report out.

Two streaming passes, so memory holds only ids, digests, MinHash signatures and per-example token counts:

1. read -> normalise -> validate -> measure (the base model's tokenizer and chat template) -> deduplicate, writing
   each kept canonical example to a temporary JSONL and keeping (id, label);
2. split that file into train.jsonl / holdout.jsonl (services.datagen.split), hashing both.

Deterministic: the same input and options give byte-identical train/holdout files. With any error, report.json and
report.html are still written, but no train/holdout file is left in out_dir and the result is not ok.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.datagen import formats
from services.datagen.chat_tokenizer import ChatTokenizer
from services.datagen.dedup import Deduplicator, cluster_dicts, normalised_text
from services.datagen.report import (
    MAX_CLUSTERS,
    MAX_FLAGGED,
    SAMPLE_SIZE,
    Reservoir,
    Stats,
    render_sample,
    write_report,
)
from services.datagen.spec import PrepareOptions  # one definition, shared with the job spec
from services.datagen.split import choose_holdout, write_split
from services.datagen.validate import (
    EMPTY_REPLY,
    Problem,
    ProblemLog,
    check_count,
    check_example,
    check_length,
    error,
    token_lengths,
    warning,
)


PROGRESS_EVERY = 1000


class PrepareResult(BaseModel):
    ok: bool
    detected_format: str = ""
    num_input: int = 0
    num_parsed: int = 0
    num_errors: int = 0
    num_warnings: int = 0
    num_exact_duplicates: int = 0
    num_near_duplicates: int = 0
    num_too_long: int = 0
    num_dropped: int = 0
    num_kept: int = 0
    num_train: int = 0
    num_holdout: int = 0
    train_sha256: str = ""
    holdout_sha256: str = ""
    errors: list[Problem] = Field(default_factory=list)      # the first max_reported_problems
    warnings: list[Problem] = Field(default_factory=list)    # the first max_reported_problems

    def summary(self) -> str:
        if not self.ok:
            s = "s" if self.num_errors != 1 else ""
            return f"{self.num_errors:,} error{s} (first: {self.errors[0]})" if self.errors else "errors"
        dups = self.num_exact_duplicates + self.num_near_duplicates
        return (f"{self.num_train:,} train and {self.num_holdout:,} held-out examples from {self.num_input:,} records "
                f"({self.detected_format}; {dups:,} duplicates, {self.num_too_long:,} too long, "
                f"{self.num_warnings:,} warnings)")


class _Run:
    """The state of one prepare: counters, the problem log, dedup, stats and the sample."""

    def __init__(self, input_path: Path, spec: PrepareOptions, tokenizer: ChatTokenizer):
        self.path, self.spec, self.tok = input_path, spec, tokenizer
        self.file = input_path.name
        self.log = ProblemLog(spec.max_reported_problems, max(spec.max_reported_problems, MAX_FLAGGED))
        self.dedup = Deduplicator(spec.dedup, spec.near_duplicate_threshold)
        self.stats = Stats()
        self.sample = Reservoir(SAMPLE_SIZE, spec.seed)
        self.entries: list[tuple[str, str | None]] = []
        self.fmt = "" if spec.format == "auto" else spec.format
        self.n_input = self.n_parsed = self.n_too_long = self.n_dropped = 0

    def example(self, line: int, record: dict) -> tuple[dict[str, Any], str] | None:
        """The canonical example of a record that passes every check and its normalised text, or None (its
        problems logged)."""
        try:
            if not self.fmt:
                self.fmt = formats.detect_format(record)
            n = formats.normalise(self.fmt, record)
            label = formats.label_of(record, self.spec.stratify_field)
        except formats.RecordError as e:
            self.log.add(error(self.file, line, e.field, e.message))
            return None
        text = normalised_text(n.messages, n.preference)
        ex = formats.to_example(n, self.fmt, self.file, line, label, text)
        self.n_parsed += 1
        problems = check_example(ex, n.paths, n.names)
        drop_empty = not self.spec.keep_empty_replies and any(p.message == EMPTY_REPLY for p in problems)
        if drop_empty:
            problems = [p.model_copy(update={"message": p.message + "; dropped (keep_empty_replies to keep it)"})
                        if p.message == EMPTY_REPLY else p for p in problems]
        self.log.extend(problems)
        if any(p.severity == "error" for p in problems):
            return None
        if drop_empty:
            self.n_dropped += 1
            return None
        return ex, text

    def keep(self, ex: dict[str, Any], text: str) -> tuple[int, int] | None:
        """Token lengths, length and duplicate checks: the lengths when the example stays, else None."""
        src = ex["source"]
        try:
            lengths = token_lengths(self.tok, ex)
        except Exception as e:  # noqa: BLE001 - a chat template raising on this example is a data problem
            self.log.add(error(self.file, src["line"], "messages", f"the chat template refused it: {e}"))
            return None
        too_long = check_length(ex, lengths, self.spec.max_tokens, self.spec.drop_too_long)
        if too_long is not None:
            self.n_too_long += 1
            self.log.add(too_long)
            if self.spec.drop_too_long:
                self.n_dropped += 1
                return None
        near = None
        if self.spec.dedup == "near" and any(m["role"] == "system" for m in ex["messages"]):
            near = normalised_text(ex["messages"], ex["preference"], skip_system=True)
        dup = self.dedup.add(src["line"], ex["id"], text, near)
        if dup is not None:
            text = (f"{'an exact' if dup.kind == 'exact' else 'a near'} duplicate of line {dup.of_line} "
                    f"(id {dup.of_id}" + (f", similarity {dup.similarity:.2f})" if dup.kind == "near" else ")"))
            if self.spec.dedup_action == "drop":
                self.n_dropped += 1
                self.log.add(warning(self.file, src["line"], "", text + "; dropped"))
                return None
            self.log.add(warning(self.file, src["line"], "", text + "; kept (dedup_action=flag)"))
        return lengths

    def progress(self, on_progress: Callable[[int, str], None] | None, final: bool = False) -> None:
        if on_progress is not None and (final or self.n_input % PROGRESS_EVERY == 0):
            on_progress(self.n_input, f"{'read' if final else 'reading'}: {self.n_input:,} records, "
                        f"{len(self.entries):,} kept, {self.log.num_errors:,} errors, {self.log.num_warnings:,} warnings")


def prepare(input_path: Path, out_dir: Path, spec: PrepareOptions, tokenizer: ChatTokenizer,
            on_progress: Callable[[int, str], None] | None = None) -> PrepareResult:
    input_path, out_dir = Path(input_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, holdout_path = out_dir / "train.jsonl", out_dir / "holdout.jsonl"
    for stale in (train_path, holdout_path, out_dir / "report.json", out_dir / "report.html"):
        stale.unlink(missing_ok=True)
    run = _Run(input_path, spec, tokenizer)
    fd, kept_name = tempfile.mkstemp(prefix=".kept-", suffix=".jsonl", dir=out_dir)
    kept_path = Path(kept_name)
    split = None
    try:
        # pass 1: read, normalise, validate, measure, deduplicate -> the kept examples' file + (id, label)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as kept:
            for line, item in formats.read_records(input_path, "auto", spec.max_line_bytes):
                if isinstance(item, Problem):
                    run.log.add(item)
                    if item.severity == "error" and line > 0:  # it stands in for the record on that line
                        run.n_input += 1
                        run.progress(on_progress)
                    continue
                run.n_input += 1
                found = run.example(line, item)
                if found is not None and (lengths := run.keep(*found)) is not None:
                    ex = found[0]
                    kept.write(json.dumps(ex, ensure_ascii=False, separators=(",", ":")) + "\n")
                    run.entries.append((ex["id"], ex["label"]))
                    run.stats.add(ex, lengths)
                    run.sample.add(ex)
                run.progress(on_progress)
        run.progress(on_progress, final=True)
        if (few := check_count(run.file, len(run.entries), spec.min_examples)) is not None:
            run.log.add(few)
        # pass 2: split (only a clean dataset gets train/holdout files)
        if run.log.num_errors == 0:
            held = choose_holdout(run.entries, spec.holdout_fraction, spec.seed)
            split = write_split(kept_path, run.entries, held, train_path, holdout_path)
    finally:
        kept_path.unlink(missing_ok=True)
    result = PrepareResult(
        ok=run.log.num_errors == 0, detected_format=run.fmt, num_input=run.n_input, num_parsed=run.n_parsed,
        num_errors=run.log.num_errors, num_warnings=run.log.num_warnings,
        num_exact_duplicates=run.dedup.num_exact, num_near_duplicates=run.dedup.num_near,
        num_too_long=run.n_too_long, num_dropped=run.n_dropped, num_kept=len(run.entries),
        num_train=split.num_train if split else 0, num_holdout=split.num_holdout if split else 0,
        train_sha256=split.train_sha256 if split else "", holdout_sha256=split.holdout_sha256 if split else "",
        errors=run.log.errors[:spec.max_reported_problems], warnings=run.log.warnings[:spec.max_reported_problems])
    write_report(_report(run, result, split.labels if split else {}), out_dir)
    return result


def _report(run: _Run, result: PrepareResult, labels: dict[str, dict[str, int]]) -> dict[str, Any]:
    n = run.spec.max_reported_problems
    return {
        "file": run.file, "ok": result.ok, "detected_format": result.detected_format,
        "options": run.spec.model_dump(),
        "counts": {"input": result.num_input, "parsed": result.num_parsed, "errors": result.num_errors,
                   "warnings": result.num_warnings, "exact_duplicates": result.num_exact_duplicates,
                   "near_duplicates": result.num_near_duplicates, "too_long": result.num_too_long,
                   "dropped": result.num_dropped, "kept": result.num_kept, "train": result.num_train,
                   "holdout": result.num_holdout},
        "train_sha256": result.train_sha256, "holdout_sha256": result.holdout_sha256,
        "stats": run.stats.to_dict(),
        "labels": labels,
        "num_duplicate_clusters": run.dedup.num_clusters(),
        "duplicate_clusters": cluster_dicts(run.dedup.clusters(), MAX_CLUSTERS),
        "num_similar_pairs": run.dedup.num_review, "similar_pairs": run.dedup.review,
        "similar_from": run.dedup.review_from,
        # the API's issues: the first N errors, then the first N warnings
        "problems": [p.model_dump() for p in run.log.errors[:n] + run.log.warnings[:n]],
        "flagged": [p.model_dump() for p in run.log.warnings[:MAX_FLAGGED]],
        "sample": [render_sample(run.tok, ex) for ex in sorted(run.sample.items, key=lambda e: e["source"]["line"])],
    }
