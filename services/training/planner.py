"""Hardware planner: peak device memory of a LoRA / QLoRA / DoRA job from the model's config.json, and whether the
cluster can run it. Pure Python (no torch): the training service runs it before queueing a job.

Every size below is per GPU, in bytes until the GiB conversion at the end. Symbols: h hidden size, L layers,
a attention heads, k key/value heads, d head dim, i MLP width, V vocabulary, r LoRA rank, s sequence length,
b micro batch, T = b*s tokens per micro batch, c bytes per element of the compute dtype (2 for bf16/fp16, 4 fp32).

Weights (`weight_bytes`)
    lora / dora: every parameter at the compute precision (c bytes).
    qlora: bitsandbytes NF4 for every nn.Linear of the decoder (lm_head excluded, as transformers does):
    0.5 byte per weight plus the block-wise absmax constants, one per 64 weights: fp32 (4/64 byte per weight)
    or, with double quantization, 8-bit absmax plus one fp32 second-level constant per 256 blocks
    (1/64 + 4/16384 byte = 0.127 bit per weight; Dettmers et al. 2023, "QLoRA", section 3). Embeddings, lm_head,
    norms and biases stay at the compute precision.
Adapters (`adapter_parameters`): r*(in+out) per targeted module instance; DoRA adds its magnitude vector (out).
    They are kept in fp32 by default: PEFT's get_peft_model(autocast_adapter_dtype=True) upcasts adapters of a
    bf16/fp16 base to fp32. Gradients: one per trainable parameter at the adapter precision.
Optimizer (`OPTIMIZER_STATE_BYTES`): AdamW keeps 2 states in the parameter's dtype (torch creates them with
    zeros_like), the bitsandbytes 8-bit variants 2 x 1 byte, Lion 1 state, SGD without momentum none.
Activations (`activation_bytes`): the tensors autograd saves, counted module by module for a Llama-style decoder
    (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP or a routed-expert MLP). Per token and layer:
      2 RMSNorms:           4h each (HF's RMSNorm keeps an fp32 copy of its input)
      attention (SDPA / FlashAttention): c*(2*a*d + 2*k*d) for q, k, v and the output (no s^2 term);
                            eager attention adds a*s*(4 + c) (fp32 softmax output plus its cast)
      SwiGLU MLP:           3*c*i (SiLU input, SiLU output, up output)
      inputs of Linears:    c*in, kept only for a weight gradient: a frozen Linear needs its weight, not its
                            input, for the input gradient. bitsandbytes' 4-bit matmul keeps its input whatever is
                            trainable, so with QLoRA every Linear's input counts. q/k/v share one input, as do
                            gate/up.
      LoRA (p = adapter bytes): lora_B keeps lora_A's output, p*r. PEFT casts the input to the adapter dtype and
                            applies one dropout per module, so when p != c or dropout > 0 each targeted module keeps
                            its own copy, p*in (+ a 1-byte mask with dropout; under autocast the copy is c*in, we
                            count p); otherwise lora_A keeps the shared input (c*in once per input, as above).
      DoRA:                 (c + p)*out per targeted module (the magnitude products keep the base output and the
                            LoRA output), plus a transient full matrix W + s*BA of the largest target.
      routed experts:       each token goes through experts_per_token experts: their MLP terms, the gathered inputs,
                            and c*h for the routing-weight product; a shared expert counts as a dense MLP.
    This is the per-layer count of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", sbh(34 + 5as/h) for GPT with dropout and without flash attention), redone for what a LoRA run on a
    Llama-style model actually saves. Peak (the backward of a layer allocates gradients about as large as the
    activations it consumes; the loss is computed before any layer's backward):
      no checkpointing:  L*A*T + max(logits, A*T)
      checkpointing:     L*c*h*T + max(logits, 2*A*T)   (one hidden state per layer, one layer recomputed)
    where A is the per-token, per-layer count above and `logits` is the loss head's peak:
      lm_head="fused" (what the job runs: TRL >= 1.16's SFTTrainer patches the model with a fused LM head,
                       trl/kernels/chunked_logprob.py, that projects and folds [min(T, 4096), min(V, 32768)] tiles
                       into an online log-sum-exp and never materializes the [T, V] logits; the backward recomputes
                       each tile in place): one tile at the compute precision, the fp32 gradient w.r.t. the hidden
                       states (4*T*h) and the per-token fp32 statistics it keeps (log Z, entropy, log-prob, token
                       accuracy: 16*T).
      lm_head="full"  (a plain Trainer / LitGPT / torchtune: the [T, V] logits): 12*T*V, the fp32 log-softmax
                       output that cross-entropy saves (4), its incoming gradient (4) and the gradient w.r.t. the
                       logits (4) at the start of backward (the forward peak, bf16 logits + fp32 upcast +
                       log-softmax, is 10 bytes). It dominates for small models with large vocabularies, which is
                       what the fused head removes.
Overhead: CUDA context, cuBLAS workspaces and NCCL buffers (CUDA_CONTEXT_GIB) plus allocator fragmentation
    (FRAGMENTATION of everything else).
Several workers: FSDP shards weights, adapters, gradients and optimizer states across N workers and all-gathers
    FSDP_GATHERED_LAYERS decoder layers at a time; DDP replicates everything and keeps a bucketed copy of the
    gradients for the all-reduce.

Not modelled: multi-head latent attention (DeepSeek-V2/V3, refused), vision towers of multimodal configs (pass the
registry's exact `total_parameters` to price their weights), CPU offload, and the fused 3-D expert parameters of
transformers 5 (module names below follow the checkpoints: experts.w1 / experts.gate_proj ...; bitsandbytes only
quantizes nn.Linear, so a fused expert tensor would stay at the compute precision under QLoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.core.errors import InvalidArgument

GIB = 1024**3
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
METHODS = ("lora", "qlora", "dora")
STRATEGIES = ("ddp", "fsdp")
ATTENTION = ("sdpa", "flash_attention_2", "eager")

NF4_BYTES = 0.5
NF4_BLOCK = 64
ABSMAX_BYTES = 4 / NF4_BLOCK                          # one fp32 absmax per block: 0.5 bit per weight
ABSMAX_DQ_BYTES = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)  # 8-bit absmax + fp32 per 256 blocks: 0.127 bit per weight

# Optimizer state per trainable parameter: (states in the parameter's dtype, extra fixed bytes per parameter).
OPTIMIZER_STATE_BYTES: dict[str, tuple[int, float]] = {
    "adamw_torch": (2, 0), "adamw_torch_fused": (2, 0), "adamw_hf": (2, 0), "adamw": (2, 0),
    "adamw_8bit": (0, 2), "adamw_bnb_8bit": (0, 2), "paged_adamw_8bit": (0, 2),
    "paged_adamw_32bit": (0, 8),
    "lion_8bit": (0, 1), "paged_lion_8bit": (0, 1), "lion_32bit": (0, 4), "paged_lion_32bit": (0, 4),
    "adagrad": (1, 0), "rmsprop": (1, 0),
    "sgd": (0, 0),
}

CUDA_CONTEXT_GIB = 0.75
FRAGMENTATION = 0.05
FSDP_GATHERED_LAYERS = 2
LOGITS_BYTES = 12
LM_HEADS = ("fused", "full")
FUSED_TOKEN_TILE = 4096            # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
FUSED_VOCAB_TILE = 32768           # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
FUSED_TOKEN_STATS_BYTES = 16       # fp32 log Z, entropy, log-prob and top-1 flag per token
NORM_BYTES = 4                     # bytes per element RMSNorm saves (its fp32 input copy)
DORA_TRANSIENT_COPIES = 3          # B@A, scaling*B@A and W + scaling*B@A, at the adapter precision

MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
QKV_BIAS_TYPES = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"}
QK_NORM_TYPES = {"qwen3", "qwen3_moe"}
FOUR_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text"}
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}
W123_EXPERTS = {"mixtral", "phimoe"}   # experts named w1 (gate), w3 (up), w2 (down)
ROUTERS = ("gate", "shared_expert_gate")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from config.json (a nested "text_config" wins over the top level)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_moe_layers: int = 0
    model_type: str = ""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert_prefix: str = "shared_expert"
    shared_expert_gate: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        if not isinstance(config, dict):
            raise InvalidArgument.field("config", "config.json must hold a JSON object")
        text = config.get("text_config")
        c = {**config, **text} if isinstance(text, dict) else dict(config)
        model_type = str(c.get("model_type") or "")
        if c.get("kv_lora_rank"):
            raise InvalidArgument.field(
                "config", f"{model_type or 'this model'} uses multi-head latent attention (kv_lora_rank), "
                "which the memory planner does not model")

        def need(key: str) -> int:
            value = c.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument.field("config", f"config.json has no positive integer {key!r}")
            return value

        hidden, layers, heads, vocab = (need(k) for k in ("hidden_size", "num_hidden_layers",
                                                          "num_attention_heads", "vocab_size"))
        kv_heads = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or hidden // heads)
        experts = next((int(c[k]) for k in MOE_KEYS if c.get(k)), 0)
        moe_width = shared_width = moe_layers = top_k = 0
        if experts > 1:
            moe_width = int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 0)
            if moe_width <= 0:
                raise InvalidArgument.field("config", "a mixture-of-experts config.json needs moe_intermediate_size")
            top_k = int(c.get("num_experts_per_tok") or c.get("moe_top_k") or 1)
            shared_width = int(c.get("shared_expert_intermediate_size")
                               or (c.get("n_shared_experts") or 0) * moe_width)
            dense_only = set(c.get("mlp_only_layers") or [])
            first_dense = int(c.get("first_k_dense_replace") or 0)
            step = int(c.get("decoder_sparse_step") or 1)
            moe_layers = sum(1 for n in range(layers)
                             if n not in dense_only and n >= first_dense and (n + 1) % step == 0)
        width = int(c.get("intermediate_size") or 0)
        if width <= 0 and moe_layers < layers:
            raise InvalidArgument.field("config", "config.json has no positive integer 'intermediate_size'")
        attention_bias = bool(c.get("attention_bias", False))
        return cls(
            hidden_size=hidden, num_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, intermediate_size=width, vocab_size=vocab,
            max_position_embeddings=int(c.get("max_position_embeddings") or 0),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
            num_experts=experts if experts > 1 else 0, experts_per_token=top_k, moe_intermediate_size=moe_width,
            shared_expert_intermediate_size=shared_width, num_moe_layers=moe_layers, model_type=model_type,
            qkv_bias=attention_bias or model_type in QKV_BIAS_TYPES, o_bias=attention_bias,
            mlp_bias=bool(c.get("mlp_bias", False)),
            norms_per_layer=4 if model_type in FOUR_NORM_TYPES else 2, qk_norm=model_type in QK_NORM_TYPES,
            expert_names=("w1", "w3", "w2") if model_type in W123_EXPERTS else ("gate_proj", "up_proj", "down_proj"),
            shared_expert_prefix="shared_experts" if c.get("n_shared_experts") else "shared_expert",
            shared_expert_gate=bool(c.get("shared_expert_intermediate_size")),
        )


def linear_modules(shape: ModelShape) -> dict[str, tuple[int, int, int]]:
    """Every nn.Linear of the decoder (lm_head excluded): name -> (in_features, out_features, count in the model).

    Names are PEFT target_modules names (q_proj, ..., down_proj). Where one name would cover two shapes they carry
    their parent (experts.gate_proj, shared_expert.gate_proj): a target matches a name equal to it or ending in
    "." + target, as PEFT matches module paths. Routers ("gate", "shared_expert_gate") are listed but are not
    LoRA targets unless named explicitly (see all_linear_targets).
    """
    h, L = shape.hidden_size, shape.num_layers
    q_out, kv_out = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    mods = {"q_proj": (h, q_out, L), "k_proj": (h, kv_out, L), "v_proj": (h, kv_out, L), "o_proj": (q_out, h, L)}
    dense, moe = shape.num_dense_layers, shape.num_moe_layers
    if dense:
        i = shape.intermediate_size
        mods.update({"gate_proj": (h, i, dense), "up_proj": (h, i, dense), "down_proj": (i, h, dense)})
    if moe:
        gate, up, down = shape.expert_names
        i, n = shape.moe_intermediate_size, moe * shape.num_experts
        mods.update({f"experts.{gate}": (h, i, n), f"experts.{up}": (h, i, n), f"experts.{down}": (i, h, n),
                     "gate": (h, shape.num_experts, moe)})
        if shape.shared_expert_intermediate_size:
            p, i = shape.shared_expert_prefix, shape.shared_expert_intermediate_size
            mods.update({f"{p}.gate_proj": (h, i, moe), f"{p}.up_proj": (h, i, moe), f"{p}.down_proj": (i, h, moe)})
            if shape.shared_expert_gate:
                mods["shared_expert_gate"] = (h, 1, moe)
    return mods


def all_linear_targets(shape: ModelShape) -> list[str]:
    """The short names PEFT's "all-linear" would target, routers excluded (routing stays frozen by default)."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(shape)} - set(ROUTERS))


