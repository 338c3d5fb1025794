"""The HTML report: self-contained, two histogram images, 20 rendered samples, every piece of user text escaped;
and the JSON twin with the same numbers."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

from services.datagen.prepare import PrepareOptions, prepare
from tests.unit.datagen.helpers import alpaca, write_jsonl

EVIL = "<script>alert('x')</script>"


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.pre_text: list[str] = []
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_pre = self._in_pre or tag == "pre"

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._in_pre:
            self.pre_text.append(data)


def test_html_report(tmp_path, tok):
    rows = [alpaca(i) for i in range(20)]  # all 20 are in the sample
    rows[3]["output"] = f"Here you go: {EVIL}"
    rows[4] = {"instruction": f"Say {EVIL} <b>bold</b> & done", "input": "", "output": "Said."}
    src = write_jsonl(tmp_path / f"x{EVIL[:7]}.jsonl", rows)
    result = prepare(src, tmp_path / "out", PrepareOptions(holdout_fraction=0.1, seed=1), tok)
    assert result.ok, result.summary()
    page = (tmp_path / "out" / "report.html").read_text()
    parsed = Tags()
    parsed.feed(page)
    tags = [t for t, _ in parsed.tags]
    assert "script" not in tags and "link" not in tags and "b" not in tags  # nothing from the data became markup
    assert EVIL not in page
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 2  # rows 4 and 5, in the sample
    assert "Say &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &lt;b&gt;bold&lt;/b&gt; &amp; done" in page
    imgs = [a["src"] for t, a in parsed.tags if t == "img"]
    assert len(imgs) == 2 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert all(base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n") for s in imgs)
    assert not any(a.get("src", "").startswith("http") or a.get("href") for _, a in parsed.tags)
    samples = [a for t, a in parsed.tags if t == "div" and a.get("class") == "sample"]
    assert len(samples) == 20
    # samples are rendered with the chat template, exactly as the tokenizer renders them
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["sample"]) == 20 and report["sample"][0]["text"].startswith("<|im_start|>user\n")
    assert report["sample"][0]["text"] in "".join(parsed.pre_text)
    # the JSON twin has the numbers the page shows
    assert report["counts"] == {"input": 20, "parsed": 20, "errors": 0, "warnings": 0, "exact_duplicates": 0,
                                "near_duplicates": 0, "too_long": 0, "dropped": 0, "kept": 20, "train": 18,
                                "holdout": 2}
    assert report["stats"]["roles"] == {"assistant": 20, "user": 20}
    assert report["stats"]["turns_per_example"] == {"2": 20}
    assert sum(report["stats"]["tokens"]["prompt"]["histogram"]["counts"]) == 20
    for value in (report["train_sha256"], report["holdout_sha256"], str(report["stats"]["tokens"]["response"]["max"])):
        assert value in page


def test_report_of_a_failed_run_and_its_flagged_examples(tmp_path, tok):
    rows = [json.dumps(alpaca(i)) for i in range(30)]
    rows[2] = json.dumps({"instruction": "Repeat: hi", "output": "Repeat: hi"})
    rows[7] = rows[7][:20]
    result = prepare(write_jsonl(tmp_path / "d.jsonl", rows, raw=True), tmp_path / "out", PrepareOptions(), tok)
    assert not result.ok
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] is False and report["counts"]["errors"] == 1
    assert [(p["severity"], p["line"]) for p in report["problems"]] == [("error", 8), ("warning", 3)]
    assert report["flagged"][0]["message"] == "the assistant reply repeats the user's prompt word for word"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "FAILED" in page and "word for word" in page and page.count("data:image/png;base64,") == 2
