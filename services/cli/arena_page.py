"""The blind A/B page of `tunery arena A B`: a small web server on 127.0.0.1 that shows one pair at a time (the
prompt, two outputs on random sides), takes a person's votes (left, right, tie, both bad; keys 1-4 too) and, on
"save", hands them to `save` (the CLI sends them to the evaluation service, which stores the arena report).

The page never learns which side is which report: the server keeps the sides and turns "left"/"right" into A/B.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.evaluation.arena import Pair

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Tunery arena</title><style>
body{font:15px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
.cols{display:flex;gap:1em}.col{flex:1;border:1px solid #ccc;border-radius:6px;padding:.6em;min-height:6em}
pre{white-space:pre-wrap;margin:0;font:13px/1.4 ui-monospace,monospace}#prompt{background:#f6f6f6;padding:.6em;
border-radius:6px;margin-bottom:1em}button{font-size:15px;margin:.6em .4em 0 0;padding:.4em 1em}
#done,#result{display:none}</style></head><body>
<h1>Which answer is better?</h1><p id="progress"></p>
<div id="vote"><div id="prompt"><pre id="prompt-text"></pre></div>
<div class="cols"><div class="col"><b>Left</b><pre id="left"></pre></div>
<div class="col"><b>Right</b><pre id="right"></pre></div></div>
<button id="b-left" data-c="left">1 · Left is better</button><button id="b-right" data-c="right">2 · Right is better
</button><button id="b-tie" data-c="tie">3 · Tie</button><button id="b-both_bad" data-c="both_bad">4 · Both bad
</button><button id="b-skip" data-c="skip">skip</button></div>
<div id="done"><p id="count"></p><button id="save">Save the votes</button></div>
<h2 id="result"></h2>
<script>
let pairs = [], i = 0, votes = 0, shownAt = 0;
const $ = (id) => document.getElementById(id);
function show() {
  if (i >= pairs.length) { $("vote").style.display = "none"; $("done").style.display = "block";
    $("count").textContent = votes + " of " + pairs.length + " pairs voted"; $("progress").textContent = ""; return; }
  const p = pairs[i];
  $("progress").textContent = "pair " + (i + 1) + " of " + pairs.length + " (" + p.block + ")";
  $("prompt-text").textContent = p.prompt; $("left").textContent = p.left; $("right").textContent = p.right;
  shownAt = performance.now();
}
async function vote(choice) {
  if (i >= pairs.length) return;
  if (choice !== "skip") {
    const r = await fetch("/vote", {method: "POST", body: JSON.stringify({id: pairs[i].id, choice: choice,
      seconds: (performance.now() - shownAt) / 1000})});
    if (!r.ok) { alert(await r.text()); return; }
    votes += 1;
  }
  i += 1; show();
}
document.querySelectorAll("button[data-c]").forEach((b) => b.onclick = () => vote(b.dataset.c));
document.addEventListener("keydown", (e) => { const c = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"}[e.key];
  if (c) vote(c); });
$("save").onclick = async () => { const r = await fetch("/finish", {method: "POST"}); const body = await r.json();
  $("result").style.display = "block"; $("result").textContent = body.sentence || body.error;
  $("save").disabled = true; };
fetch("/pairs").then((r) => r.json()).then((p) => { pairs = p; show(); });
</script></body></html>"""


class ArenaServer:
    """Serves the page for `pairs`; `save(votes)` gets [{test_id, choice a|b|tie|both_bad, a_on_left, seconds}] and
    returns what the page shows ({"sentence": ...}). `wait()` returns once the votes were saved."""

    def __init__(self, pairs: list[Pair], save: Callable[[list[dict]], dict], port: int = 0):
        self.pairs = {p.test_id: p for p in pairs}
        self.order = [p.shown() for p in pairs]
        self.save, self.votes, self.result = save, {}, None
        self.saved = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def start(self) -> "ArenaServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait(self, timeout: float | None = None) -> dict | None:
        self.saved.wait(timeout)
        return self.result

    def record(self, body: dict) -> str:
        """'' or what is wrong with a vote."""
        pair = self.pairs.get(str(body.get("id", "")))
        side = body.get("choice")
        if pair is None:
            return "no such pair"
        if side not in ("left", "right", "tie", "both_bad"):
            return "choice: left, right, tie or both_bad"
        choice = {"left": "a" if pair.a_on_left else "b", "right": "b" if pair.a_on_left else "a"}.get(side, side)
        self.votes[pair.test_id] = {"test_id": pair.test_id, "choice": choice, "a_on_left": pair.a_on_left,
                                    "seconds": round(max(0.0, float(body.get("seconds") or 0.0)), 2),
                                    "at": time.time()}
        return ""

    def finish(self) -> dict:
        votes = [{k: v for k, v in vote.items() if k != "at"} for vote in self.votes.values()]
        try:
            self.result = self.save(votes)
        except Exception as e:  # shown on the page; the votes stay and "save" can be pressed again after a fix
            return {"error": f"not saved: {e}"}
        self.saved.set()
        return self.result

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/":
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif self.path == "/pairs":
                    self._send(200, json.dumps(server.order).encode(), "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(n, 1 << 16)) if n else b""
                if self.path == "/vote":
                    try:
                        why = server.record(json.loads(raw or b"{}"))
                    except (ValueError, TypeError):
                        why = "not a JSON vote"
                    self._send(400 if why else 200, (why or "ok").encode(), "text/plain")
                elif self.path == "/finish":
                    self._send(200, json.dumps(server.finish()).encode(), "application/json")
                else:
                    self._send(404, b"not found", "text/plain")

            def log_message(self, *args) -> None:
                pass

        return Handler