def select_targets(shape: ModelShape, target_modules: list[str]) -> dict[str, tuple[int, int, int]]:
    """The linear modules the targets name (PEFT suffix matching); an unknown target is an InvalidArgument."""
    if not target_modules:
        raise InvalidArgument.field("target_modules", "name at least one module")
    mods = linear_modules(shape)
    chosen: dict[str, tuple[int, int, int]] = {}
    for target in target_modules:
        hits = {n: m for n, m in mods.items() if n == target or n.endswith("." + target)}
        if not hits:
            known = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in mods}))
            raise InvalidArgument.field("target_modules", f"{target!r} names no linear module of this model ({known})")
        chosen.update(hits)
    return chosen


def embedding_parameters(shape: ModelShape) -> int:
    """Token embeddings plus lm_head (one matrix when tied)."""
    return shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)


def total_parameters(shape: ModelShape) -> int:
    """Embeddings + every linear + biases + norms: what safetensors would hold."""
    linear = sum(i * o * n for i, o, n in linear_modules(shape).values())
    h, L = shape.hidden_size, shape.num_layers
    q_out, kv_out = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    bias = (q_out + 2 * kv_out) * L * shape.qkv_bias + h * L * shape.o_bias
    bias += (2 * shape.intermediate_size + h) * shape.num_dense_layers * shape.mlp_bias
    norms = shape.norms_per_layer * h * L + h + 2 * shape.head_dim * L * shape.qk_norm
    return embedding_parameters(shape) + linear + bias + norms


