"""Self-contained HTML for eval reports and comparisons (inline CSS and SVG bars; no scripts, no network).
The JSON twin of each page is saved next to it (report.json, comparison.json)."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment

from services.evaluation.scoring import BLOCKS, chat_messages

_env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;width:100%;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 6px;
vertical-align:top;text-align:left}th{background:#f4f4f4}
.pass{color:#17803d;font-weight:600}.fail{color:#b42318;font-weight:600}.mono{font-family:ui-monospace,monospace;
white-space:pre-wrap;font-size:12px}.verdict{font-size:18px;padding:8px 12px;display:inline-block;border-radius:6px}
.v-pass{background:#dcfae6}.v-fail{background:#fee4e2}.warn{background:#fef0c7;padding:6px 10px;border-radius:6px}
.small{color:#666;font-size:12px}
"""

COLORS = {"baseline": "#98a2b3", "prompting": "#f79009", "candidate": "#1570ef", "run": "#1570ef"}


def bars_svg(series: dict[str, dict[str, dict[str, float]]]) -> str:
    """Grouped horizontal bars: for each block, one bar per series (pass rate) with its 95% interval."""
    rows = [b for b in BLOCKS if any(b in blocks for blocks in series.values())]
    bar_h, gap, left, width = 16, 10, 120, 520
    height = sum(len(series) * bar_h + gap for _ in rows) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 210}" height="{height}">']
    y = 10
    for block in rows:
        parts.append(f'<text x="0" y="{y + bar_h}" font-size="13">{block}</text>')
        for name, blocks in series.items():
            b = blocks.get(block)
            if b:
                w = width * b["pass_rate"]
                lo, hi = left + width * b["ci_low"], left + width * b["ci_high"]
                parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 3}" '
                             f'fill="{COLORS.get(name, "#667085")}"/>')
                parts.append(f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + bar_h / 2 - 1}" y2="{y + bar_h / 2 - 1}" '
                             f'stroke="#101828" stroke-width="1.5"/>')
                parts.append(f'<text x="{left + width + 8}" y="{y + bar_h - 4}" font-size="12">{name}: '
                             f'{b["passed"]:.0f}/{b["total"]:.0f} ({b["pass_rate"]:.0%})</text>')
            y += bar_h
        y += gap
    parts.append(f'<line x1="{left}" x2="{left}" y1="0" y2="{y}" stroke="#999"/>'
                 f'<line x1="{left + width}" x2="{left + width}" y1="0" y2="{y}" stroke="#ddd"/></svg>')
    return "".join(parts)


