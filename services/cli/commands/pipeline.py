"""`tunery pipeline run FILE`: the whole arc as one job, from a pipeline file (examples/*.yaml); `tunery pipeline
report ID [--open]`: its report; `tunery pipeline cancel ID`.

`run` checks the whole file first (every problem with file and line, nothing sent), starts the embedded stack when
none runs and no --target is given, submits, and follows the pipeline: its own events, and each stage job's events
and progress bar while that stage runs. At the end it prints the verdict, every form's pass rates, each stage's
wall time and the deployment's endpoint, and saves the HTML report under ~/.tunery/pipelines/<id>/.
"""

from __future__ import annotations

import json
import re
import time
import webbrowser
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from services.cli import stack
from services.cli.console import OPTS, UploadBar, client, emit, err, out, render_watch, rpc, state_name
from services.gen.tunery.v1 import common_pb2 as pb

pipeline_app = typer.Typer(help="The whole arc as one job: import -> data -> baseline -> train -> eval -> merge -> "
                           "quantize -> eval -> serve.", no_args_is_help=True)
STAGE_JOB = re.compile(r"(?:started|re-attached to) job (\S+)$")


def load(path: Path, overrides: list[str]):
    from services.core.errors import TuneryError
    from services.pipeline.spec import load_file

    if not path.is_file():
        err.print(f"[red]INVALID_ARGUMENT[/red]: {path} is not a file")
        raise typer.Exit(2)
    try:
        return load_file(path, overrides)
    except TuneryError as e:
        err.print(f"[red]{e.code}[/red]: {path} has problems; nothing was submitted")
        for v in e.violations or []:
            err.print(f"  {v.field}: {v.description}", highlight=False, markup=False)
        if not e.violations:
            err.print(f"  {e}", highlight=False, markup=False)
        raise typer.Exit(2)


def follow(c, job_id: str) -> pb.Job:
    """The pipeline's events; while a stage job runs, that job's events and progress bar."""
    cursor = 0
    while True:
        stage = ""
        for ev in c.watch(job_id, cursor):
            cursor = max(cursor, ev.cursor)
            colour = {pb.EVENT_LEVEL_ERROR: "red", pb.EVENT_LEVEL_WARNING: "yellow"}.get(ev.level, "bold")
            err.print(f"[{colour}]{ev.text}[/{colour}]", highlight=False)
            m = STAGE_JOB.search(ev.text)
            if m:
                stage = m.group(1)
                break
        if not stage:
            return rpc(c.get_job, job_id)
        render_watch(c, stage)


def meta(a, key: str) -> str:
    return a.metadata[key] if key in a.metadata else ""


def report_of(c, pipeline_or_job: str, required: bool = True) -> tuple[str, dict, Path] | None:
    """The newest pipeline report of a pipeline id (or of one of its attempts' job ids): (uri, data, html path)."""
    pid = pipeline_or_job
    try:
        pid = c.get_job(pipeline_or_job).labels.get("pipeline", pid)
    except Exception:
        pass
    found = [a for a in c.list_artifacts(kind=pb.ARTIFACT_KIND_REPORT)
             if meta(a, "report") == "pipeline" and meta(a, "pipeline") == pid]
    if not found and not required:
        return None
    if not found:
        err.print(f"[red]NOT_FOUND[/red]: no report of pipeline {pid} yet (is it still running? `tunery jobs watch "
                  f"{pid}`)")
        raise typer.Exit(1)
    art = max(found, key=lambda a: a.created_at.seconds)
    folder = stack.home() / "pipelines" / pid
    data = json.loads(rpc(c.download, art.id, "pipeline.json", folder / "pipeline.json").read_text())
    html = rpc(c.download, art.id, "pipeline.html", folder / "pipeline.html")
    return art.id, data, html


def arenas(c, data: dict) -> list[str]:
    """The blind A/B results (`tunery arena`) between two of this pipeline's reports, as sentences."""
    from services.evaluation.arena import Tally

    # base, base+prompting, base+adapter, merged, ...: a report written before the key existed has no arena lines
    names = {u: n for n, u in data.get("reports", {}).items()}
    lines = []
    for a in c.list_artifacts(kind=pb.ARTIFACT_KIND_REPORT):
        if meta(a, "report") == "arena" and {meta(a, "report_a"), meta(a, "report_b")} <= set(names):
            m = a.metrics
            t = Tally(*(int(m[k]) for k in ("a_wins", "b_wins", "ties", "both_bad")), m["b_win_rate"], m["ci_low"],
                      m["ci_high"])
            lines.append(f"blind A/B ({a.id}): " + t.sentence(names.get(meta(a, "report_a"), "A"),
                                                              names.get(meta(a, "report_b"), "B")))
    return lines