_count_parameters = total_parameters   # estimate() has a keyword argument of the same name


def active_parameters(shape: ModelShape) -> int:
    """Parameters one token goes through: the total less the routed experts it is not sent to."""
    if not shape.is_moe:
        return total_parameters(shape)
    per_expert = 3 * shape.hidden_size * shape.moe_intermediate_size
    idle = (shape.num_experts - shape.experts_per_token) * per_expert * shape.num_moe_layers
    return total_parameters(shape) - idle


def adapter_parameters(targets: dict[str, tuple[int, int, int]], *, method: str, rank: int) -> int:
    """LoRA: r*(in + out) per targeted module instance; DoRA adds a magnitude vector of `out`."""
    return sum(n * (rank * (i + o) + (o if method == "dora" else 0)) for i, o, n in targets.values())


def weight_bytes(shape: ModelShape, *, method: str, compute_bytes: int, double_quant: bool = True,
                 total: int | None = None) -> float:
    """Frozen base weights: c bytes each, or NF4 + absmax constants for every decoder Linear under QLoRA."""
    total = total or total_parameters(shape)
    if method != "qlora":
        return total * compute_bytes
    quantized = sum(i * o * n for i, o, n in linear_modules(shape).values())
    nf4 = NF4_BYTES + (ABSMAX_DQ_BYTES if double_quant else ABSMAX_BYTES)
    return quantized * nf4 + max(total - quantized, 0) * compute_bytes