REPORT = _env.from_string("""<!doctype html><html><head><meta charset="utf-8"><title>eval: {{ r.name }}</title>
<style>{{ style }}</style></head><body>
<h1>Eval report: {{ r.name }}</h1>
<p>target <b>{{ r.target.kind }}</b> {{ r.target_label }}; answered by <code>{{ r.answering_model }}</code>
({{ 'checked' if r.answering_checked else 'NOT the target' }}).</p>
<h2>Pass rate per block (95% Wilson interval)</h2>{{ bars|safe }}
<table><tr><th>block</th><th>passed / measured</th><th>95% CI</th><th>not measured (errored)</th>
<th>exact match</th></tr>{% for name, b in r.blocks.items() %}<tr><td>{{ name }}</td>
<td>{{ b.passed }}/{{ b.total }} ({{ '%.1f'|format(100 * b.pass_rate) }}%)</td>
<td>{{ '%.1f'|format(100 * b.ci_low) }} .. {{ '%.1f'|format(100 * b.ci_high) }}%</td>
<td>{{ b.errored_reason or 'none' }}</td><td>{% if b.exact_total %}{{ b.exact_passed }}/{{ b.exact_total }}{% else %}–
{% endif %}</td></tr>{% endfor %}</table>
<p class="small">fact probes pass when the answer appears as a whole word or phrase (knowledge); exact match is the
stricter figure beside it. Errored tests (the request failed) are not failures: they are left out of the rate.</p>
<h2>Controls</h2><table>{% for k, v in r.controls.items() %}<tr><th>{{ k }}</th><td class="mono">{{ v }}</td></tr>
{% endfor %}</table>
{% if r.lm_eval %}<h2>lm-eval {{ r.lm_eval.version }} tasks</h2><table><tr><th>task</th><th>source</th><th>type</th>
<th>metric</th><th>value ± stderr</th><th>documents</th><th>shots</th><th>other metrics</th></tr>
{% for name, t in r.lm_eval.tasks.items() %}<tr><td class="mono">{{ name }}</td><td>{{ t.source }}</td>
<td>{{ t.output_type }}</td><td>{{ t.primary }}</td><td>{{ fmt(t.value) }}{% if t.primary_stderr is not none %} ±
{{ fmt(t.primary_stderr) }}{% endif %}</td><td>{{ t.n }}</td><td>{{ t.num_fewshot if t.num_fewshot is not none else '' }}
</td><td class="small">{% for k, v in t.metrics.items() if k != t.primary %}{{ k }} {{ fmt(v) }} {% endfor %}</td></tr>
{% endfor %}</table><p class="small">each document a 0/1 metric scores is a test of the general block below;
lm-eval's own results and samples files are in lm-eval/</p>{% endif %}
<p class="small">server start {{ '%.1f'|format(r.timing.server_start_s) }} s, tests
{{ '%.1f'|format(r.timing.tests_s) }} s; raw promptfoo results: out.json (<code>promptfoo view</code>)</p>
<h2>Tests</h2><table><tr><th>block</th><th>id</th><th>prompt</th><th>output</th><th>result</th><th>ms</th></tr>
{% for t in r.tests %}<tr><td>{{ t.block }}</td><td class="mono">{{ t.id }}</td>
<td class="mono">{{ conversation(t.prompt) }}</td><td class="mono">{{ t.output }}</td>
{% if t.errored %}<td class="warn">errored<div class="small">{{ t.reason }}</div></td>{% else %}
<td class="{{ 'pass' if t.passed else 'fail' }}">{{ 'pass' if t.passed else 'fail' }}
{% if not t.passed %}<div class="small">{{ t.reason }}</div>{% endif %}</td>{% endif %}<td>{{ '%.0f'|format(t.latency_ms) }}</td>
</tr>{% endfor %}</table></body></html>""")

