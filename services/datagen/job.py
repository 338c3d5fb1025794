"""The data service's job: `python -m services.datagen.job <spec-uri>` (train environment).

datagen.prepare: setup (materialise the raw file and the base model's tokenizer) -> run (parse, validate,
deduplicate, split, report; streaming) -> save (a prepared dataset artifact, manifest last; or, on errors,
a report artifact and a failure naming the first problems).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from services.core.jobctx import JobContext
from services.datagen.spec import TOKENIZER_FILES, PrepareDatasetSpec


def prepare_dataset(ctx: JobContext, spec: PrepareDatasetSpec) -> None:
    from services.datagen.chat_tokenizer import HFChatTokenizer
    from services.datagen.prepare import PrepareOptions, prepare

    # setup
    cache = ctx.settings.cache_dir
    raw = ctx.artifacts.resolve(spec.dataset)
    data_dir = ctx.artifacts.materialize(spec.dataset, cache)
    tokenizer = HFChatTokenizer(ctx.artifacts.materialize(spec.base_model, cache, paths=TOKENIZER_FILES))
    source = data_dir / raw.files[0].path
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


def main() -> None:
    with JobContext.from_argv() as ctx:
        if ctx.envelope.kind == "datagen.prepare":
            prepare_dataset(ctx, PrepareDatasetSpec.model_validate(ctx.spec))
        else:
            ctx.fail(f"the datagen job does not know kind {ctx.envelope.kind!r}")


if __name__ == "__main__":
    main()
