"""The main job: `tunery pipeline run examples/demo.yaml --smoke` (what `make demo` runs, on the smoke slice), from
a stack the command starts and stops itself, as `make demo` does on a fresh machine.

It shares nothing with the other tests' session (its own Ray head, store and services). `make test` runs it as a
pytest run of its own once the control run has ended, so that run's idle components do not slow it (a `pytest tests`
that selects it too runs it last: tests/tiers.py runs the e2e tier last, and this file after test_cli.py).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import TUNERY, home_env, tunery
from tests.servers import REPO, wait_for

pytestmark = pytest.mark.e2e


def blind_votes(env, report_a: str, report_b: str) -> dict:
    """`tunery arena A B`, its page voted on over HTTP as the page's script does (the page itself is checked in
    Chromium by tests/unit/test_arena.py): every pair, sides alternating; what "save" answered."""
    from services.core.net import free_port

    port = free_port()
    arena = subprocess.Popen([TUNERY, "arena", report_a, report_b, "--no-open", "--port", str(port)], env=env,
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"

    def post(path: str, body: dict) -> bytes:
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.read()

    try:
        def listed():
            try:
                with urllib.request.urlopen(url + "pairs", timeout=5) as r:
                    return json.loads(r.read())
            except OSError:  # not listening yet
                assert arena.poll() is None, arena.stderr.read()
                return None

        pairs = wait_for(listed, 120, interval=0.5, what="the arena page")
        for i, pair in enumerate(pairs):
            assert post("vote", {"id": pair["id"], "choice": ("left", "right")[i % 2], "seconds": 2.0}) == b"ok"
        saved = json.loads(post("finish", {}))
        assert arena.wait(60) == 0, arena.stderr.read()
    finally:
        arena.kill()
    assert "sentence" in saved, saved
    return saved


@pytest.mark.timeout(3000)  # the whole arc on the real model (~15 min alone, longer beside the control run)
def test_demo_is_the_main_job(tmp_path):
    """`tunery pipeline run examples/demo.yaml --smoke` (what `make demo` runs, on the smoke slice): the whole arc as
    one pipeline job on the real-model fixture (SmolLM2-135M-Instruct), from a stack the command starts itself (as
    `make demo` on a fresh machine): import -> prepare -> training mix -> 6 training steps -> base, base + adapter
    and the prompting baseline on one engine -> gates -> merge -> eval merged -> GPTQ W4A16 -> eval again -> GGUF
    Q4_K_M -> eval on llama.cpp -> a deployment -> its eval -> the report; in smoke mode the gates report and do
    not stop, and the deployment is deleted."""
    from services.merging.spec import TOLERANCES
    from tests.session import fixture_model, require_loopback

    require_loopback("the demo")
    fixture_model("smollm2-135m-instruct")
    env = home_env(tmp_path / "home")
    try:
        out = tunery(env, "--json", "pipeline", "run", "examples/demo.yaml", "--smoke", timeout=2700)
    finally:
        tunery(env, "down", check=False)
    result = json.loads(out.stdout)
    gates = result["gates"]
    reasons = gates["reasons"]
    assert result["state"] == "succeeded" and result["smoke"] and not result["forced"], result["error"]
    # six steps of four examples teach the JSON shape, not the fields (the full demo gets 16/16): on the smoke
    # slice the demo's gates must say FAIL, for the target, and say why; smoke mode runs on past them, and says so
    assert result["verdict"] == "FAIL", reasons
    assert any("smoke mode reports gates but never stops on them" in n for n in result["notes"]), result["notes"]
    target_gate = next(r for r in reasons if r.startswith("target pass rate"))
    candidate = result["blocks"]["base+adapter"]["target"]
    rate = candidate["passed"] / candidate["total"]
    assert rate < 0.8 and target_gate == f"target pass rate {rate:.1%} < gate 80.0%", target_gate
    assert reasons[0] == ("gates: target ≥ 80%, target gain beyond the noise, general forgetting ≤ 2 points, "
                          "tool-calling forgetting ≤ 2 points"), reasons
    # paired on the same tests: 4 held-out tickets and 4 fact probes (+ 4 lm-eval documents) on both sides
    paired = {p["block"]: p for p in gates["paired"]}
    assert set(paired) == {"target", "general"}  # SmolLM2's template has no tools: no tool block
    assert paired["target"]["pairs"] == 4
    for p in paired.values():
        assert p["difference"] == pytest.approx((p["gained"] - p["lost"]) / p["pairs"])
        assert p["ci"][0] <= p["difference"] <= p["ci"][1] and 0 < p["mcnemar_p"] <= 1
        assert p["forgetting_points"] == pytest.approx(100 * p["lost"] / p["pairs"])
        assert len(p["lost_tests"]) == p["lost"]
    forgetting = next(r for r in reasons if r.startswith("general forgetting"))
    assert f"({paired['general']['lost']} of {paired['general']['pairs']} lost" in forgetting
    flips = gates["flips"]
    assert flips["fail_to_pass"] == sum(p["gained"] for p in paired.values())
    assert flips["pass_to_fail"] == sum(p["lost"] for p in paired.values())
    # the fact probes are facts the base states: by knowledge it knows them; exact match is the stricter figure
    base_general = result["blocks"]["base"]["general"]
    assert base_general["exact_total"] == 4 and base_general["exact_passed"] < 4
    # the prompting baseline ran on the eval stage's engine (no stage of its own), paired on the same tickets
    assert result["artifacts"]["prompting_report"] and any(
        r.startswith("vs prompting baseline") and "paired, McNemar" in r for r in reasons), reasons
    assert not any("UNCONTROLLED" in r for r in reasons), reasons
    assert set(result["prompting_enough"]["target_pass_rate"]) == {"base", "base+prompting", "base+adapter"}
    [lm] = gates["lm_eval_deltas"]  # forgetting by lm-eval too (plain sentences, log-likelihood)
    assert lm["task"] == "fact_sentences" and lm["ci"][0] <= lm["delta"] <= lm["ci"][1]
    forms = {f["name"]: f for f in result["forms"]}
    assert list(forms) == ["base+adapter", "merged", "gptq-w4a16", "gguf-q4_k_m"]
    # the merge, on a real Llama: equal to base + adapter within bf16's tolerance, every greedy continuation
    # identical or apart only at a near-tie (a 6-step adapter's small changes are partly below bf16's half-ulp)
    merged, tol = forms["merged"], TOLERANCES["bf16"]
    m = merged["metrics"]
    assert m["probe_prompts"] >= 1 and m["max_abs_logit_diff"] <= tol.max_abs_logit and m["mean_kl"] <= tol.mean_kl, m
    assert m["greedy_identical"] + m["greedy_ties"] >= m["probe_prompts"], m
    # ...and evaluated again: a form of base + adapter (the engine runs it without LoRA), the same tests paired
    assert merged["compared_with"] == "base+adapter" and merged["paired"]["target"]["pairs"] == 4
    assert any(d.startswith("lora_enabled: True vs False") for d in merged["differences"]), merged["differences"]
    # the merged model quantized to GPTQ W4A16, calibrated on the data it was tuned on, evaluated again and compared
    # with the merged model: the differences stated, the same tests paired, the gate applied as stated
    q = forms["gptq-w4a16"]
    qm = q["metrics"]
    print(f"\nsmoke demo: quantize {qm}; W4A16 {q['verdict']} {q['paired']}, greedy agreement "
          f"{q['greedy_agreement']:.2f}; stages {[(s['stage'], s['seconds']) for s in result['stages']]}")
    assert qm["output_bytes"] < qm["model_bytes"] and qm["compression_ratio"] > 1.5, qm
    assert 0 < qm["quantize_peak_rss_bytes"] <= qm["planned_peak_bytes"] and 0 <= qm["greedy_agreement"] <= 1, qm
    from services.core.vllm import cpu_cannot_run

    if cpu_cannot_run("gptq-w4a16", "cpu"):
        # this CPU's vLLM has no W4A16 kernel (AVX-512 only): the form is made, not evaluated, never served, and the
        # arc goes on; the notes say why
        assert q["verdict"] == "NOT EVALUATED" and not q["report"], q
        assert any(n.startswith("gptq-w4a16: made, not evaluated") and "AVX-512" in n for n in result["notes"])
    else:
        assert q["compared_with"] == "merged"
        assert any(d.startswith("quantization: '' vs 'compressed-tensors gptq-w4a16'") for d in q["differences"]), q
        assert q["paired"]["target"]["pairs"] == 4 and q["verdict"] in ("PASS", "FAIL")
        assert (q["verdict"] == "PASS") == all(100 * p["lost"] / p["pairs"] <= 5.0 for p in q["paired"].values())
        assert result["blocks"]["gptq-w4a16"]["target"]["total"] == 4
    # ...and to GGUF Q4_K_M with an Ollama Modelfile, loaded in llama.cpp by its job (its greedy answers compared
    # with the merged model's), then evaluated again through llama.cpp's own server: the same tests (held-out
    # tickets, fact probes, the lm-eval task tokenized by the GGUF's vocabulary) paired with the merged model's
    gf = forms["gguf-q4_k_m"]
    g = gf["metrics"]
    assert g["compression_ratio"] > 1.5 and 0 <= g["greedy_agreement"] <= 1, g
    assert gf["compared_with"] == "merged" and set(gf["paired"]) == {"target", "general"}, gf
    assert gf["paired"]["target"]["pairs"] == 4 and result["blocks"]["gguf-q4_k_m"]["target"]["total"] == 4
    assert any(d.startswith("engine: 'vllm' vs 'llama.cpp'") for d in gf["differences"]), gf["differences"]
    assert (gf["verdict"] == "PASS") == all(100 * p["lost"] / p["pairs"] <= 5.0 for p in gf["paired"].values())
    assert result["ollama"] and "ollama create" in result["ollama"][0]
    # served: the best form that passed (W4A16 if it did, else the merged model), evaluated as clients get it, then
    # deleted (smoke never promotes)
    dep = result["deployment"]
    assert dep["name"] == "demo-smoke" and dep["base_url"] and dep["state"].startswith("DELETED")
    assert dep["form"] == ("gptq-w4a16" if q["verdict"] == "PASS" else "merged")
    assert result["blocks"]["deployment demo-smoke"]["target"]["total"] == 4 and dep["verdict"] in ("PASS", "FAIL")
    assert "/chat/completions" in result["endpoint_call"]
    stages = [s["stage"] for s in result["stages"]]
    assert stages == ["import-base", "import-data", "import-extra-1", "import-facts", "data", "data-mix",
                      "train", "eval", "merge", "eval-merged", "quantize-gptq-w4a16", "eval-gptq-w4a16",
                      "quantize-gguf-q4_k_m", "eval-gguf-q4_k_m", "serve", "eval-deployment"], stages
    assert all(s["seconds"] > 0 and not s["reattached"] for s in result["stages"]), result["stages"]
    assert all(t["server_start_s"] > 0 and t["tests_s"] > 0 for n, t in result["eval_seconds"].items()
               if not n.startswith("deployment")), result["eval_seconds"]
    # the report: one artifact, JSON and a self-contained page with the lineage, every form and the stamps
    page = Path(result["report_html"]).read_text()
    for part in ("<svg", "id='forms'", "SMOKE: never promoted", "Training loss", "data:image/png;base64,",
                 "Merged = base + adapter", "id='stages'", "/chat/completions"):
        assert part in page, part
    assert not (tmp_path / "home" / "stack.json").exists()  # the command stopped what it started
    # the job history survives a restart: a new stack (a new Ray head, the same store) lists the pipeline's jobs,
    # read from the store, with their states and outputs
    try:
        tunery(env, "up", timeout=300)
        listed = json.loads(tunery(env, "--json", "jobs", "list").stdout)
        shown = tunery(env, "pipeline", "report", result["pipeline"]).stdout
        voted = blind_votes(env, result["reports"]["base"], result["reports"]["base+adapter"])
        reported = json.loads(tunery(env, "--json", "pipeline", "report", result["pipeline"]).stdout)
    finally:
        tunery(env, "down", check=False)
    # a person voted blind between the base's and the adapter's answers after the run: the pipeline's report
    # (its summary and the page it saves) now carries the tally, the two sides named as the report names them
    line = voted["sentence"].replace("B preferred", "base+adapter preferred").replace(" over A;", " over base;")
    assert reported["arena"] == [f"blind A/B ({voted['report'].rsplit('/', 1)[-1]}): {line}"], (reported, voted)
    assert line in Path(reported["report_html"]).read_text()
    kinds = {j["kind"] for j in listed}
    assert {"pipeline.run", "registry.import_model", "datagen.prepare", "training.sft", "evaluation.run",
            "merging.merge", "quantization.quantize", "serving.deploy", "serving.delete"} <= kinds, kinds
    # every job succeeded, but for the W4A16 eval on a CPU whose vLLM has no W4A16 kernel (refused, see above)
    refused = {f"{result['pipeline']}-eval-gptq-w4a16"} if cpu_cannot_run("gptq-w4a16", "cpu") else set()
    assert all(j["state"] == "JOB_STATE_SUCCEEDED" or (j["id"] in refused and j["state"] == "JOB_STATE_FAILED")
               for j in listed), [(j["id"], j["state"]) for j in listed]
    assert all(j["labels"]["pipeline"] == result["pipeline"] and j["labels"]["smoke"] == "true" for j in listed
               if j["kind"] != "serving.delete"), [(j["id"], j.get("labels")) for j in listed]
    merge_job = next(j for j in listed if j["kind"] == "merging.merge")
    assert [o["uri"] for o in merge_job["outputs"]] == [result["artifacts"]["merged"]]
    assert f"pipeline {result['pipeline']}: FAIL" in shown and "[smoke]" in shown
