"""Merged == base + adapter, checked before a merged model is published (train environment: transformers + PEFT).

Both sides run in the output dtype on the same prompts (the adapter's held-out conversations, or a fixed set):
the reference is the base as stored with the adapter on top (PEFT), the candidate the merged checkpoint as written.
Per prompt: the largest absolute logit difference and the mean KL divergence of the next-token distributions over
its positions, and a greedy continuation of both. The check fails when a figure passes its tolerance
(services.merging.spec.TOLERANCES) or when the greedy continuations differ at a token where the reference was not
within that tolerance of a tie.

Runs as its own process (`python -m services.merging.equivalence`), so the merge job's peak memory stays the
streaming merge's: this check holds one model at a time, plus the reference's log-probabilities.

    python -m services.merging.equivalence --base B --adapter A --merged M --prompts p.json --dtype bf16 --out r.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Any

FIXED_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about rivers."}],
    [{"role": "user", "content": "What is 12 plus 30?"}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Say hello in a friendly way."}],
    [{"role": "user", "content": "Summarise: the cat sat on the mat all day."}],
    [{"role": "user", "content": "What does a duck say?"}],
    [{"role": "user", "content": "List the days of the week."}],
]
MAX_PROMPT_TOKENS = 96


def probe_conversations(holdout: Path | None, n: int) -> list[list[dict[str, Any]]]:
    """The conversations the probes ask: each held-out example up to (not including) its last assistant turn; the
    fixed set where there is no held-out split."""
    out = []
    if holdout is not None and holdout.is_file():
        for line in holdout.read_text().splitlines():
            if not line.strip():
                continue
            messages = json.loads(line).get("messages") or []
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last:
                out.append([{"role": m["role"], "content": m.get("content") or ""} for m in messages[:last]])
            if len(out) == n:
                break
    return out or FIXED_PROMPTS[:n]


def check_device(cuda_available: bool | None = None) -> str:
    """Where the check's forward passes run: the GPU when the worker has one (a large model's CPU forward passes
    are slow), else the CPU; the same code either way."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"


def _logprobs_and_greedy(model, batches, greedy_tokens: int):
    import torch

    out = []
    device = model.device
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            logits = model(input_ids=ids).logits[0].float()
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=greedy_tokens,
                                 do_sample=False, return_dict_in_generate=True, output_scores=True,
                                 pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                                 else model.config.pad_token_id)
            tokens = gen.sequences[0, ids.shape[1]:].tolist()
            margins = []
            for step in gen.scores:
                top = step[0].float().topk(2).values
                margins.append(float(top[0] - top[1]))
            out.append((torch.log_softmax(logits, dim=-1).cpu(), logits.cpu(), tokens, margins))
    return out


def check(base_dir: Path, adapter_dir: Path, merged_dir: Path, conversations: list, dtype: str,
          greedy_tokens: int) -> dict[str, Any]:
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.merging.spec import TOLERANCES

    tol = TOLERANCES[dtype]
    # Both sides compute in float32 on the weights as stored: the reference is the base's stored weights plus the
    # adapter, the candidate the merged file's. The difference is then what the merge changed (rounding W + s·BA
    # to the output dtype), not the arithmetic noise of running a 16-bit forward pass twice: on SmolLM2-135M in
    # bf16, that noise alone reaches 1.4 logits, more than the merge's own 0.4.
    torch_dtype = torch.float32
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    batches, prompts = [], []
    for conv in conversations:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, -MAX_PROMPT_TOKENS:]
        batches.append(ids)
        prompts.append(text)
    device = check_device()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype).to(device)
    reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ref = _logprobs_and_greedy(reference, batches, greedy_tokens)
    del reference, base
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch_dtype).to(device).eval()
    got = _logprobs_and_greedy(merged, batches, greedy_tokens)
    del merged
    probes, failures = [], []
    for i, ((ref_lp, ref_logits, ref_tokens, margins), (lp, logits, tokens, _)) in enumerate(zip(ref, got)):
        max_abs = float((ref_logits - logits).abs().max())
        kl = float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())
        first = next((j for j, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
        tie = first is not None and margins[first] <= tol.max_abs_logit
        probe = {"prompt": prompts[i], "max_abs_logit_diff": max_abs, "mean_kl": kl,
                 "greedy_identical": first is None, "greedy_tie": tie, "first_difference": first,
                 "reference_tokens": ref_tokens, "merged_tokens": tokens}
        probes.append(probe)
        why = []
        if max_abs > tol.max_abs_logit:
            why.append(f"logits differ by up to {max_abs:.3g} (tolerance {tol.max_abs_logit:g})")
        if kl > tol.mean_kl:
            why.append(f"mean KL {kl:.3g} (tolerance {tol.mean_kl:g})")
        if first is not None and not tie:
            why.append(f"greedy continuations differ at token {first} (reference margin {margins[first]:.3g})")
        if why:
            failures.append({"prompt": i, "text": prompts[i], "why": why})
    return {
        "dtype": dtype, "device": device, "tolerance": tol.model_dump(), "prompts": len(probes),
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in probes),
        "mean_kl": max(p["mean_kl"] for p in probes),
        "greedy_identical": sum(p["greedy_identical"] for p in probes),
        "greedy_ties": sum(p["greedy_tie"] for p in probes),
        "passed": not failures, "failures": failures, "probes": probes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m services.merging.equivalence")
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--merged", required=True, type=Path)
    ap.add_argument("--prompts", required=True, type=Path, help="a JSON list of conversations")
    ap.add_argument("--dtype", required=True, choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--greedy-tokens", type=int, default=16)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    result = check(a.base, a.adapter, a.merged, json.loads(a.prompts.read_text()), a.dtype, a.greedy_tokens)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