def optimizer_bytes(trainable: int, *, optimizer: str, param_bytes: int) -> float:
    """Optimizer state for the trainable parameters (see OPTIMIZER_STATE_BYTES)."""
    try:
        states, fixed = OPTIMIZER_STATE_BYTES[optimizer]
    except KeyError:
        known = ", ".join(sorted(OPTIMIZER_STATE_BYTES))
        raise InvalidArgument.field("optimizer", f"{optimizer!r} is not a known optimizer ({known})") from None
    return trainable * (states * param_bytes + fixed)


def layer_activation_bytes(shape: ModelShape, targets: dict[str, tuple[int, int, int]], *, method: str,
                           rank: int, compute_bytes: int, adapter_bytes: int, seq_len: int, dropout: float = 0.0,
                           attention: str = "sdpa", moe_layer: bool = False) -> float:
    """Bytes one decoder layer saves for backward, per token (the A of the module docstring)."""
    c, p, h = compute_bytes, adapter_bytes, shape.hidden_size
    a, k, d = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    qlora = method == "qlora"
    # PEFT casts a LoRA input to the adapter dtype and applies one dropout per module: either makes a copy that
    # the module's lora_A keeps; otherwise lora_A keeps the input the base Linear received.
    own_copy = dropout > 0 or p != c

    def saves_input(*names: str) -> bool:
        """Whether the (shared) input of these Linears is kept: bitsandbytes 4-bit keeps it, LoRA may."""
        return qlora or (not own_copy and any(n in targets for n in names))

    def lora_terms(*names: str, experts: int = 1) -> float:
        """What the adapters of the targeted modules among `names` keep: lora_B's input, the cast or dropped-out
        copy of the input (with the dropout mask), DoRA's magnitude products."""
        total = 0.0
        for name in (n for n in names if n in targets):
            i, o, _ = targets[name]
            total += p * rank + own_copy * (p * i + i * (dropout > 0)) + (c + p) * o * (method == "dora")
        return total * experts

    def mlp(width: int, prefix: str = "", names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
            experts: int = 1, gathered_input: bool = False) -> float:
        gate, up, down = (prefix + n for n in names)
        total = 3 * c * width + c * width * saves_input(down)
        total += c * h * (gathered_input and saves_input(gate, up))
        return experts * total + lora_terms(gate, up, down, experts=experts)

    total = shape.norms_per_layer * NORM_BYTES * h
    total += c * h * saves_input("q_proj", "k_proj", "v_proj") + c * a * d * saves_input("o_proj")
    total += c * (2 * a * d + 2 * k * d) + (a * seq_len * (4 + c) if attention == "eager" else 0)
    total += lora_terms("q_proj", "k_proj", "v_proj", "o_proj")
    if not moe_layer:
        return total + c * h * saves_input("gate_proj", "up_proj") + mlp(shape.intermediate_size)
    top_k = shape.experts_per_token
    total += c * h * saves_input("gate", *(f"{shape.shared_expert_prefix}.{n}" for n in ("gate_proj", "up_proj")))
    total += 2 * 4 * shape.num_experts + top_k * c * h      # fp32 router softmax, routing-weight products
    total += lora_terms("gate", "shared_expert_gate")
    total += mlp(shape.moe_intermediate_size, "experts.", shape.expert_names, experts=top_k, gathered_input=True)
    if shape.shared_expert_intermediate_size:
        total += mlp(shape.shared_expert_intermediate_size, shape.shared_expert_prefix + ".")
        total += c * h * shape.shared_expert_gate           # the shared output times its sigmoid gate
    return total


