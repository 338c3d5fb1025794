"""The merging service end to end: SubmitMerge (a Ray job in the train environment: the streaming merge, then the
equivalence check) -> a `model` artifact, form merged; transformers loads it and it answers like base + adapter; a
multi-shard base within its memory budget; the refusals; a killed job publishes nothing. Real Ray, S3 and gRPC."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import grpc
import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from tests.modeldirs import reshard
from tests.servers import REPO, wait_for
from tests.session import FOUNDATION, fixture_model, job_events, rpc_error, shuffled_facts, succeeded

pytestmark = pytest.mark.integration
TRAIN_PYTHON = REPO / ".venvs" / "train" / "bin" / "python"
ANSWERS = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
merged_dir, base_dir, adapter_dir, questions = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
tok = AutoTokenizer.from_pretrained(merged_dir)
def answers(model):
    out = []
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out
merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).eval()
reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                                      adapter_dir).eval()
print(json.dumps({"merged": answers(merged), "reference": answers(reference)}))
"""




def test_the_seeded_adapter_merges_and_answers_like_base_plus_adapter(seed, tmp_path):
    client = seed.client
    job, merged = seed.merged_job, client.get_artifact(seed.merged)
    assert [p.uri for p in merged.parents] == [seed.foundation, seed.style_adapter]
    meta = dict(merged.metadata)
    assert (meta["form"], meta["architecture"], meta["merged_dtype"]) == ("merged", "LlamaForCausalLM", "bf16")
    assert meta["is_causal_lm"] and meta["has_chat_template"] and meta["dtype"] == "BF16"
    assert meta["merged_tensors"] == 4 * 7  # every targeted linear weight of its 4 layers, by PEFT's merge
    files = {f.path for f in merged.files}
    assert {"model.safetensors.index.json", "model-00001-of-00001.safetensors", "tokenizer.json", "config.json",
            "generation_config.json", "README.md", "equivalence.json"} <= files
    m = merged.metrics
    print(f"\nmerge of the seeded adapter: max |Δlogit| {m['max_abs_logit_diff']:.4f}, mean KL {m['mean_kl']:.2e}, "
          f"greedy identical {m['greedy_identical']:.0f}/{m['probe_prompts']:.0f}; merge {m['merge_s']:.2f}s, "
          f"check {m['check_s']:.1f}s; peak RSS merge {m['merge_peak_rss_bytes'] / 2**20:.0f} MiB, check "
          f"{m['check_peak_rss_bytes'] / 2**20:.0f} MiB")
    assert m["greedy_identical"] == m["probe_prompts"] == 8  # the adapter's held-out split gave 8 prompts
    assert m["max_abs_logit_diff"] <= 2.0 and m["mean_kl"] <= 1e-2  # bf16's tolerance (merging.spec.TOLERANCES)
    texts = [e.text for e in job_events(client, job.id)]
    assert any("writing shard 1 of 1" in t for t in texts) and any(t.startswith("equivalence on 8") for t in texts)
    card = client.download(merged.id, "README.md", tmp_path / "README.md").read_text()
    assert seed.foundation in card and seed.style_adapter in card and seed.style in card
    # transformers loads the downloaded artifact, and it answers like base + adapter, in the style it learned
    out = seed.download_dir(merged.id, tmp_path / "merged")
    base = seed.download_dir(seed.foundation, tmp_path / "base")
    adapter = seed.download_dir(seed.style_adapter, tmp_path / "adapter")
    questions = [f["question"] for f in shuffled_facts()[100:104]]  # held-out side of the style data
    proc = subprocess.run([str(TRAIN_PYTHON), "-c", ANSWERS, str(out), str(base), str(adapter), json.dumps(questions)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"merged answers: {got['merged']}")
    assert got["merged"] == got["reference"]
    assert sum("my friend" in a for a in got["merged"]) >= 3  # the behaviour survived the merge


def test_a_multi_shard_base_merges_within_its_memory_budget(seed, tmp_path):
    client = seed.client
    sharded = reshard(FOUNDATION, tmp_path / "foundation-sharded", max_bytes=1 << 20)
    assert len(list(sharded.glob("model-*.safetensors"))) > 3
    base = succeeded(client, client.import_model(str(sharded), "foundation-sharded")).outputs[0].uri
    trained = succeeded(client, client.submit_training({
        "base_model": base, "dataset": seed.style, "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "optimizer": {"learning_rate": 0.002, "lr_scheduler": "constant", "warmup_ratio": 0.0}, "max_steps": 6,
        "micro_batch_size": 8, "max_seq_len": 128, "eval_samples": 0, "checkpoint_every_steps": 1000}), 600)
    adapter = next(o.uri for o in trained.outputs if "/adapter-" in o.uri)
    budget = 3 << 30
    job = succeeded(client, client.submit_merge(base, adapter, max_shard_bytes=512 << 10, memory_budget_bytes=budget,
                                                output_dtype=pb.PRECISION_FP32), 600)
    merged = client.get_artifact(job.outputs[-1].uri)
    m = merged.metrics
    print(f"\nmulti-shard merge: {m['shards']:.0f} shards out, peak RSS of the job process "
          f"{m['job_peak_rss_bytes'] / 2**20:.0f} MiB (merge phase {m['merge_peak_rss_bytes'] / 2**20:.0f} MiB), "
          f"planned {m['planned_peak_bytes'] / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB; max |Δlogit| "
          f"{m['max_abs_logit_diff']:.2e}")
    assert m["job_peak_rss_bytes"] <= m["planned_peak_bytes"] <= budget  # the plan bounds what the job used
    assert m["shards"] > 3 and merged.metadata["merged_dtype"] == "fp32"
    assert m["max_abs_logit_diff"] <= 1e-3 and m["greedy_identical"] == m["probe_prompts"]
    index = json.loads(client.download(merged.id, "model.safetensors.index.json", tmp_path / "i.json").read_text())
    assert len(set(index["weight_map"].values())) == m["shards"]
    # a budget the plan cannot meet is refused before anything is queued, saying what the merge needs
    got, details = rpc_error(lambda: client.submit_merge(base, adapter, memory_budget_bytes=64 << 20))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "more than the budget of 0.06 GiB" in details
    assert "the largest tensor's working copies" in details
    # the seeded adapter was trained on the original foundation: another base, by sha256
    got, details = rpc_error(lambda: client.submit_merge(base, seed.style_adapter))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "was trained on" in details and seed.foundation in details


def test_refusals(seed, tmp_path):
    client = seed.client
    quantized = tmp_path / "quantized"
    reshard(FOUNDATION, quantized, max_bytes=1 << 30)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                         "bits": 4}}))
    q = succeeded(client, client.import_model(str(quantized), "foundation-gptq")).outputs[0].uri
    moe = succeeded(client, client.import_model(str(fixture_model("tiny-moe")), "moe")).outputs[0].uri
    before = {j.id for j in client.list_jobs(kind="merging.merge")}
    cases = [
        (lambda: client.submit_merge(q, seed.style_adapter), grpc.StatusCode.FAILED_PRECONDITION,
         f"is quantized (gptq); merge into the full-precision base the adapter's lineage names ({seed.foundation})"),
        (lambda: client.submit_merge(moe, seed.style_adapter), grpc.StatusCode.FAILED_PRECONDITION,
         "was trained on a LlamaForCausalLM"),
        (lambda: client.submit_merge(seed.foundation, seed.foundation), grpc.StatusCode.FAILED_PRECONDITION,
         "is a model artifact, not a adapter"),
        (lambda: client.submit_merge(seed.foundation, ""), grpc.StatusCode.INVALID_ARGUMENT, "spec.adapter: is required"),
        (lambda: client.submit_merge(seed.foundation, seed.style_adapter, output_dtype=pb.PRECISION_INT8),
         grpc.StatusCode.INVALID_ARGUMENT, "spec.output_dtype"),
        (lambda: client.submit_merge(seed.foundation, seed.style_adapter, max_shard_bytes=100),
         grpc.StatusCode.INVALID_ARGUMENT, "spec.max_shard_bytes"),
    ]
    for call, code, words in cases:
        got, details = rpc_error(call)
        assert got == code and words in details, (got, details)
    assert {j.id for j in client.list_jobs(kind="merging.merge")} == before  # nothing was queued


