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

from services.core.jobctx import JobContext, run_job
from services.datagen.spec import TOKENIZER_FILES, GenerateDatasetSpec, PrepareDatasetSpec

BATCH = 64


def prepare_dataset(ctx: JobContext, spec: PrepareDatasetSpec) -> None:
    from services.datagen.chat_tokenizer import HFChatTokenizer
    from services.datagen.prepare import prepare

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
        result = prepare(source, out, spec.options, tokenizer,
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

    from services.datagen.synth import Recipe, generate, recipe_sha256
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
    want = recipe.num_examples

    def progress(g) -> None:
        ctx.check_cancelled()
        rejected = {k: v for k, v in g.counts.items() if k.startswith("rejected_")}
        ctx.metrics(len(g.kept), {"generated": float(g.attempts), "kept": float(len(g.kept)),
                                  "rejected": float(g.attempts - len(g.kept)),
                                  **{k: float(v) for k, v in g.counts.items()}},
                    total_steps=want, text=f"generated {g.attempts}, kept {len(g.kept)}, rejected "
                    + ", ".join(f"{k.removeprefix('rejected_')}={v}" for k, v in sorted(rejected.items())))

    # run
    t0 = time.monotonic()
    result = generate(recipe, teacher, BATCH, progress)
    seconds = time.monotonic() - t0
    kept, rejected, counts, attempt = result.kept, result.rejected, result.counts, result.attempts
    if not kept:
        ctx.fail(f"the teacher produced nothing that passed the filters in {attempt} attempts: "
                 f"{counts}; loosen the filters or check the teacher")
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
    run_job("datagen", {"datagen.prepare": (prepare_dataset, PrepareDatasetSpec),
                        "datagen.generate": (generate_dataset, GenerateDatasetSpec)})


if __name__ == "__main__":
    main()