def activation_bytes(shape: ModelShape, targets: dict[str, tuple[int, int, int]], *, method: str, rank: int,
                     compute_bytes: int, adapter_bytes: int, micro_batch_size: int, max_seq_len: int,
                     gradient_checkpointing: bool, dropout: float = 0.0, attention: str = "sdpa",
                     lm_head: str = "fused") -> float:
    """Peak activation memory of one micro batch (formulas in the module docstring) plus transient buffers."""
    tokens = micro_batch_size * max_seq_len
    kw = {"method": method, "rank": rank, "compute_bytes": compute_bytes, "adapter_bytes": adapter_bytes,
          "seq_len": max_seq_len, "dropout": dropout, "attention": attention}
    dense = layer_activation_bytes(shape, targets, **kw) if shape.num_dense_layers else 0.0
    moe = layer_activation_bytes(shape, targets, moe_layer=True, **kw) if shape.num_moe_layers else 0.0
    largest = max(dense, moe)
    logits = loss_head_bytes(shape, tokens, compute_bytes=compute_bytes, lm_head=lm_head)
    if gradient_checkpointing:
        stored = shape.num_layers * compute_bytes * shape.hidden_size * tokens
        peak = stored + max(logits, 2 * largest * tokens)
    else:
        stored = (shape.num_dense_layers * dense + shape.num_moe_layers * moe) * tokens
        peak = stored + max(logits, largest * tokens)
    return peak + transient_bytes(shape, targets, method=method, compute_bytes=compute_bytes,
                                  adapter_bytes=adapter_bytes)