def test_a_qlora_adapter_merges_into_the_bf16_base_not_into_float32(seed):
    client = seed.client
    trained = succeeded(client, client.submit_training({
        "base_model": seed.foundation, "dataset": seed.style, "method": "qlora", "max_steps": 2, "micro_batch_size": 8,
        "max_seq_len": 128, "eval_samples": 0, "checkpoint_every_steps": 1000,
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}), 600)
    adapter = next(o.uri for o in trained.outputs if "/adapter-" in o.uri)
    got, details = rpc_error(lambda: client.submit_merge(seed.foundation, adapter, output_dtype=pb.PRECISION_FP32))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "QLoRA adapter" in details and "bf16/fp16" in details
    job = succeeded(client, client.submit_merge(seed.foundation, adapter), 600)
    assert client.get_artifact(job.outputs[-1].uri).metadata["merged_dtype"] == "bf16"
    assert any("a QLoRA adapter" in e.text and e.level == pb.EVENT_LEVEL_WARNING for e in job_events(client, job.id))


def _pid(client, job_id: str) -> int:
    for e in job_events(client, job_id):
        if "(pid " in e.text:
            return int(e.text.rsplit("(pid ", 1)[1].rstrip(")"))
    return 0


def test_a_job_killed_before_it_publishes_leaves_no_artifact(seed):
    client = seed.client
    job = client.submit_merge(seed.foundation, seed.style_adapter, name="killed-merge",
                              output_dtype=pb.PRECISION_FP32)
    wait_for(lambda: any(e.text.startswith("merged:") for e in job_events(client, job.id)), 300,
             what="the merge to finish and its check to start")
    os.kill(_pid(client, job.id), signal.SIGKILL)  # as an OOM kill would, while the merged shards are unpublished
    final = client.wait(job.id, 120)
    assert final.state == pb.JOB_STATE_FAILED
    assert not list(client.list_artifacts(kind=pb.ARTIFACT_KIND_MODEL, name="killed-merge"))
