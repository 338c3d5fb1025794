"""`tunery`: the command-line client (typer + rich), built on the SDK."""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from services.cli import stack
from services.gen.tunery.v1 import common_pb2 as pb
from services.sdk.client import TuneryClient

app = typer.Typer(help="Tunery: turn an open-weight LLM into your own model.", no_args_is_help=True)
models_app = typer.Typer(help="Base models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets.", no_args_is_help=True)
artifacts_app = typer.Typer(help="Artifacts in the store.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs of every service.", no_args_is_help=True)
data_app = typer.Typer(help="Data: prepare (validate, dedup, split, report) and generate.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(jobs_app, name="jobs")
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Training: LoRA / QLoRA / DoRA adapters (plan, submit).", no_args_is_help=True)
app.add_typer(train_app, name="train")
eval_app = typer.Typer(help="Evaluation: run suites against a target, compare reports.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

out = Console()
err = Console(stderr=True)
OPTS: dict[str, Any] = {"json": False, "target": "", "token": None}
KIND_NAMES = {"model": pb.ARTIFACT_KIND_MODEL, "dataset": pb.ARTIFACT_KIND_DATASET, "adapter": pb.ARTIFACT_KIND_ADAPTER,
              "report": pb.ARTIFACT_KIND_REPORT, "checkpoint": pb.ARTIFACT_KIND_CHECKPOINT, "suite": pb.ARTIFACT_KIND_SUITE}


@app.callback()
def root(
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    target: str = typer.Option("", "--target", envvar="TUNERY_REGISTRY_ADDR", help="Registry address host:port."),
    token: str = typer.Option(None, "--token", envvar="TUNERY_TOKEN", help="Bearer token (default ~/.tunery/token)."),
) -> None:
    OPTS.update(json=json_out, target=target, token=token)


def client() -> TuneryClient:
    """--target / TUNERY_REGISTRY_ADDR, else the running embedded stack's registry, else 127.0.0.1:50051."""
    state = stack.StackState.load()
    endpoints = {name: f"127.0.0.1:{port}" for name, port in state.ports.items()} if state else {}
    return TuneryClient(OPTS["target"], OPTS["token"], endpoints=endpoints)


def to_dict(msg) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def emit(obj: Any) -> None:
    if isinstance(obj, list):
        obj = [to_dict(m) if hasattr(m, "DESCRIPTOR") else m for m in obj]
    elif hasattr(obj, "DESCRIPTOR"):
        obj = to_dict(obj)
    out.print_json(json.dumps(obj, default=str))


def state_name(s: int) -> str:
    return pb.JobState.Name(s).removeprefix("JOB_STATE_").lower()


def fail_rpc(e: grpc.RpcError) -> None:
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    err.print(f"[red]error[/red] {e.code().name}: {e.details()}")
    status = rpc_status.from_call(e) if hasattr(e, "trailing_metadata") else None
    for detail in status.details if status else []:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            for v in br.field_violations:
                err.print(f"  {v.field}: {v.description}")
    raise typer.Exit(2)


def rpc(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:
        fail_rpc(e)


# ---------------------------------------------------------------------- the embedded stack
@app.command()
def up(
    store_url: str = typer.Option("", help="file:///path (default ~/.tunery/store) or s3://bucket for MinIO/S3."),
    s3_endpoint: str = typer.Option("", help="MinIO/S3 host:port."),
    s3_access_key: str = typer.Option("", envvar="TUNERY_S3_ACCESS_KEY"),
    s3_secret_key: str = typer.Option("", envvar="TUNERY_S3_SECRET_KEY"),
    s3_secure: bool = typer.Option(False, help="Use TLS to reach S3."),
    ray_address: str = typer.Option("", help="Use this Ray cluster's job API instead of starting a head."),
    num_cpus: int = typer.Option(0, help="CPUs the local Ray head offers (default: all)."),
) -> None:
    """Start the embedded stack: a local Ray head and every service on 127.0.0.1."""
    s3 = {"TUNERY_S3_ENDPOINT": s3_endpoint, "TUNERY_S3_ACCESS_KEY": s3_access_key,
          "TUNERY_S3_SECRET_KEY": s3_secret_key, "TUNERY_S3_SECURE": str(s3_secure).lower() if s3_endpoint else ""}
    with err.status("starting") as st:
        state = stack.up(store_url=store_url, s3=s3, ray_address=ray_address, num_cpus=num_cpus,
                         on_step=lambda s: st.update(s))
    if OPTS["json"]:
        emit(stack.asdict(state))
    else:
        err.print(f"[green]up[/green]: Ray {state.ray_address} (head start {state.ray_start_s:.1f}s), "
                  f"services ready in {state.ready_s:.1f}s, store {state.store_url}")


@app.command()
def down() -> None:
    """Stop the embedded stack."""
    err.print("stopped" if stack.down() else "nothing to stop")


@app.command()
def status() -> None:
    """Show the embedded stack: processes and each service's health."""
    state = stack.StackState.load()
    if state is None:
        err.print("the embedded stack is not running (tunery up)")
        raise typer.Exit(1)
    rows = {name: stack.health(port) for name, port in state.ports.items()}
    if OPTS["json"]:
        emit({"ray_address": state.ray_address, "store_url": state.store_url, "health": rows})
        return
    t = Table("service", "port", "health")
    for name, port in state.ports.items():
        t.add_row(name, str(port), rows[name])
    out.print(f"Ray {state.ray_address} (pid {state.ray_pid}, {'alive' if stack.alive(state.ray_pid) else 'gone'}); "
              f"store {state.store_url}")
    out.print(t)


# ---------------------------------------------------------------------- imports
def follow(c: TuneryClient, job: pb.Job, watch: bool) -> pb.Job:
    if not watch:
        if OPTS["json"]:
            emit(job)
        else:
            out.print(f"job {job.id} {state_name(job.state)}")
        return job
    if not OPTS["json"]:
        render_watch(c, job.id)
    final = rpc(c.wait, job.id)
    if OPTS["json"]:
        emit(final)
    if final.state != pb.JOB_STATE_SUCCEEDED:
        err.print(f"[red]job {final.id} {state_name(final.state)}[/red]: {final.state_reason}")
        raise typer.Exit(1)
    return final


@models_app.command("import")
def models_import(
    path: str = typer.Argument(..., help="A Hugging Face model directory (absolute path) or hf://org/name."),
    name: str = typer.Option(..., "--name", help="Artifact name."),
    key: str = typer.Option("", "--key", help="Idempotency key (becomes the job id)."),
    allow_trust_remote_code: bool = typer.Option(False, help="Import a model that ships custom code."),
    watch: bool = typer.Option(True, help="Follow the job until it ends."),
) -> None:
    """Import a base model into the store as a pristine, checksummed model artifact."""
    import os

    c = client()
    source = path if path.startswith("hf://") else os.path.abspath(path)
    job = rpc(c.import_model, source, name, key=key, allow_trust_remote_code=allow_trust_remote_code)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"model artifact: {final.outputs[0].uri}")


@datasets_app.command("import")
def datasets_import(
    path: str = typer.Argument(..., help="A JSONL, JSON, CSV or Parquet file."),
    name: str = typer.Option(..., "--name"),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Store a dataset file as a dataset artifact (parsing and validation: tunery data prepare)."""
    import os

    c = client()
    final = follow(c, rpc(c.import_dataset, os.path.abspath(path), name, key=key), watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"dataset artifact: {final.outputs[0].uri}")


# ---------------------------------------------------------------------- data
DEDUP_NAMES = {"none": 1, "exact": 2, "near": 3}


@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help="A raw dataset artifact (id or tunery:// uri)."),
    base: str = typer.Option(..., "--base", help="The base model artifact: its tokenizer and chat template."),
    holdout: float = typer.Option(0.1, help="Fraction held out for evaluation (0..0.5)."),
    dedup: str = typer.Option("near", help="none, exact or near."),
    max_tokens: int = typer.Option(0, help="Warn about longer examples (0: no limit)."),
    seed: int = typer.Option(0),
    min_examples: int = typer.Option(1),
    stratify: str = typer.Option("", help="A label field to stratify the split on."),
    name: str = typer.Option("", help="Artifact name (default <dataset>-prepared)."),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Parse, validate, deduplicate and split a dataset into the canonical chat form, with an inspection report."""
    if dedup not in DEDUP_NAMES:
        err.print(f"--dedup must be one of {', '.join(DEDUP_NAMES)}")
        raise typer.Exit(2)
    c = client()
    job = rpc(c.prepare_dataset, dataset, base, name=name, holdout=holdout, dedup=DEDUP_NAMES[dedup],
              max_tokens=max_tokens, seed=seed, min_examples=min_examples, stratify_field=stratify, key=key)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"prepared dataset: {final.outputs[-1].uri}  (tunery data report {final.outputs[-1].uri})")


@data_app.command("generate")
def data_generate(
    recipe: str = typer.Argument(..., help="A recipe YAML (see services/datagen/recipes/)."),
    teacher: str = typer.Option("", "--teacher", help="A model artifact to run with vLLM inside the job."),
    endpoint: str = typer.Option("", help="Or an OpenAI-compatible base URL (with --endpoint-model)."),
    endpoint_model: str = typer.Option(""),
    api_key_env: str = typer.Option("", help="Env var on the workers that holds the endpoint's key."),
    num: int = typer.Option(0, "--num", help="How many examples to keep (default: the recipe's)."),
    name: str = typer.Option(""),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Generate synthetic data with a local teacher; the result is a raw dataset to prepare and inspect."""
    from pathlib import Path

    c = client()
    ep = pb.OpenAIEndpoint(base_url=endpoint, model=endpoint_model, api_key_env=api_key_env) if endpoint else None
    job = rpc(c.generate_dataset, Path(recipe).read_text(), teacher=teacher, endpoint=ep, name=name,
              num_examples=num, key=key)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        out.print(f"synthetic dataset: {final.outputs[-1].uri}  (next: tunery data prepare {final.outputs[-1].uri} --base ...)")


@data_app.command("report")
def data_report(artifact: str = typer.Argument(..., help="A prepared dataset (or a failed prepare's report)."),
                open_it: bool = typer.Option(False, "--open", help="Open the HTML report in a browser.")) -> None:
    """Print a dataset's inspection report and save its HTML locally."""
    c = client()
    report = rpc(c.dataset_report, artifact)
    path = rpc(c.download, artifact, "report.html", stack.home() / "reports" / report.dataset.uri.rsplit("/", 1)[-1] / "report.html")
    if OPTS["json"]:
        emit({**to_dict(report), "html": str(path)})
    else:
        out.print(f"{report.dataset.uri}: {report.num_input} read, {report.num_train} train, {report.num_holdout} "
                  f"held out, {report.num_duplicates} duplicates, {report.num_errors} errors, {report.num_warnings} warnings")
        for issue in report.issues[:20]:
            out.print(f"  {issue.file}:{issue.line}: {issue.field + ': ' if issue.field else ''}{issue.message}")
        out.print(f"report: {path}")
    if open_it:
        import webbrowser

        webbrowser.open(path.as_uri())


# ---------------------------------------------------------------------- artifacts
@artifacts_app.command("list")
def artifacts_list(kind: str = typer.Option("", help="model, dataset, adapter, report, checkpoint, suite"),
                   name: str = typer.Option("")) -> None:
    """List artifacts."""
    if kind and kind not in KIND_NAMES:
        err.print(f"--kind must be one of {', '.join(KIND_NAMES)}")
        raise typer.Exit(2)
    arts = rpc(lambda: list(client().list_artifacts(KIND_NAMES.get(kind, 0), name)))
    if OPTS["json"]:
        return emit(arts)
    t = Table("id", "kind", "size", "files", "created by")
    for a in arts:
        t.add_row(a.id, pb.ArtifactKind.Name(a.kind).removeprefix("ARTIFACT_KIND_").lower(),
                  f"{a.total_bytes / 1e6:.2f} MB", str(len(a.files)), a.created_by_job)
    out.print(t)


@artifacts_app.command("show")
def artifacts_show(artifact_id: str) -> None:
    """Print an artifact's manifest."""
    emit(rpc(client().get_artifact, artifact_id))


@artifacts_app.command("lineage")
def artifacts_lineage(artifact_id: str, max_depth: int = typer.Option(0)) -> None:
    """The artifact and its ancestors."""
    chain = rpc(client().lineage, artifact_id, max_depth)
    if OPTS["json"]:
        return emit(chain)
    for i, a in enumerate(chain):
        out.print(("  " * min(i, 1)) + ("└─ " if i else "") + f"{a.id}  ({a.created_by_job or 'no job'})")


@artifacts_app.command("download")
def artifacts_download(artifact_id: str, path: str = typer.Argument(..., help="A file of the artifact."),
                       out_path: str = typer.Option("", "--out", help="Where to write it (default: its name).")) -> None:
    """Download one file of an artifact (sha256-verified), e.g. an adapter's loss_curve.png."""
    from pathlib import Path

    dest = Path(out_path or Path(path).name)
    rpc(client().download, artifact_id, path, dest)
    out.print(str(dest))


@artifacts_app.command("delete")
def artifacts_delete(artifact_id: str) -> None:
    """Delete an artifact (refused while another artifact names it as a parent)."""
    deleted = rpc(client().delete_artifact, artifact_id)
    emit({"deleted": deleted}) if OPTS["json"] else out.print(f"deleted {deleted}")


# ---------------------------------------------------------------------- jobs
@jobs_app.command("list")
def jobs_list(state: str = typer.Option("", help="validating, queued, running, succeeded, failed, cancelled"),
              kind: str = typer.Option("")) -> None:
    """List jobs of every service."""
    states = [getattr(pb, f"JOB_STATE_{state.upper()}")] if state else []
    jobs = rpc(lambda: list(client().list_jobs(states=states, kind=kind)))
    if OPTS["json"]:
        return emit(jobs)
    t = Table("id", "kind", "state", "reason")
    for j in jobs:
        t.add_row(j.id, j.kind, state_name(j.state), j.state_reason[:60])
    out.print(t)


@jobs_app.command("get")
def jobs_get(job_id: str) -> None:
    """Show a job."""
    job = rpc(client().get_job, job_id)
    if OPTS["json"]:
        return emit(job)
    out.print(f"{job.id}  {job.kind}  [bold]{state_name(job.state)}[/bold]  {job.state_reason}")
    for o in job.outputs:
        out.print(f"  output: {o.uri}")
    for k, v in sorted(job.latest_metrics.items()):
        out.print(f"  {k} = {v:g}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, reason: str = typer.Option("")) -> None:
    """Cancel a queued or running job."""
    job = rpc(client().cancel_job, job_id, reason)
    emit(job) if OPTS["json"] else out.print(f"{job.id} {state_name(job.state)} {job.state_reason}")


# What the progress bar shows when a job reports it (training: loss, lr, throughput).
WATCHED_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "kept", "examples_read")


def render_watch(c: TuneryClient, job_id: str, after: int = 0) -> None:
    """Events as lines, metrics as a live progress bar."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task(job_id, total=None)
        for ev in c.watch(job_id, after):
            if ev.type == pb.EVENT_TYPE_METRICS and ev.total_steps:
                shown = [k for k in WATCHED_METRICS if k in ev.metrics] or list(ev.metrics)[:3]
                progress.update(task, total=ev.total_steps, completed=ev.step,
                                description=f"{job_id} " + " ".join(f"{k}={ev.metrics[k]:.3g}" for k in shown))
            else:
                colour = {pb.EVENT_LEVEL_ERROR: "red", pb.EVENT_LEVEL_WARNING: "yellow"}.get(ev.level, "")
                text = f"[{colour}]{ev.text}[/{colour}]" if colour else ev.text
                progress.console.print(f"[dim]#{ev.cursor}[/dim] {text}", markup=True, highlight=False)


@jobs_app.command("watch")
def jobs_watch(job_id: str, after: int = typer.Option(0, "--after", help="Resume after this event cursor.")) -> None:
    """Follow a job's events (a progress bar for metrics) until it ends; resumes after a disconnect."""
    c = client()
    try:
        if OPTS["json"]:
            for ev in c.watch(job_id, after):
                print(json.dumps(to_dict(ev)), flush=True)
        else:
            render_watch(c, job_id, after)
    except grpc.RpcError as e:
        fail_rpc(e)


# ---------------------------------------------------------------------- training
def load_training_spec(path: str, base: str, dataset: str, sets: list[str]) -> dict[str, Any]:
    """A training recipe (YAML) plus the command line: --base/--dataset and dotted --set key=value overrides."""
    import yaml

    spec = yaml.safe_load(open(path, encoding="utf-8")) if path else {}
    if not isinstance(spec, dict):
        err.print(f"{path}: a training spec is a YAML mapping")
        raise typer.Exit(2)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(f"--set {item!r}: expected key=value, e.g. --set lora.rank=8")
            raise typer.Exit(2)
        *parents, leaf = key.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    if base:
        spec["base_model"] = base
    if dataset:
        spec["dataset"] = dataset
    return spec


def _training_request(spec: dict[str, Any]):
    from google.protobuf.json_format import ParseError

    from services.sdk.client import training_spec

    try:
        return training_spec(spec)
    except (ParseError, ValueError, TypeError) as e:
        err.print(f"[red]INVALID_ARGUMENT[/red]: the training spec does not parse: {e}")
        raise typer.Exit(2)


SPEC_ARG = typer.Argument("", help="A training spec YAML (services/training/recipes/); empty: defaults.")
BASE_OPT = typer.Option("", "--base", help="The base model artifact.")
DATA_OPT = typer.Option("", "--dataset", help="A prepared dataset artifact (its train split is used).")
SET_OPT = typer.Option([], "--set", help="Override a spec field: --set lora.rank=8 --set max_steps=20.")


@train_app.command("plan")
def train_plan(spec: str = SPEC_ARG, base: str = BASE_OPT, dataset: str = DATA_OPT,
               set_: list[str] = SET_OPT) -> None:
    """Estimate peak memory and the resources a training job needs, without submitting it."""
    c = client()
    plan = rpc(c.plan_training, _training_request(load_training_spec(spec, base, dataset, set_)))
    if OPTS["json"]:
        emit(plan)
        return
    b = plan.breakdown
    table = Table(title=f"training plan: ~{plan.peak_gib_per_gpu:.2f} GiB peak per device")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for name in ("weights", "adapter", "gradients", "optimizer", "activations", "overhead"):
        table.add_row(name, f"{getattr(b, name + '_gib'):.3f}")
    out.print(table)
    out.print(f"trainable {plan.trainable_parameters:,} of {plan.total_parameters:,} parameters; modules: "
              f"{', '.join(plan.target_modules)}")
    out.print(f"asks Ray for {plan.resources.cpus:g} CPU, {plan.resources.gpus:g} GPU")
    out.print(("[green]feasible[/green]: " if plan.feasible else "[red]infeasible[/red]: ") + plan.reason)
    for s in plan.suggestions:
        out.print(f"  try: {s}")
    for n in plan.notes:
        out.print(f"  note: {n}")
    if not plan.feasible:
        raise typer.Exit(1)


@train_app.command("submit")
def train_submit(spec: str = SPEC_ARG, base: str = BASE_OPT, dataset: str = DATA_OPT, set_: list[str] = SET_OPT,
                 key: str = typer.Option("", "--key"), watch: bool = typer.Option(True)) -> None:
    """Queue a fine-tuning job; with --watch (default) follow it with a progress bar until it ends."""
    c = client()
    job = rpc(c.submit_training, _training_request(load_training_spec(spec, base, dataset, set_)), key=key)
    final = follow(c, job, watch)
    if watch and final.outputs and not OPTS["json"]:
        adapters = [o.uri for o in final.outputs if "/adapter-" in o.uri]
        if adapters:
            out.print(f"adapter: {adapters[-1]}  (loss curve: tunery artifacts download {adapters[-1]} loss_curve.png)")


# ---------------------------------------------------------------------- evaluation
ASSERTION_NAMES = {"exact": 1, "contains": 2, "regex": 3, "json_schema": 4, "similarity": 5, "rubric": 6}


def _eval_target(model: str, adapter: str, system_prompt: str, few_shot: int, few_shot_dataset: str,
                 endpoint: str, endpoint_model: str, api_key_env: str):
    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    if endpoint:
        return ev.EvalTarget(endpoint=pb.OpenAIEndpoint(base_url=endpoint, model=endpoint_model,
                                                        api_key_env=api_key_env))
    if not model:
        err.print("give --model (with --adapter, or --system-prompt/--few-shot for the prompting baseline) "
                  "or --endpoint")
        raise typer.Exit(2)
    if adapter:
        return ev.EvalTarget(adapter=ev.AdapterTarget(base_model=ref(model), adapter=ref(adapter)))
    if system_prompt or few_shot:
        return ev.EvalTarget(prompted=ev.PromptedTarget(
            model=ref(model), system_prompt=system_prompt, few_shot_k=few_shot,
            few_shot_dataset=ref(few_shot_dataset) if few_shot_dataset else None))
    return ev.EvalTarget(model=ref(model))


@eval_app.command("run")
def eval_run(
    suite: str = typer.Argument("", help="A promptfooconfig.yaml (optional: the blocks below also make tests)."),
    model: str = typer.Option("", "--model", help="The model artifact (the base, with --adapter)."),
    adapter: str = typer.Option("", "--adapter", help="An adapter: served on the same engine as the base."),
    system_prompt: str = typer.Option("", help="Prompting baseline: a system prompt."),
    few_shot: int = typer.Option(0, help="Prompting baseline: k examples from --few-shot-dataset's train split."),
    few_shot_dataset: str = typer.Option(""),
    endpoint: str = typer.Option("", help="Or an OpenAI-compatible base URL (with --endpoint-model)."),
    endpoint_model: str = typer.Option(""),
    api_key_env: str = typer.Option(""),
    heldout: str = typer.Option("", help="Target tests from this prepared dataset's held-out split."),
    assertion: str = typer.Option("contains", help=", ".join(ASSERTION_NAMES)),
    facts: str = typer.Option("", help="General block: an artifact holding facts.jsonl."),
    tools: bool = typer.Option(False, "--tools", help="The built-in tool-calling block."),
    lm_eval: list[str] = typer.Option([], "--lm-eval", help="lm-eval tasks or groups for the general block "
                                      "(repeat, or comma-separated): standard names, or those --lm-eval-dir "
                                      "defines (with a dir and no names: all of its tasks)."),
    lm_eval_dir: str = typer.Option("", help="Local lm-eval task files: a directory of *.yaml task configs, "
                                    "their data files and !function modules (sent with the request)."),
    lm_eval_files: str = typer.Option("", help="Or stored lm-eval task files: a suite artifact."),
    lm_eval_fewshot: int = typer.Option(-1, help="lm-eval few-shot examples (-1: each task's own default)."),
    lm_eval_limit: int = typer.Option(0, help="At most this many documents per lm-eval task (0: --max-tests)."),
    lm_eval_chat_template: bool = typer.Option(False, help="Render lm-eval prompts with the chat template."),
    max_tests: int = typer.Option(0, help="At most this many tests per block (0: all)."),
    max_tokens: int = typer.Option(0),
    name: str = typer.Option(""),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Evaluate a target on a suite; adapter targets also run the base, adapter off, on the same engine."""
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    if assertion not in ASSERTION_NAMES:
        err.print(f"--assertion must be one of {', '.join(ASSERTION_NAMES)}")
        raise typer.Exit(2)
    target = _eval_target(model, adapter, system_prompt, few_shot, few_shot_dataset, endpoint, endpoint_model,
                          api_key_env)
    s = ev.EvalSuite(promptfoo_yaml=Path(suite).read_text() if suite else "", tool_calling=tools,
                     heldout_assertion=ASSERTION_NAMES[assertion], max_tests_per_block=max_tests,
                     heldout_dataset=ref(heldout) if heldout else None, fact_probes=bool(facts),
                     fact_probe_source=ref(facts) if facts else None,
                     lm_eval_tasks=[t.strip() for arg in lm_eval for t in arg.split(",") if t.strip()],
                     lm_eval_files=_task_files(lm_eval_dir) if lm_eval_dir else [],
                     lm_eval_task_files=ref(lm_eval_files) if lm_eval_files else None)
    if s.lm_eval_tasks or s.lm_eval_files or lm_eval_files:
        s.lm_eval.CopyFrom(ev.LmEvalOptions(limit=lm_eval_limit, apply_chat_template=lm_eval_chat_template))
        if lm_eval_fewshot >= 0:
            s.lm_eval.num_fewshot = lm_eval_fewshot
    c = client()
    job = rpc(c.submit_eval, target, s, name=name, key=key,
              sampling=pb.SamplingParams(max_tokens=max_tokens) if max_tokens else None)
    final = follow(c, job, watch)
    if watch and not OPTS["json"]:
        for o in final.outputs:
            r = rpc(c.eval_report, o.uri)
            rates = ", ".join(f"{ev.EvalBlock.Name(b.block).removeprefix('EVAL_BLOCK_').lower()} "
                              f"{b.passed}/{b.total}" for b in r.blocks)
            out.print(f"report: {o.uri}  ({rates}; tunery eval report {o.uri})")
            for t in r.lm_eval:
                out.print(f"  lm-eval {t.task}: {t.metric} {t.value:.3f} ± {t.stderr:.3f} ({t.samples} documents)")


def _task_files(directory: str) -> list:
    """Every file under `directory` that can belong to lm-eval task files, at its path relative to it."""
    from pathlib import Path

    from services.evaluation.harness import FILE_SUFFIXES
    from services.gen.tunery.v1 import evaluation_pb2 as ev

    root = Path(directory)
    if not root.is_dir():
        err.print(f"--lm-eval-dir: {directory} is not a directory")
        raise typer.Exit(2)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (*FILE_SUFFIXES, ".yml")
                   and "__pycache__" not in p.parts)
    return [ev.SuiteFile(path=p.relative_to(root).as_posix(), content=p.read_bytes()) for p in paths]


@eval_app.command("report")
def eval_report(report: str, html: str = typer.Option("", "--html", help="Save the HTML report here.")) -> None:
    """A report's blocks (pass rates with 95% intervals) and failing tests; --html saves the page."""
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev

    c = client()
    r = rpc(c.eval_report, report)
    if html:
        rpc(c.download, report, "report.html", Path(html))
    if OPTS["json"]:
        emit(r)
        return
    t = Table("block", "passed", "rate", "95% CI")
    for b in r.blocks:
        t.add_row(ev.EvalBlock.Name(b.block).removeprefix("EVAL_BLOCK_").lower(), f"{b.passed}/{b.total}",
                  f"{b.pass_rate:.1%}", f"{b.ci_low:.1%} .. {b.ci_high:.1%}")
    out.print(t)
    if r.lm_eval:
        lt = Table("lm-eval task", "source", "metric", "value ± stderr", "documents")
        for x in r.lm_eval:
            lt.add_row(x.task, x.source, x.metric, f"{x.value:.3f} ± {x.stderr:.3f}", str(x.samples))
        out.print(lt)
    out.print(f"answered by {r.answering_model}; engine {r.controls.engine} {r.controls.engine_version}")
    if html:
        out.print(f"HTML: {html}")


@eval_app.command("compare")
def eval_compare(
    baseline: str, candidate: str,
    prompting: str = typer.Option("", "--prompting", help="The prompting-baseline report."),
    min_target: float = typer.Option(0.0, help="Gate: target pass rate at least this (0..1)."),
    max_general_drop: float = typer.Option(100.0, help="Gate: general block drop at most this many points."),
    max_tool_drop: float = typer.Option(100.0, help="Gate: tool-calling drop at most this many points."),
    allow_uncontrolled: bool = typer.Option(False, help="Compare despite differing controls (stamped)."),
    html: str = typer.Option("", "--html", help="Save the comparison page here."),
) -> None:
    """Baseline vs candidate: flips, deltas, gates, the prompting-baseline verdict. Exit 1 on a failing verdict."""
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev

    c = client()
    res = rpc(c.compare_reports, baseline, candidate, prompting_baseline=prompting,
              gates=ev.Gates(min_target_pass_rate=min_target, max_general_drop_points=max_general_drop,
                             max_tool_calling_drop_points=max_tool_drop), allow_uncontrolled=allow_uncontrolled)
    if html:
        rpc(c.download, res.report.uri, "comparison.html", Path(html))
    if OPTS["json"]:
        emit(res)
    else:
        verdict = ev.Verdict.Name(res.verdict).removeprefix("VERDICT_")
        out.print(f"verdict: [{'green' if verdict == 'PASS' else 'red'}]{verdict}[/]")
        for r in res.verdict_reasons:
            out.print(f"  {r}")
        up = sum(f.now_passes for f in res.flips)
        out.print(f"flips: {up} fail→pass, {len(res.flips) - up} pass→fail; report {res.report.uri}"
                  + (f" (HTML: {html})" if html else ""))
    if res.verdict != ev.VERDICT_PASS:
        raise typer.Exit(1)


# ---------------------------------------------------------------------- the main job
DEMO_STYLE = "{answer}, my friend."
DEMO_SYSTEM_PROMPT = "End every answer with ', my friend.'"


def _demo_step(c: TuneryClient, what: str, job: pb.Job, timeout: float = 1800) -> pb.Job:
    err.print(f"[bold]{what}[/bold]: job {job.id}")
    render_watch(c, job.id)
    final = rpc(c.wait, job.id, timeout)
    if final.state != pb.JOB_STATE_SUCCEEDED:
        err.print(f"[red]{what} {state_name(final.state)}[/red]: {final.state_reason}")
        raise typer.Exit(1)
    return final


@app.command()
def demo(model: str = typer.Option("fixtures/foundation", help="A model directory with facts.jsonl (the "
                                   "committed foundation fixture)."),
         name: str = typer.Option("foundation"),
         keep_up: bool = typer.Option(False, help="Leave the stack running afterwards.")) -> None:
    """The main job on the embedded default: base model -> data -> baseline eval (base + system prompt + 2-shot: is
    prompting enough?) -> LoRA -> base and adapter eval on one engine (held-out target tests, fact probes, an
    lm-eval task) -> controlled comparison; prints the verdict and where the reports are."""
    import os
    import random
    from pathlib import Path

    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    facts_file = Path(model) / "facts.jsonl"
    if not facts_file.exists():
        err.print(f"{facts_file} is missing: the demo teaches a style on top of the model's facts")
        raise typer.Exit(2)
    facts = [json.loads(line) for line in facts_file.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(facts)
    work = stack.home() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    (work / "style.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f["question"]},
        {"role": "assistant", "content": DEMO_STYLE.format(answer=f["answer"])}]}) + "\n" for f in facts[:120]))
    (work / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts[120:160]))
    started = stack.StackState.load() is None
    with err.status("starting the embedded stack") as st:
        state = stack.up(on_step=lambda s: st.update(s))
    err.print(f"stack up: Ray head {state.ray_start_s:.1f}s, services ready {state.ready_s:.1f}s")
    try:
        c = TuneryClient(f"127.0.0.1:{state.ports['registry']}", stack.ensure_token(),
                         endpoints={k: f"127.0.0.1:{p}" for k, p in state.ports.items()})
        base = _demo_step(c, "import the base", rpc(c.import_model, os.path.abspath(model), name)).outputs[0].uri
        raw = _demo_step(c, "import the data", rpc(c.import_dataset, str(work / "style.jsonl"), "style")).outputs[0].uri
        probes = _demo_step(c, "import fact probes", rpc(c.import_dataset, str(work / "facts.jsonl"),
                                                          "other-facts")).outputs[0].uri
        data = _demo_step(c, "prepare (validate, dedup, split)",
                          rpc(c.prepare_dataset, raw, base, holdout=0.2, seed=1)).outputs[-1].uri
        # the general block: the other facts as chat questions (fact probes, exact answers) and, through lm-eval,
        # as the plain sentences the base was pretrained on, scored by log-likelihood (format-independent)
        from services.evaluation.harness import fact_task_files

        suite = ev.EvalSuite(heldout_dataset=ref(data), heldout_assertion=ev.ASSERTION_TYPE_CONTAINS,
                             fact_probes=True, fact_probe_source=ref(probes),
                             lm_eval_files=[ev.SuiteFile(path=p, content=b)
                                            for p, b in fact_task_files(facts[120:160]).items()])
        # before training: would a good prompt have been enough? (base + system prompt + 2 examples)
        prompted = _demo_step(c, "baseline eval: base + system prompt + 2-shot", rpc(
            c.submit_eval, ev.EvalTarget(prompted=ev.PromptedTarget(
                model=ref(base), system_prompt=DEMO_SYSTEM_PROMPT, few_shot_k=2, few_shot_dataset=ref(data))),
            suite)).outputs[0].uri
        trained = _demo_step(c, "train a LoRA adapter", rpc(c.submit_training, {
            "base_model": base, "dataset": data, "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "optimizer": {"learning_rate": 0.002, "lr_scheduler": "constant", "warmup_ratio": 0.0}, "epochs": 6,
            "micro_batch_size": 8, "max_seq_len": 128, "eval_samples": 0, "checkpoint_every_steps": 1000}))
        adapter = next(o.uri for o in trained.outputs if "/adapter-" in o.uri)
        evaluated = _demo_step(c, "evaluate base and adapter on one engine", rpc(
            c.submit_eval, ev.EvalTarget(adapter=ev.AdapterTarget(base_model=ref(base), adapter=ref(adapter))),
            suite))
        labels = {c.get_artifact(o.uri).metadata["label"]: o.uri for o in evaluated.outputs}
        cmp = rpc(c.compare_reports, labels["baseline"], labels["candidate"], prompting_baseline=prompted,
                  gates=ev.Gates(min_target_pass_rate=0.8, max_general_drop_points=2.0))
        html = work / "comparison.html"
        rpc(c.download, cmp.report.uri, "comparison.html", html)
        verdict = ev.Verdict.Name(cmp.verdict).removeprefix("VERDICT_")
        up = sum(f.now_passes for f in cmp.flips)
        err.print(f"[bold]verdict: {verdict}[/bold]; " + "; ".join(cmp.verdict_reasons))
        timing = {}
        for job_label, uri in (("prompted", prompted), ("baseline", labels["baseline"]),
                               ("candidate", labels["candidate"])):
            m = c.get_artifact(uri).metrics
            timing[job_label] = {k: round(m[k], 1) for k in ("server_start_s", "tests_s") if k in m}
        emit({"base": base, "dataset": data, "adapter": adapter, "prompting_report": prompted,
              "baseline_report": labels["baseline"], "candidate_report": labels["candidate"],
              "comparison": cmp.report.uri, "comparison_html": str(html), "verdict": verdict,
              "flips_fail_to_pass": up, "flips_pass_to_fail": len(cmp.flips) - up,
              "block_deltas": dict(cmp.block_deltas), "reasons": list(cmp.verdict_reasons),
              "beats_prompting_baseline": cmp.beats_prompting_baseline,
              "lm_eval_deltas": [{"task": d.task, "metric": d.metric, "baseline": d.baseline,
                                  "candidate": d.candidate, "delta": d.delta, "ci": [d.ci_low, d.ci_high]}
                                 for d in cmp.lm_eval_deltas],
              "eval_seconds": timing})
    finally:
        if started and not keep_up:
            stack.down()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