COMPARISON = _env.from_string("""<!doctype html><html><head><meta charset="utf-8"><title>comparison</title>
<style>{{ style }}</style></head><body>
<h1>Baseline vs candidate</h1>
<p>baseline <code>{{ c.baseline }}</code><br>candidate <code>{{ c.candidate }}</code>
{% if c.prompting_baseline %}<br>prompting baseline <code>{{ c.prompting_baseline }}</code>{% endif %}</p>
{% if c.uncontrolled %}<p class="warn">UNCONTROLLED comparison: {{ c.control_mismatches|join('; ') }}</p>{% endif %}
<p class="verdict v-{{ c.verdict }}">verdict: {{ c.verdict|upper }}</p>
<ul>{% for r in c.verdict_reasons %}<li>{{ r }}</li>{% endfor %}</ul>
<h2>Pass rate per block (95% Wilson interval)</h2>{{ bars|safe }}
{% if c.lm_eval_deltas %}<h2>lm-eval tasks (candidate − baseline, 95% interval)</h2><table><tr><th>task</th>
<th>metric</th><th>baseline</th><th>candidate</th><th>delta</th><th>95% CI</th></tr>
{% for d in c.lm_eval_deltas %}<tr><td class="mono">{{ d.task }}</td><td>{{ d.metric }}</td><td>{{ fmt(d.baseline) }}</td>
<td>{{ fmt(d.candidate) }}</td><td class="{{ 'fail' if d.worse else '' }}">{{ '%+.3f'|format(d.delta) }}</td>
<td>{{ '%+.3f'|format(d.ci_low) }} .. {{ '%+.3f'|format(d.ci_high) }}</td></tr>{% endfor %}</table>{% endif %}
{% if c.paired %}<h2>Paired comparison (the same tests on both sides)</h2><table><tr><th>block</th><th>pairs</th>
<th>gained</th><th>lost</th><th>difference</th><th>95% CI</th><th>McNemar exact p</th><th>forgetting</th></tr>
{% for p in c.paired %}<tr><td>{{ p.block }}</td><td>{{ p.pairs }}</td><td class="pass">{{ p.gained }}</td>
<td class="fail">{{ p.lost }}</td><td>{{ '%+.1f'|format(100 * p.difference) }} pts</td>
<td>{{ '%+.1f'|format(100 * p.ci_low) }} .. {{ '%+.1f'|format(100 * p.ci_high) }}</td>
<td>{{ '%.2g'|format(p.mcnemar_p) }}</td><td>{{ '%.1f'|format(p.forgetting_points) }} pts</td></tr>{% endfor %}
</table><p class="small">forgetting counts only the tests lost (pass → fail): gains elsewhere do not buy them back.
Errored tests are left out of both sides.</p>{% endif %}
<h2>Flips ({{ c.flips|length }})</h2><table><tr><th>block</th><th>change</th><th>prompt</th><th>baseline output</th>
<th>candidate output</th></tr>
{% for f in c.flips %}<tr><td>{{ f.block }}</td>
<td class="{{ 'pass' if f.now_passes else 'fail' }}">{{ 'fail → pass' if f.now_passes else 'pass → fail' }}</td>
<td class="mono">{{ conversation(f.prompt) }}</td><td class="mono">{{ f.baseline_output }}</td>
<td class="mono">{{ f.candidate_output }}</td></tr>
{% endfor %}</table>
<h2>Every test, side by side</h2><table><tr><th>block</th><th>prompt</th><th>baseline output</th><th>candidate output</th>
{% if p %}<th>prompting baseline output</th>{% endif %}</tr>
{% for row in rows %}<tr><td>{{ row.block }}</td><td class="mono">{{ conversation(row.prompt) }}</td>
<td class="mono"><span class="{{ 'pass' if row.b_pass else 'fail' }}">{{ '✔' if row.b_pass else '✘' }}</span> {{ row.b_out }}</td>
<td class="mono"><span class="{{ 'pass' if row.c_pass else 'fail' }}">{{ '✔' if row.c_pass else '✘' }}</span> {{ row.c_out }}</td>
{% if p %}<td class="mono">{% if row.p_seen %}<span class="{{ 'pass' if row.p_pass else 'fail' }}">
{{ '✔' if row.p_pass else '✘' }}</span> {{ row.p_out }}{% endif %}</td>{% endif %}</tr>{% endfor %}</table>
</body></html>""")


def conversation(prompt: Any) -> str:
    """A chat prompt (the messages as JSON) as a person reads it: one "role: content" paragraph per message."""
    msgs = chat_messages(prompt)
    if msgs is None:
        return str(prompt)
    out = []
    for m in msgs:
        content = m.get("content")
        if isinstance(content, list):  # content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        calls = m.get("tool_calls") or []
        text = str(content or "") + "".join(
            f" [calls {c.get('function', {}).get('name')}({c.get('function', {}).get('arguments', '')})]"
            for c in calls if isinstance(c, dict))
        out.append(f"{m['role']}: {text.strip()}")
    return "\n\n".join(out)


def fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"


def report_html(report: dict[str, Any]) -> str:
    return REPORT.render(r=report, style=STYLE, bars=bars_svg({"run": report["blocks"]}), fmt=fmt,
                         conversation=conversation)


def comparison_html(body: dict[str, Any], baseline: dict[str, Any], candidate: dict[str, Any],
                    prompting: dict[str, Any] | None) -> str:
    series = {"baseline": baseline["blocks"]}
    if prompting:
        series["prompting"] = prompting["blocks"]
    series["candidate"] = candidate["blocks"]
    base = {t["id"]: t for t in baseline["tests"]}
    prompted = {t["id"]: t for t in (prompting or {}).get("tests", [])}
    rows = []
    for t in candidate["tests"]:
        b, p = base.get(t["id"], {}), prompted.get(t["id"])
        rows.append({"block": t["block"], "prompt": t.get("prompt", ""), "c_out": t.get("output", ""),
                     "c_pass": t["passed"], "b_out": b.get("output", "(not run)"), "b_pass": b.get("passed", False),
                     "p_seen": p is not None, "p_out": (p or {}).get("output", ""), "p_pass": (p or {}).get("passed")})
    return COMPARISON.render(c=body, rows=rows, p=prompting, style=STYLE, bars=bars_svg(series), fmt=fmt,
                             conversation=conversation)
