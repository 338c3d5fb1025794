"""LoRA target modules: presets resolved against the module names a model actually has. No torch.

The names come from the model artifact's metadata (`linear_modules`: short names of its 2-D `.weight` tensors,
recorded at import from the safetensors headers), so a bad request is refused before anything is queued.
"""

from __future__ import annotations

from services.core.errors import InvalidArgument

# Attention projections across the common families: Llama/Mistral/Qwen/Gemma (q,k,v,o_proj), Phi-3 (qkv_proj),
# GPT-2/Falcon (c_attn, query_key_value, dense), MPT (Wqkv, out_proj), GPT-NeoX.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "out_proj",
             "c_proj", "dense")
# Never adapted by a preset: embeddings and the output head (full-size matrices, PEFT's all-linear skips the
# head too) and MoE routers (their softmax routing is kept exact everywhere in Tunery).
EXCLUDED = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out", "gate", "router", "shared_expert_gate")

PRESETS = ("attention", "all-linear")


def resolve(preset: str, names: list[str], available: list[str], field: str = "spec.lora.target_modules") -> list[str]:
    """The short module names to adapt. `names` wins over the preset; an empty request means all-linear.

    Raises InvalidArgument naming every requested module the architecture lacks, and what it has."""
    have = sorted(set(available))
    if names:
        missing = [n for n in names if n not in have]
        if missing:
            raise InvalidArgument.field(field, f"{', '.join(missing)} not found in this architecture; it has "
                                        f"{', '.join(have) or 'no linear modules'}")
        return sorted(set(names))
    preset = preset or "all-linear"
    if preset not in PRESETS:
        raise InvalidArgument.field("spec.lora.preset", f"{preset!r} is not one of {', '.join(PRESETS)}")
    if preset == "attention":
        chosen = [n for n in have if n in ATTENTION]
    else:
        chosen = [n for n in have if n not in EXCLUDED]
    if not chosen:
        raise InvalidArgument.field(field, f"the {preset} preset matches none of this architecture's modules "
                                    f"({', '.join(have) or 'none recorded'}); name them explicitly")
    return chosen
