"""What a checkpoint's quantizer must know about its architecture, read from config.json and the safetensors
headers alone (no weights, no torch): the Linear layers and their widths, and what stays at full precision.

Kept at full precision, always: `lm_head` (the logits; rounding it costs the most quality for the least memory),
MoE routers and gates (a few small matrices whose rounding reroutes tokens to other experts), and vision towers and
projectors. Routers are found by name (`mlp.gate`, `block_sparse_moe.gate`, `shared_expert_gate`, `router`, ...)
and by shape: a matrix from the hidden size to the number of experts (or to 1, a shared expert's gate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.core.weights import TensorInfo

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
ROUTER_LEAVES = {"gate", "router", "shared_expert_gate", "wg", "classifier"}
VISION = re.compile(r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|multi_modal_projector|mm_projector|"
                    r"image_newline|vision_proj)(\.|$)")
EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|wpe|embeddings|embed_positions|word_embeddings)$")
LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class Architecture:
    """The Linear layers (module name -> (out, in)) and the modules kept at full precision, with why."""

    linears: dict[str, tuple[int, int]]
    routers: list[str] = field(default_factory=list)
    vision: list[str] = field(default_factory=list)
    tied_embeddings: bool = False
    num_experts: int = 0
    hidden_size: int = 0

    @property
    def modules(self) -> list[str]:
        return sorted(self.linears)

    def kinds(self) -> list[str]:
        """The module names with their layer indices folded (model.layers.N.self_attn.q_proj, ...): what a person
        reads to see which modules exist."""
        return sorted({LAYER_INDEX.sub(".N.", f".{m}.").strip(".") for m in self.linears})

    def always_ignored(self) -> list[str]:
        """lm_head, every router and gate, every vision module: llmcompressor ignore entries (exact names, or
        `re:` patterns with the layer index generalised, so a 64-layer model gets a handful of entries)."""
        out = ["lm_head"]
        for group in (self.routers, self.vision):
            out += sorted({layer_pattern(m) if LAYER_INDEX.search(f".{m}.") else m for m in group})
        return out

    def quantized(self, ignore: list[str]) -> dict[str, tuple[int, int]]:
        """The Linear layers a recipe with `ignore` quantizes."""
        return {m: s for m, s in self.linears.items() if not any(matches(entry, m) for entry in ignore)}


def layer_pattern(module: str) -> str:
    """model.layers.3.mlp.gate -> re:model\\.layers\\.\\d+\\.mlp\\.gate$ (every layer's module of that name)."""
    parts = LAYER_INDEX.split(f".{module}.")
    literal = [re.escape(p.strip(".")) for p in parts[0::2]]
    return "re:" + r"\.\d+\.".join(literal) + "$"


def matches(entry: str, module: str) -> bool:
    """llmcompressor's ignore semantics: `re:<pattern>` matched against the module name, else the exact name."""
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return entry == module


def read(config: dict, tensors: dict[str, TensorInfo]) -> Architecture:
    text = config.get("text_config") or config
    num_experts = next((int(text[k]) for k in EXPERT_KEYS if text.get(k)), 0)
    hidden = int(text.get("hidden_size") or 0)
    linears, routers, vision = {}, [], []
    for name, t in tensors.items():
        if not name.endswith(".weight") or len(t.shape) != 2:
            continue
        module = name[: -len(".weight")]
        if EMBEDDINGS.search(module):
            continue
        if module == "lm_head" or module.endswith(".lm_head"):
            continue
        linears[module] = (int(t.shape[0]), int(t.shape[1]))
        if VISION.search(module):
            vision.append(module)
        elif is_router(module, t.shape, num_experts, hidden):
            routers.append(module)
    tied = bool(config.get("tie_word_embeddings")) and not any(n.startswith("lm_head") for n in tensors)
    return Architecture(linears, sorted(routers), sorted(vision), tied, num_experts, hidden)


def is_router(module: str, shape, num_experts: int, hidden: int) -> bool:
    """A router or gate: named like one and mapping the hidden size to the experts (or to 1: a shared expert's
    gate; with no expert count in the config, to far fewer outputs than the hidden size), or any matrix from the
    hidden size to exactly the number of experts."""
    leaf = module.rsplit(".", 1)[-1]
    out, inp = int(shape[0]), int(shape[1])
    if not hidden or inp != hidden:
        return False
    if leaf in ROUTER_LEAVES:
        return out in (num_experts, 1) if num_experts else out < max(2, hidden // 8)
    return bool(num_experts) and out == num_experts


def check_ignore(arch: Architecture, extra: list[str]) -> list[str]:
    """The user's ignore entries that match no Linear module (empty when all match)."""
    bad = []
    for entry in extra:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error:
                bad.append(entry)
                continue
        if entry != "lm_head" and not any(matches(entry, m) for m in arch.linears):
            bad.append(entry)
    return bad


def indivisible(arch: Architecture, ignore: list[str], group_size: int) -> dict[int, list[str]]:
    """Input widths that `group_size` does not divide -> the quantized modules with that width."""
    out: dict[int, list[str]] = {}
    for m, (_, width) in arch.quantized(ignore).items():
        if width % group_size:
            out.setdefault(width, []).append(m)
    return out
