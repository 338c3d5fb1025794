"""The inspection report of a prepare run: report.json and its self-contained HTML twin (same numbers).

The HTML has no external assets: inline CSS, histograms as base64 PNG data URIs (matplotlib's Agg canvas, no
pyplot and no global backend switch), and every piece of dataset text HTML-escaped. It is rendered from the JSON
dict alone, so the two cannot disagree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from services.datagen.validate import conversation_parts

SAMPLE_SIZE = 20
MAX_FLAGGED = 200
MAX_CLUSTERS = 200
BINS = 40


class Stats:
    """What the report needs of every kept example, in O(1) memory per example (two ints)."""

    def __init__(self) -> None:
        self.prompt_tokens = array("I")
        self.response_tokens = array("I")
        self.turns: Counter[int] = Counter()
        self.roles: Counter[str] = Counter()
        self.tool_calls: Counter[str] = Counter()
        self.tools_declared: Counter[str] = Counter()

    def add(self, example: dict[str, Any], lengths: tuple[int, int]) -> None:
        self.prompt_tokens.append(lengths[0])
        self.response_tokens.append(lengths[1])
        _, turns = conversation_parts(example)
        self.turns[len(turns)] += 1
        for m in turns:
            self.roles[m["role"]] += 1
            for c in m.get("tool_calls") or ():
                self.tool_calls[c["function"]["name"]] += 1
        for t in example.get("tools") or ():
            self.tools_declared[t["function"]["name"]] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": {"prompt": length_summary(self.prompt_tokens),
                       "response": length_summary(self.response_tokens)},
            "turns_per_example": {str(k): v for k, v in sorted(self.turns.items())},
            "roles": dict(sorted(self.roles.items())),
            "tool_calls": dict(self.tool_calls.most_common()),
            "tools_declared": dict(self.tools_declared.most_common()),
        }


class Reservoir:
    """A seeded uniform sample of k items from a stream (algorithm R): deterministic for the same stream."""

    def __init__(self, k: int, seed: int):
        self.k, self.rng, self.n = k, random.Random(f"report-sample:{seed}"), 0
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        if len(self.items) < self.k:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.n + 1)
            if j < self.k:
                self.items[j] = item
        self.n += 1


def length_summary(values: array) -> dict[str, Any]:
    import numpy as np

    if not values:
        return {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0,
                "histogram": {"edges": [], "counts": []}}
    v = np.frombuffer(values, dtype=np.uint32) if values.itemsize == 4 else np.asarray(values)
    lo, hi = int(v.min()), int(v.max())
    counts, edges = np.histogram(v, bins=max(1, min(BINS, hi - lo + 1)), range=(lo, hi + 1))
    return {"count": int(v.size), "min": lo, "mean": round(float(v.mean()), 2),
            "p50": int(np.percentile(v, 50, method="lower")), "p90": int(np.percentile(v, 90, method="lower")),
            "p99": int(np.percentile(v, 99, method="lower")), "max": hi,
            "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts]}}


def histogram_png(hist: dict[str, list], title: str, color: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if hist["counts"]:
        ax.stairs(hist["counts"], hist["edges"], fill=True, color=color)
    else:
        ax.text(0.5, 0.5, "no examples", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens")
    ax.set_ylabel("examples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def render_sample(tokenizer: Any, example: dict[str, Any]) -> dict[str, Any]:
    """One example as the model will see it: the chat template's text of the whole conversation."""
    _, full = conversation_parts(example)
    item = {"line": example["source"]["line"], "id": example["id"], "label": example.get("label")}
    try:
        item["text"] = tokenizer.render(full, example.get("tools"), False)
        if example.get("preference") is not None:
            item["rejected_text"] = tokenizer.render(example["messages"] + example["preference"]["rejected"],
                                                     example.get("tools"), False)
    except Exception as e:  # noqa: BLE001 - the template's own error is the most useful thing to show
        item["text"] = f"(the chat template failed: {e})"
    return item


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


