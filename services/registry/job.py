"""The registry's job: `python -m services.registry.job <spec-uri>`. Imports a model or a dataset.

setup (read the spec, find the source) -> run (validate, hash, upload blobs) -> save (manifest last).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from services.core.artifacts import ArtifactWriter
from services.core.jobctx import JobContext, run_job
from services.core.modeldir import inspect_model
from services.core.uploads import Uploads
from services.registry import sources
from services.registry.spec import ImportDatasetSpec, ImportModelSpec


def upload(ctx: JobContext, writer: ArtifactWriter, root: Path, files: list[Path]) -> float:
    """Hash and upload each file (a blob already in the store is skipped); returns seconds spent."""
    total = sum(f.stat().st_size for f in files) or 1
    t0, done = time.monotonic(), 0
    for i, f in enumerate(files, 1):
        ctx.check_cancelled()
        entry = writer.add_file(f, f.relative_to(root).as_posix())
        done += entry.size
        ctx.metrics(i, {"bytes_done": float(done), "fraction": done / total}, total_steps=len(files),
                    text=f"{entry.path}: {entry.size} bytes, sha256 {entry.sha256[:12]}…")
    seconds = time.monotonic() - t0
    ctx.metrics(len(files), {"import_seconds": seconds, "import_mb_per_s": done / 1e6 / max(seconds, 1e-9)},
                total_steps=len(files))
    return seconds


def import_model(ctx: JobContext, spec: ImportModelSpec) -> None:
    # setup: the files in a folder, wherever they come from
    k = sources.kind(spec.source)
    with tempfile.TemporaryDirectory(prefix="tunery-import-") as scratch:
        if k == "hub":
            ctx.event(f"downloading {spec.source} from the Hugging Face hub")
            root = sources.fetch_hub(spec.source, spec.revision)
        elif k == "upload":
            files = sources.uploaded(Uploads(ctx.artifacts), spec.source, Path(scratch))
            ctx.event(f"{len(files)} uploaded files{' from ' + spec.uploaded_from if spec.uploaded_from else ''}")
            root = Path(scratch)
        elif k == "s3":
            ctx.event(f"downloading {spec.source}")
            root = sources.fetch_s3(spec.source, Path(scratch), folder=True)
        else:
            root = Path(spec.source)
        # run: validate, then upload
        ctx.phase("validating")
        info = inspect_model(root, spec.allow_trust_remote_code, spec.source)
        ctx.event(f"{info['architecture'] or info['model_type']}: {info['parameters']:,} parameters, {info['dtype']}"
                  f"{', MoE with %d experts' % info['num_experts'] if info['is_moe'] else ''}, "
                  f"chat template {'present' if info['has_chat_template'] else 'absent'}")
        ctx.phase("running")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts))
        writer = ctx.writer("model", spec.name)
        seconds = upload(ctx, writer, root, files)
    # save
    ctx.commit(writer, metadata={"form": "base", "source": spec.source, "revision": spec.revision,
                                 **({"uploaded_from": spec.uploaded_from} if spec.uploaded_from else {}), **info},
               metrics={"import_seconds": seconds, "bytes_uploaded": float(writer.bytes_uploaded),
                        "import_mb_per_s": writer.bytes_total / 1e6 / max(seconds, 1e-9)})


def import_dataset(ctx: JobContext, spec: ImportDatasetSpec) -> None:
    k = sources.kind(spec.source)
    with tempfile.TemporaryDirectory(prefix="tunery-import-") as scratch:
        if k == "upload":
            entry = sources.uploaded(Uploads(ctx.artifacts), spec.source, Path(scratch))[0]
            path = Path(scratch) / entry.path
        elif k == "s3":
            ctx.event(f"downloading {spec.source}")
            path = sources.fetch_s3(spec.source, Path(scratch), folder=False)
        elif k == "url":
            ctx.event(f"downloading {spec.source}")
            path = sources.fetch_url(spec.source, Path(scratch), spec.url_max_bytes, lambda done, total: (
                done % (64 << 20) < (1 << 20) and ctx.metrics(0, {"bytes_downloaded": float(done)},
                                                              text=f"{done:,} of {max(total, 0):,} bytes")))
        else:
            path = Path(spec.source)
        writer = ctx.writer("dataset", spec.name)
        seconds = upload(ctx, writer, path.parent, [path])
    ctx.commit(writer, metadata={"stage": "raw", "format_hint": spec.format, "source": spec.source,
                                 **({"uploaded_from": spec.uploaded_from} if spec.uploaded_from else {}),
                                 "file": path.name}, metrics={"import_seconds": seconds})


def main() -> None:
    run_job("registry", {"registry.import_model": (import_model, ImportModelSpec),
                         "registry.import_dataset": (import_dataset, ImportDatasetSpec)})


if __name__ == "__main__":
    main()
