"""The pipeline's one report: pipeline.json (every figure) and pipeline.html (what a person reads first).

The page: the verdict and why; the lineage as a picture (what was made from what); per form of the model (base,
base + prompting, base + adapter, merged, each quantized form, the deployment) each block's pass rate with its 95%
interval; the flips (fail -> pass, pass -> fail); the loss curve; is prompting enough; the merge's equivalence
figures; sizes; each stage's wall time; how to call the endpoint. Self-contained (inline SVG and the PNG as data).
"""

from __future__ import annotations

import base64
import html
import time
from typing import TYPE_CHECKING, Any

from services.gen.tunery.v1 import evaluation_pb2

if TYPE_CHECKING:
    from services.pipeline.job import Pipeline

# the lineage picture: the line from the base to what is served, left to right (each box made from the one before
# it, with the base's tokenizer and weights); the other inputs are named under it
LINEAGE = ("base", "dataset", "training_mix", "adapter", "merged")
INPUTS = ("raw", "generated", "fact_probes")


def _blocks(report: evaluation_pb2.EvalReport) -> dict[str, dict]:
    return {evaluation_pb2.EvalBlock.Name(b.block).removeprefix("EVAL_BLOCK_").lower(): {
        "passed": b.passed, "total": b.total, "pass_rate": round(b.pass_rate, 4),
        "ci": [round(b.ci_low, 4), round(b.ci_high, 4)], "errored": b.errored,
        **({"exact_passed": b.exact_passed, "exact_total": b.exact_total} if b.exact_total else {})}
        for b in report.blocks}


def build_report(p: Pipeline, error: str = "") -> dict[str, Any]:
    reports, uris = p.reports(), p.report_uris()
    gate = p.gate
    verdict = "ERROR" if error else (gate.get("verdict") or "NOT EVALUATED")
    runs = p.stages.runs
    ollama = [f"ollama create {p.name()} -f Modelfile   # in a folder holding {f.name}'s files ({f.artifact})"
              for f in p.forms if f.name.startswith("gguf")]
    dep = p.deployment
    call = ""
    if dep.get("base_url"):
        model = dep["served_models"][-1] if dep.get("served_models") else dep["name"]
        call = (f"curl {dep['base_url'].rstrip('/')}/chat/completions -H 'Authorization: Bearer $TUNERY_API_KEY' "
                f"-H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": "
                "\"user\", \"content\": \"...\"}]}'")
    return {
        "pipeline": p.job.pipeline_id, "name": p.spec.name, "smoke": p.smoke, "forced": bool(p.spec.force),
        "smoke_slice": p.slice if p.smoke else {}, "verdict": verdict, "error": error, "notes": p.notes,
        "finished_at": time.time(), "artifacts": p.made, "gates": gate,
        "prompting_enough": _prompting(reports, gate),
        "forms": [{"name": f.name, "artifact": f.artifact, "report": f.report, "compared_with": f.compared_with,
                   "verdict": f.verdict, "reasons": f.reasons, "differences": f.differences,
                   "greedy_agreement": f.greedy_agreement, "comparison": f.comparison, "metrics": f.metrics,
                   "paired": f.paired} for f in p.forms],
        "blocks": {name: _blocks(r) for name, r in reports.items()},
        "reports": uris,  # each evaluated form's report by its name (base, base+adapter, merged, ...)
        "eval_seconds": {name: {k: round(v, 1) for k, v in p.c.get_artifact(uri).metrics.items()
                                if k in ("server_start_s", "tests_s")} for name, uri in uris.items()},
        "training": {k: v for k, v in getattr(p, "train_metrics", {}).items()
                     if k in ("train_loss", "final_loss", "seconds", "step", "num_tokens")},
        "stages": [{"stage": r.stage, "job": r.job_id, "state": r.state, "seconds": r.seconds,
                    "reattached": r.reattached, "waited_s": r.waited_s} for r in runs.values()],
        "total_stage_seconds": round(sum(r.seconds for r in runs.values()), 1),
        "deployment": dep, "endpoint_call": call, "ollama": ollama,
    }


def _prompting(reports: dict, gate: dict) -> dict:
    if "base+prompting" not in reports:
        return {}
    target = {n: _blocks(r).get("target", {}).get("pass_rate") for n, r in reports.items()
              if n in ("base", "base+prompting", "base+adapter")}
    beats = gate.get("beats_prompting_baseline")
    return {"target_pass_rate": target, "adapter_beats_prompting": beats,
            "answer": ("no: the adapter beats the prompted base" if beats else
                       "it may be: the adapter does not beat the prompted base" if beats is False else "not compared")}