def summary(data: dict, html: Path, uri: str, extra: list[str] = ()) -> None:
    stamps = " ".join(s for s, on in (("[smoke]", data["smoke"]), ("[forced]", data["forced"])) if on)
    out.print(f"[bold]pipeline {data['pipeline']}: {data['verdict']}[/bold] {escape(stamps)}", highlight=False)
    for line in data["gates"].get("reasons", [])[:6] + data["notes"]:
        out.print(f"  {line}", highlight=False, markup=False)
    blocks = sorted({b for r in data["blocks"].values() for b in r})
    if blocks:
        t = Table("form", *blocks, "verdict", title="pass rate [95% interval] per block")
        verdicts = {f["name"]: f["verdict"] for f in data["forms"]}
        verdicts.update({f"deployment {data['deployment'].get('name')}": data["deployment"].get("verdict", "")})
        for name, r in data["blocks"].items():
            t.add_row(escape(name), *(escape(f"{r[b]['pass_rate']:.0%} [{r[b]['ci'][0]:.0%}, {r[b]['ci'][1]:.0%}] "
                                             f"{r[b]['passed']}/{r[b]['total']}") if b in r else "–" for b in blocks),
                      verdicts.get(name, ""))
        out.print(t)
    t = Table("stage", "job", "seconds", "", title=f"stages: {data['total_stage_seconds']:.0f} s")
    for s in data["stages"]:
        t.add_row(s["stage"], s["job"], f"{s['seconds']:.1f}", "re-attached" if s["reattached"] else "")
    out.print(t)
    if data["endpoint_call"]:
        out.print(f"deployment {data['deployment']['name']} ({data['deployment']['state']}):", highlight=False,
                  markup=False)
        out.print(f"  {data['endpoint_call']}", highlight=False, soft_wrap=True, markup=False)
    for line in data["ollama"]:
        out.print(f"  {line}", highlight=False, markup=False)
    for line in extra:
        out.print(line, highlight=False, markup=False)
    out.print(f"report {uri}: {html}")


def upload_sources(c, spec) -> None:
    """The file's local paths (the loader made them absolute) sent to the store and named by their uploads, so a
    stack that does not share this machine's disk runs the same file; the pipeline's id then follows the files'
    contents, not where they lie."""
    from services.sdk.client import URL

    holders = [spec.base, spec.data, spec.fact_probes, *spec.train_extra]
    for h in holders:
        if h.source and not URL.match(h.source):
            with UploadBar(Path(h.source).name) as bar:
                h.uploaded_from, h.source = h.source, rpc(c.upload, h.source, bar)


@pipeline_app.command("run")
def run(file: Path = typer.Argument(..., help="A pipeline file (examples/demo.yaml)."),
        smoke: bool = typer.Option(False, help="The same arc on the file's smoke slice; nothing is promoted."),
        set_: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=1 (repeatable)."),
        force: bool = typer.Option(False, help="Run past failed gates (the report is stamped forced)."),
        key: str = typer.Option("", "--key", help="The pipeline's id (default <name>-<hash of the spec>)."),
        keep_up: bool = typer.Option(False, help="Leave an embedded stack this command started running.")) -> None:
    """Run a pipeline file: every stage a job of its service, re-attached on a re-run; the report at the end."""
    spec = load(file, list(set_))
    if force:
        spec.force = True
    started = not OPTS["target"] and stack.StackState.load() is None
    if started:
        with err.status("starting the embedded stack") as st:
            state = stack.up(on_step=lambda s: st.update(s))
        err.print(f"stack up: Ray head {state.ray_start_s:.1f}s, services ready {state.ready_s:.1f}s")
    served = False
    try:
        c = client()
        t0 = time.monotonic()
        upload_sources(c, spec)
        job = rpc(c.submit_pipeline, spec, smoke=smoke, key=key)
        err.print(f"[bold]pipeline {job.labels.get('pipeline', job.id)}[/bold]: job {job.id}")
        final = follow(c, job.id)
        wall = time.monotonic() - t0
        found = report_of(c, job.id, required=final.state == pb.JOB_STATE_SUCCEEDED)
        if found is None:  # it failed before it could write a report
            err.print(f"[red]pipeline {state_name(final.state)}[/red]: {final.state_reason}")
            raise typer.Exit(1)
        uri, data, html = found
        served = bool(data["deployment"].get("base_url")) and not smoke
        if OPTS["json"]:
            emit({**data, "report": uri, "report_html": str(html), "job": final.id,
                  "state": state_name(final.state), "wall_seconds": round(wall, 1)})
        else:
            summary(data, html, uri)
        if final.state != pb.JOB_STATE_SUCCEEDED:
            err.print(f"[red]pipeline {state_name(final.state)}[/red]: {final.state_reason}")
            raise typer.Exit(1)
    finally:
        if started and not keep_up and not served:
            stack.down()
        elif started and served:
            err.print("the embedded stack stays up: it serves the deployment (`tunery down` stops it)")


@pipeline_app.command("report")
def report(pipeline: str = typer.Argument(..., help="A pipeline id (or the job id of one of its attempts)."),
           open_: bool = typer.Option(False, "--open", help="Open the HTML report in a browser.")) -> None:
    """A pipeline's report: the summary here, the HTML page saved (and opened), with the blind A/B votes cast
    since (`tunery arena`)."""
    from services.pipeline.report import with_arenas

    c = client()
    uri, data, html = report_of(c, pipeline)
    ab = arenas(c, data)
    html.write_text(with_arenas(html.read_text(), ab))
    if OPTS["json"]:
        emit({**data, "report": uri, "report_html": str(html), "arena": ab})
    else:
        summary(data, html, uri, ab)
    if open_:
        webbrowser.open(html.as_uri())


@pipeline_app.command("cancel")
def cancel(pipeline: str = typer.Argument(..., help="A pipeline's job id."),
           reason: str = typer.Option("", help="Why (kept in the job's state).")) -> None:
    """Cancel a pipeline: the stage job that runs is cancelled with it."""
    job = rpc(client().cancel_job, pipeline, reason)
    out.print(f"job {job.id} {state_name(job.state)}")
