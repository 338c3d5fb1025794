"""The data service's job: `python -m services.datagen.job <spec-uri>` (train environment).

datagen.prepare: setup (materialise the raw file and the base model's tokenizer) -> run (parse, validate,
deduplicate, split, report; streaming) -> save (a prepared dataset artifact, manifest last; or, on errors,
a report artifact and a failure naming the first problems).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from services.core.jobctx import JobContext
from services.datagen.spec import TOKENIZER_FILES, GenerateDatasetSpec, PrepareDatasetSpec

BATCH = 64


def prepare_dataset(ctx: JobContext, spec: PrepareDatasetSpec) -> None:
    from services.datagen.chat_tokenizer import HFChatTokenizer
    from services.datagen.prepare import PrepareOptions, prepare

    # setup
    cache = ctx.settings.cache_dir
    raw = ctx.artifacts.resolve(spec.dataset)
    data_dir = ctx.artifacts.materialize(spec.dataset, cache)
    tokenizer = HFChatTokenizer(ctx.artifacts.materialize(spec.base_model, cache, paths=TOKENIZER_FILES))
    source = data_dir / raw.metadata.get("file", raw.files[0].path)
    out = Path(tempfile.mkdtemp(prefix="tunery-prepare-"))
    try:
        # run
        ctx.phase("validating")
        ctx.event(f"preparing {raw.id} ({source.name}, {raw.total_bytes} bytes) with the tokenizer of "
                  f"{spec.base_model.uri}")
        result = prepare(source, out, PrepareOptions(**spec.options.model_dump()), tokenizer,
                         on_progress=lambda n, msg: (ctx.check_cancelled(), ctx.metrics(n, {"examples_read": float(n)},
                                                                                        text=msg)))
        ctx.phase("running")
        report_files = [out / "report.json", out / "report.html"]
        # save
        if not result.ok:
            writer = ctx.writer("report", f"{spec.name}-problems", parents=[raw.ref()])
            for f in report_files:
                writer.add_file(f, f.name)
            ctx.commit(writer, metadata={"report": "data-prepare", "ok": False})
            ctx.fail(f"the dataset has {result.summary()}")
        writer = ctx.writer("dataset", spec.name, parents=[raw.ref(), spec.base_model])
        for f in [out / "train.jsonl", out / "holdout.jsonl", *report_files]:
            writer.add_file(f, f.name)
        ctx.commit(writer, metadata={
            "stage": "prepared", "format": "chat-messages", "source_format": result.detected_format,
            "options": spec.options.model_dump(), "num_train": result.num_train, "num_holdout": result.num_holdout,
            "train_sha256": result.train_sha256, "holdout_sha256": result.holdout_sha256,
            "tokenizer_of": spec.base_model.uri,
        }, metrics={"num_train": float(result.num_train), "num_holdout": float(result.num_holdout)})
    finally:
        shutil.rmtree(out, ignore_errors=True)


def generate_dataset(ctx: JobContext, spec: GenerateDatasetSpec) -> None:
    """datagen.generate (serve environment): setup (the teacher) -> run (batches of prompts through the teacher
    and the filters until N are kept or the attempts run out) -> save (a raw dataset artifact with lineage)."""
    import json
    from collections import Counter

    from services.datagen.synth import Gate, Recipe, chat_prompt, example, instructions, judge_prompt, parse_score
    from services.datagen.synth import recipe_sha256
    from services.datagen.teacher import OpenAITeacher, VLLMTeacher

    # setup
    recipe = Recipe.model_validate(spec.recipe)
    parents = []
    if spec.teacher.model is not None:
        teacher_art = ctx.artifacts.resolve(spec.teacher.model)
        parents.append(teacher_art.ref())
        ctx.event(f"loading teacher {teacher_art.id} with vLLM")
        teacher = VLLMTeacher(ctx.artifacts.materialize(teacher_art.ref(), ctx.settings.cache_dir), teacher_art.uri)
    else:
        e = spec.teacher.endpoint
        teacher = OpenAITeacher(e.base_url, e.model, e.api_key_env)
    gate = Gate(recipe)
    want, limit = recipe.num_examples, int(recipe.num_examples * recipe.max_attempts_factor)
    kept: list[dict] = []
    rejected: list[dict] = []
    counts: Counter = Counter()
    attempt = 0
    t0 = time.monotonic()
    # run
    while len(kept) < want and attempt < limit:
        ctx.check_cancelled()
        n = min(BATCH, limit - attempt)
        instrs = instructions(recipe, attempt, n)
        seeds = [recipe.sampling.seed * 1_000_003 + attempt + j for j in range(n)]
        outputs = teacher.chat([chat_prompt(recipe, x) for x in instrs], recipe.sampling, seeds, recipe.tools)
        scores: list[float | None] = [None] * n
        if recipe.filters.judge:
            judge_sampling = recipe.sampling.model_copy(update={"temperature": 0.0, "max_tokens": 4})
            scores = [parse_score(t) for t in teacher.chat(
                [judge_prompt(recipe, x, o) for x, o in zip(instrs, outputs)], judge_sampling, seeds)]
        for instr, out, score in zip(instrs, outputs, scores):
            reason = gate.reject(instr, out)
            if reason is None and recipe.filters.judge and (score is None or score < recipe.filters.judge_threshold):
                reason = "judge"
            if reason:
                counts[f"rejected_{reason}"] += 1
                if len(rejected) < 200:
                    rejected.append({"reason": reason, "instruction": instr, "output": out, "score": score})
                continue
            gate.remember(instr, out)
            kept.append(example(recipe, instr, out.strip()))
            if len(kept) == want:
                break
        attempt += n
        counts["generated"] = attempt
        ctx.metrics(len(kept), {"generated": float(attempt), "kept": float(len(kept)),
                                "rejected": float(attempt - len(kept)), **{k: float(v) for k, v in counts.items()}},
                    total_steps=want, text=f"generated {attempt}, kept {len(kept)}, rejected "
                    + ", ".join(f"{k.removeprefix('rejected_')}={v}" for k, v in sorted(counts.items())
                                if k.startswith("rejected_")))
    seconds = time.monotonic() - t0
    if not kept:
        ctx.fail(f"the teacher produced nothing that passed the filters in {attempt} attempts: "
                 f"{dict(counts)}; loosen the filters or check the teacher")
    if len(kept) < want:
        ctx.event(f"kept {len(kept)} of the {want} requested after {attempt} attempts", level="warning")
    # save
    out = Path(tempfile.mkdtemp(prefix="tunery-generate-"))
    try:
        data = out / "generated.jsonl"
        data.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
        (out / "rejected.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
        (out / "recipe.yaml").write_text(spec.recipe_yaml)
        writer = ctx.writer("dataset", spec.name, parents=parents)
        for f in (data, out / "rejected.jsonl", out / "recipe.yaml"):
            writer.add_file(f, f.name)
        ctx.commit(writer, metadata={
            "stage": "raw", "file": "generated.jsonl", "synthetic": True,
            "format_hint": "alpaca" if recipe.output_format == "alpaca" else "chat",
            "teacher": teacher.name, "recipe_sha256": recipe_sha256(recipe), "sampling": recipe.sampling.model_dump(),
            "requested": want, "kept": len(kept), "attempts": attempt, "counts": dict(counts),
        }, metrics={"kept": float(len(kept)), "examples_per_s": attempt / max(seconds, 1e-9),
                    "kept_per_s": len(kept) / max(seconds, 1e-9)})
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    with JobContext.from_argv() as ctx:
        if ctx.envelope.kind == "datagen.prepare":
            prepare_dataset(ctx, PrepareDatasetSpec.model_validate(ctx.spec))
        elif ctx.envelope.kind == "datagen.generate":
            generate_dataset(ctx, GenerateDatasetSpec.model_validate(ctx.spec))
        else:
            ctx.fail(f"the datagen job does not know kind {ctx.envelope.kind!r}")


if __name__ == "__main__":
    main()