# ---------------------------------------------------------------------- HTML
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4}.PASS{color:#176f2c;font-weight:600}.FAIL,.ERROR{color:#b00020;font-weight:600}
.stamp{display:inline-block;padding:2px 8px;border-radius:4px;background:#fde7a9;margin-left:.5em}
code,pre{background:#f6f6f6;padding:2px 4px;border-radius:3px}pre{padding:8px;white-space:pre-wrap}
.bar{display:inline-block;height:10px;background:#4a78c2;vertical-align:middle}
.ci{display:inline-block;height:2px;background:#222;vertical-align:middle;position:relative}"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _lineage_svg(artifacts: dict[str, str], forms: list[dict], deployment: dict) -> str:
    nodes = [(k, artifacts[k]) for k in LINEAGE if artifacts.get(k)]
    nodes += [(f["name"], f["artifact"]) for f in forms if f["artifact"] and f["name"] not in ("merged",)
              and f["name"] != "base+adapter"]
    if deployment.get("name"):
        nodes.append((f"deployment {deployment['name']}", deployment.get("base_url", "")))
    w, h, gap = 150, 46, 24
    width = max(1, len(nodes)) * (w + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 20}" role="img" '
             'aria-label="lineage">']
    for i, (role, uri) in enumerate(nodes):
        x = i * (w + gap)
        short = uri.rsplit("/", 1)[-1][:24]
        parts.append(f'<rect x="{x}" y="10" width="{w}" height="{h}" rx="6" fill="#eef3fb" stroke="#4a78c2"/>'
                     f'<text x="{x + 8}" y="30" font-size="12" font-weight="600">{_e(role)}</text>'
                     f'<text x="{x + 8}" y="47" font-size="10" fill="#555">{_e(short)}</text>')
        if i:
            parts.append(f'<line x1="{x - gap}" y1="{10 + h / 2}" x2="{x - 4}" y2="{10 + h / 2}" stroke="#888" '
                         'marker-end="url(#a)"/>')
    parts.insert(1, '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="6" refY="3" orient="auto">'
                    '<path d="M0,0 L6,3 L0,6 z" fill="#888"/></marker></defs>')
    parts.append("</svg>")
    return "".join(parts)


def _rate_cell(b: dict | None) -> str:
    if not b or not b.get("total"):
        return "<td>–</td>"
    lo, hi = b["ci"]
    bar = (f'<span class="bar" style="width:{int(b["pass_rate"] * 80)}px"></span> '
           f'<span class="ci" style="width:{max(1, int((hi - lo) * 80))}px;margin-left:'
           f'{int(lo * 80) - int(b["pass_rate"] * 80) - 4}px"></span>')
    extra = f" (exact {b['exact_passed']}/{b['exact_total']})" if b.get("exact_total") else ""
    err = f", {b['errored']} not measured" if b.get("errored") else ""
    return (f"<td>{bar} {b['pass_rate']:.0%} <small>[{lo:.0%}, {hi:.0%}]</small><br>"
            f"<small>{b['passed']}/{b['total']}{extra}{err}</small></td>")


def render_html(d: dict, loss_png: bytes = b"") -> str:
    stamps = "".join(f'<span class="stamp">{s}</span>' for s, on in (("SMOKE: never promoted", d["smoke"]),
                                                                      ("FORCED past failed gates", d["forced"])) if on)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>pipeline {_e(d['pipeline'])}</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>{_e(d['name'] or d['pipeline'])}</h1><p><code>{_e(d['pipeline'])}</code>{stamps}</p>",
           f"<h2>Verdict: <span class='{_e(d['verdict'])}' id='verdict'>{_e(d['verdict'])}</span></h2>"]
    if d["error"]:
        out.append(f"<p class='ERROR'>{_e(d['error'])}</p>")
    out += [f"<ul>{''.join(f'<li>{_e(r)}</li>' for r in d['gates'].get('reasons', []))}"
            f"{''.join(f'<li><em>{_e(n)}</em></li>' for n in d['notes'])}</ul>"]
    inputs = [f"{k.replace('_', ' ')} <code>{_e(d['artifacts'][k])}</code>" for k in INPUTS if d["artifacts"].get(k)]
    out.append("<h2>Lineage</h2><div style='overflow-x:auto'>" + _lineage_svg(d["artifacts"], d["forms"],
                                                                               d["deployment"]) + "</div>"
               + (f"<p><small>inputs: {', '.join(inputs)}</small></p>" if inputs else ""))
    blocks = sorted({b for r in d["blocks"].values() for b in r})
    if blocks:
        out.append("<h2>Every form, block by block</h2><table id='forms'><tr><th>form</th>"
                   + "".join(f"<th>{_e(b)}</th>" for b in blocks) + "<th>vs</th><th>verdict</th></tr>")
        verdicts = {f["name"]: f for f in d["forms"]}
        if d["deployment"].get("report"):
            verdicts[f"deployment {d['deployment']['name']}"] = {
                "verdict": d["deployment"].get("verdict", ""), "compared_with": d["deployment"].get("form", "")}
        for name, r in d["blocks"].items():
            f = verdicts.get(name, {})
            out.append(f"<tr><td>{_e(name)}</td>" + "".join(_rate_cell(r.get(b)) for b in blocks)
                       + f"<td>{_e(f.get('compared_with', ''))}</td>"
                       f"<td class='{_e(f.get('verdict', ''))}'>{_e(f.get('verdict', ''))}</td></tr>")
        out.append("</table><p><small>95% Wilson intervals. A form is compared with the one it was made from on "
                   "the same tests: only precision, quantization and engine differ.</small></p>")
    pr = d["prompting_enough"]
    if pr:
        out.append(f"<h2>Is prompting enough?</h2><p>{_e(pr['answer'])}. Target pass rate: "
                   + ", ".join(f"{_e(k)} {v:.0%}" for k, v in pr["target_pass_rate"].items() if v is not None)
                   + "</p>")
    g = d["gates"]
    if g:
        fl = g["flips"]
        out.append(f"<h2>Flips</h2><p>{fl['fail_to_pass']} fail → pass, {fl['pass_to_fail']} pass → fail</p>")
        if g.get("paired"):
            out.append("<table><tr><th>block</th><th>pairs</th><th>gained</th><th>lost</th><th>difference [95%]"
                       "</th><th>McNemar p</th><th>forgetting (pts)</th></tr>" + "".join(
                           f"<tr><td>{_e(p['block'])}</td><td>{p['pairs']}</td><td>{p['gained']}</td><td>{p['lost']}"
                           f"</td><td>{p['difference']:+.0%} [{p['ci'][0]:+.0%}, {p['ci'][1]:+.0%}]</td>"
                           f"<td>{p['mcnemar_p']:.3g}</td><td>{p['forgetting_points']:.1f}</td></tr>"
                           for p in g["paired"]) + "</table>")
        if fl["tests"]:
            out.append("<details><summary>the flipped tests</summary><table><tr><th>test</th><th></th><th>before"
                       "</th><th>after</th></tr>" + "".join(
                           f"<tr><td>{_e(t['test'])}</td><td>{'fail → pass' if t['now_passes'] else 'pass → fail'}"
                           f"</td><td>{_e(t['baseline'])}</td><td>{_e(t['candidate'])}</td></tr>"
                           for t in fl["tests"][:40]) + "</table></details>")
    if loss_png:
        out.append("<h2>Training loss</h2><img alt='loss curve' src='data:image/png;base64,"
                   + base64.b64encode(loss_png).decode() + "'>")
    merged = next((f for f in d["forms"] if f["name"] == "merged"), None)
    if merged and merged["metrics"]:
        m = merged["metrics"]
        out.append("<h2>Merged = base + adapter</h2><p>largest logit difference "
                   f"{m.get('max_abs_logit_diff', float('nan')):.3g}, mean KL {m.get('mean_kl', float('nan')):.3g}, "
                   f"greedy continuations identical on {int(m.get('greedy_identical', 0))} of "
                   f"{int(m.get('probe_prompts', 0))} probe prompts</p>")
    sized = [f for f in d["forms"] if f["metrics"].get("output_bytes") or f["metrics"].get("bytes_written")]
    if sized:
        out.append("<h2>Sizes</h2><table><tr><th>form</th><th>MiB</th><th>compression</th></tr>" + "".join(
            f"<tr><td>{_e(f['name'])}</td><td>{(f['metrics'].get('output_bytes') or f['metrics'].get('bytes_written')) / 2**20:.1f}"
            f"</td><td>{f['metrics'].get('compression_ratio', 1.0):.2f}×</td></tr>" for f in sized) + "</table>")
    out.append("<h2>Stages</h2><table id='stages'><tr><th>stage</th><th>job</th><th>state</th><th>seconds</th>"
               "<th></th></tr>" + "".join(
                   f"<tr><td>{_e(s['stage'])}</td><td><code>{_e(s['job'])}</code></td><td>{_e(s['state'])}</td>"
                   f"<td>{s['seconds']:.1f}</td><td>{'re-attached' if s['reattached'] else ''}</td></tr>"
                   for s in d["stages"]) + f"</table><p>total {d['total_stage_seconds']:.0f} s in stage jobs</p>")
    if d["endpoint_call"] or d["ollama"]:
        out.append("<h2>Use it</h2>")
        if d["endpoint_call"]:
            out.append(f"<p>deployment <code>{_e(d['deployment']['name'])}</code> "
                       f"({_e(d['deployment'].get('state', ''))}):</p><pre>{_e(d['endpoint_call'])}</pre>")
            a = d["deployment"].get("answered") or {}
            if a:
                out.append(f"<p>it answered an openai-client request in {a['seconds']:.1f} s:</p><pre id='answer'>"
                           f"&gt; {_e(a['prompt'])}\n{_e(a['reply'])}</pre>")
        out += [f"<pre>{_e(line)}</pre>" for line in d["ollama"]]
    out.append("</body></html>")
    return "\n".join(out)


def with_arenas(page: str, sentences: list[str]) -> str:
    """The page with the blind A/B results (`tunery arena` between two of the pipeline's reports) in a section of
    its own. A person votes after the pipeline has ended, so `tunery pipeline report` adds them to the page it
    saves; the stored report stays as the pipeline wrote it."""
    if not sentences:
        return page
    section = ("<h2>Blind A/B</h2><ul id='arena'>" + "".join(f"<li>{_e(s)}</li>" for s in sentences) + "</ul>"
               "<p><small>a person's votes between two reports' outputs, sides hidden (<code>tunery arena A B</code>); "
               "the interval is Wilson's, over the decisive votes</small></p>")
    head, sep, tail = page.rpartition("</body>")
    return head + section + sep + tail if sep else page + section