# ---------------------------------------------------------------------------------------------------- HTML
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#1d1d1f}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f5f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#0a7d32}.failed{color:#b3261e}.error{color:#b3261e}.warning{color:#8a5a00}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.85em;color:#555}
pre{background:#f5f5f7;border:1px solid #e2e2e6;padding:.6em;white-space:pre-wrap;word-break:break-word;
max-height:28em;overflow:auto;font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
.sample h3{font-size:.95em;margin:1.2em 0 .3em}code{font-size:.92em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    if not rows:
        return "<p>none</p>"
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{v:,}</td>' if isinstance(v, int) and not isinstance(v, bool)
                                    else f"<td>{_e(v)}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _problems(problems: list[dict[str, Any]]) -> str:
    return _table([(p["line"], p["field"], p["message"]) for p in problems], ("line", "field", "message"))


def render_html(r: dict[str, Any]) -> str:
    counts, stats = r["counts"], r.get("stats", {})
    tokens = stats.get("tokens", {})
    status = ('<p class="ok">OK: the dataset was prepared.</p>' if r["ok"] else
              f'<p class="failed">FAILED: {counts["errors"]:,} error(s); no train/holdout files were written.</p>')
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Dataset report: {_e(r['file'])}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Dataset report: <code>{_e(r['file'])}</code></h1>", status,
             f"<p>Detected format: <strong>{_e(r['detected_format'] or 'unknown')}</strong>. Options: "
             f"<code>{_e(json.dumps(r['options'], sort_keys=True))}</code></p>",
             "<h2>Counts</h2>", _table([(k.replace("_", " "), v) for k, v in counts.items()], ("what", "examples"))]
    if r.get("train_sha256"):
        parts.append(_table([("train.jsonl", r["train_sha256"]), ("holdout.jsonl", r["holdout_sha256"])],
                            ("file", "sha256")))
    parts.append("<h2>Token lengths</h2>")
    for key, title, color in (("prompt", "Prompt tokens", "#4a6fa5"), ("response", "Response tokens", "#c2703d")):
        s = tokens.get(key) or length_summary(array("I"))
        png = base64.b64encode(histogram_png(s["histogram"], title, color)).decode("ascii")
        parts.append(f'<figure><img alt="{_e(title)} histogram" width="560" height="280" '
                     f'src="data:image/png;base64,{png}"><figcaption>{_e(title)}: min {s["min"]}, mean {s["mean"]}, '
                     f'p50 {s["p50"]}, p90 {s["p90"]}, p99 {s["p99"]}, max {s["max"]}</figcaption></figure>')
    parts += ["<h2>Turns and roles</h2>",
              _table([(int(k), v) for k, v in stats.get("turns_per_example", {}).items()], ("turns", "examples")),
              _table(list(stats.get("roles", {}).items()), ("role", "turns")),
              "<h2>Tools</h2><h3>Calls by name</h3>", _table(list(stats.get("tool_calls", {}).items()), ("tool", "calls")),
              "<h3>Declared in <code>tools</code></h3>",
              _table(list(stats.get("tools_declared", {}).items()), ("tool", "examples"))]
    if r.get("labels"):
        parts += ["<h2>Labels</h2>",
                  _table([(k, v["train"], v["holdout"]) for k, v in r["labels"].items()], ("label", "train", "holdout"))]
    clusters = r.get("duplicate_clusters", [])
    parts.append(f"<h2>Duplicate clusters ({r.get('num_duplicate_clusters', len(clusters)):,})</h2>")
    parts.append(_table([(c["kind"], ", ".join(f"line {ln} ({i})" for ln, i in c["members"][:1]),
                          ", ".join(f"line {ln} ({i})" for ln, i in c["members"][1:])) for c in clusters],
                        ("kind", "kept", "duplicates")))
    similar = r.get("similar_pairs", [])
    if similar:
        parts.append(f"<h2>Similar pairs to review ({r.get('num_similar_pairs', len(similar)):,}: similarity "
                     f"{r.get('similar_from', 0):.2f} to below the near-duplicate threshold; kept)</h2>")
        parts.append(_table([(f"line {p['line']} ({p['id']})", f"line {p['of_line']} ({p['of_id']})",
                              f"{p['similarity']:.2f}") for p in similar], ("example", "similar to", "similarity")))
    errors = [p for p in r.get("problems", []) if p["severity"] == "error"]
    parts += [f'<h2 class="error">Errors ({counts["errors"]:,}; first {len(errors)} shown)</h2>', _problems(errors),
              f'<h2 class="warning">Flagged examples ({counts["warnings"]:,} warnings; first '
              f'{len(r.get("flagged", []))} shown)</h2>', _problems(r.get("flagged", [])),
              f"<h2>Sample ({len(r.get('sample', []))} examples, rendered with the chat template)</h2>"]
    for s in r.get("sample", []):
        label = f" · label {_e(s['label'])}" if s.get("label") is not None else ""
        block = (f'<div class="sample"><h3>line {_e(s["line"])} · id <code>{_e(s["id"])}</code>{label}</h3>'
                 f"<pre>{_e(s['text'])}</pre>")
        if "rejected_text" in s:
            block += f"<p>rejected:</p><pre>{_e(s['rejected_text'])}</pre>"
        parts.append(block + "</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