def loss_head_bytes(shape: ModelShape, tokens: int, *, compute_bytes: int, lm_head: str = "fused") -> float:
    """Peak memory of the loss head for `tokens` tokens (the module docstring's `logits`)."""
    if lm_head == "full":
        return LOGITS_BYTES * tokens * shape.vocab_size
    tile = min(tokens, FUSED_TOKEN_TILE) * min(shape.vocab_size, FUSED_VOCAB_TILE) * compute_bytes
    return tile + 4 * tokens * shape.hidden_size + FUSED_TOKEN_STATS_BYTES * tokens


def transient_bytes(shape: ModelShape, targets: dict[str, tuple[int, int, int]], *, method: str,
                    compute_bytes: int, adapter_bytes: int) -> float:
    """Short-lived full-size weight copies: QLoRA dequantizes one Linear at a time; DoRA builds W + s*BA to take
    its column norms (PEFT, dora.py get_weight_norm)."""
    total = 0.0
    if method == "qlora":
        total += max(i * o for i, o, _ in linear_modules(shape).values()) * compute_bytes
    if method == "dora":
        total += max(i * o for i, o, _ in targets.values()) * DORA_TRANSIENT_COPIES * adapter_bytes
    return total


@dataclass
class MemoryEstimate:
    """Peak memory of one GPU, by component, in GiB."""

    weights_gib: float
    adapter_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    trainable_parameters: int
    total_parameters: int
    num_workers: int = 1

    @property
    def tensors_gib(self) -> float:
        """What torch.cuda.max_memory_allocated would report: every component but the overhead."""
        return (self.weights_gib + self.adapter_gib + self.gradients_gib + self.optimizer_gib
                + self.activations_gib)

    @property
    def peak_gib(self) -> float:
        return self.tensors_gib + self.overhead_gib


def estimate(config: dict[str, Any], *, method: str, rank: int, target_modules: list[str],
             micro_batch_size: int, max_seq_len: int, gradient_checkpointing: bool, precision: str = "bf16",
             optimizer: str = "adamw_torch", num_workers: int = 1, strategy: str = "ddp",
             total_parameters: int | None = None, adapter_precision: str = "fp32", dropout: float = 0.0,
             double_quant: bool = True, attention: str = "sdpa", lm_head: str = "fused") -> MemoryEstimate:
    """Peak memory per GPU of a LoRA / QLoRA / DoRA job.

    total_parameters: the registry's exact count (from the safetensors headers), used for the weights when given.
    adapter_precision: dtype of the adapters, their gradients and AdamW states (PEFT keeps them in fp32).
    double_quant: QLoRA's double quantization of the absmax constants (bnb_4bit_use_double_quant).
    attention: "sdpa" / "flash_attention_2" save no s^2 tensor; "eager" does.
    lm_head: "fused" (the job's TRL SFTTrainer: no [T, V] logits) or "full" (frameworks that materialize them).
    """
    _check_args(method=method, rank=rank, micro_batch_size=micro_batch_size, max_seq_len=max_seq_len,
                precision=precision, adapter_precision=adapter_precision, num_workers=num_workers,
                strategy=strategy, dropout=dropout, attention=attention, lm_head=lm_head)
    shape = ModelShape.from_config(config)
    targets = select_targets(shape, target_modules)
    c, p = PRECISION_BYTES[precision], PRECISION_BYTES[adapter_precision]
    total = total_parameters or _count_parameters(shape)
    trainable = adapter_parameters(targets, method=method, rank=rank)

    weights = weight_bytes(shape, method=method, compute_bytes=c, double_quant=double_quant, total=total)
    adapter = gradients = trainable * p
    state = optimizer_bytes(trainable, optimizer=optimizer, param_bytes=p)
    activations = activation_bytes(shape, targets, method=method, rank=rank, compute_bytes=c, adapter_bytes=p,
                                   micro_batch_size=micro_batch_size, max_seq_len=max_seq_len,
                                   gradient_checkpointing=gradient_checkpointing, dropout=dropout,
                                   attention=attention, lm_head=lm_head)
    if num_workers > 1 and strategy == "fsdp":
        layer = (weights - embedding_parameters(shape) * c) / shape.num_layers
        weights = weights / num_workers + FSDP_GATHERED_LAYERS * layer
        adapter, gradients, state = adapter / num_workers, gradients / num_workers, state / num_workers
    elif num_workers > 1:
        gradients *= 2   # DDP's reducer buckets hold a second copy of the gradients
    tensors = weights + adapter + gradients + state + activations
    return MemoryEstimate(
        weights_gib=weights / GIB, adapter_gib=adapter / GIB, gradients_gib=gradients / GIB,
        optimizer_gib=state / GIB, activations_gib=activations / GIB,
        overhead_gib=CUDA_CONTEXT_GIB + FRAGMENTATION * tensors / GIB,
        trainable_parameters=trainable, total_parameters=total, num_workers=num_workers)


def _check_args(*, method: str, rank: int, micro_batch_size: int, max_seq_len: int, precision: str,
                adapter_precision: str, num_workers: int, strategy: str, dropout: float, attention: str,
                lm_head: str = "fused") -> None:
    choices = {"method": (method, METHODS), "precision": (precision, tuple(PRECISION_BYTES)),
               "adapter_precision": (adapter_precision, tuple(PRECISION_BYTES)), "strategy": (strategy, STRATEGIES),
               "attention": (attention, ATTENTION), "lm_head": (lm_head, LM_HEADS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise InvalidArgument.field(name, f"{value!r} is not one of {', '.join(allowed)}")
    for name, value in {"rank": rank, "micro_batch_size": micro_batch_size, "max_seq_len": max_seq_len,
                        "num_workers": num_workers}.items():
        if value < 1:
            raise InvalidArgument.field(name, f"must be at least 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise InvalidArgument.field("dropout", f"must be in [0, 1), got {dropout}")


@dataclass
class Fit:
    feasible: bool
    reason: str
    suggestions: list[str] = field(default_factory=list)
    num_gpus: int = 0


def check_fit(est: MemoryEstimate, *, gpu_memory_gib: list[float], method: str, rank: int, max_seq_len: int,
              gradient_checkpointing: bool, headroom: float = 0.9) -> Fit:
    """Whether the cluster has est.num_workers GPUs that each hold the peak within `headroom` of their memory.

    gpu_memory_gib lists every GPU of the cluster; an empty list is a CPU-only cluster, where the job runs on CPU.
    """
    need = est.peak_gib
    if not gpu_memory_gib:
        return Fit(True, f"the cluster has no GPU: the job runs on CPU and needs ~{need:.1f} GiB of host memory "
                         "per worker (far slower than on a GPU)", [], 0)
    largest = max(gpu_memory_gib)
    fitting = sum(1 for g in gpu_memory_gib if need <= g * headroom)
    if fitting >= est.num_workers:
        return Fit(True, f"needs ~{need:.1f} GiB per GPU; {est.num_workers} of the cluster's "
                         f"{len(gpu_memory_gib)} GPU(s) hold it with {1 - headroom:.0%} headroom", [],
                   est.num_workers)
    suggestions = _suggestions(method=method, rank=rank, max_seq_len=max_seq_len,
                               gradient_checkpointing=gradient_checkpointing)
    if fitting:
        reason = (f"needs {est.num_workers} GPUs with ~{need:.1f} GiB each, the cluster has {fitting} "
                  f"(largest GPU has {largest:.1f} GiB)")
        suggestions.append("fewer workers")
    else:
        reason = f"needs ~{need:.1f} GiB per GPU, largest GPU has {largest:.1f} GiB"
        if need <= largest:
            reason += f" ({largest * headroom:.1f} usable with {1 - headroom:.0%} headroom)"
    reason += f"; try {' / '.join(suggestions)}" if suggestions else "; it needs a larger GPU"
    return Fit(False, reason, suggestions, 0)


def _suggestions(*, method: str, rank: int, max_seq_len: int, gradient_checkpointing: bool) -> list[str]:
    """Cheaper settings that apply to this spec, most effective first."""
    out = []
    if method != "qlora":
        out.append("qlora")
    if rank > 8:
        out.append("lower rank")
    if max_seq_len > 512:
        out.append("shorter sequences")
    if not gradient_checkpointing:
        out.append("gradient checkpointing")
    return out
