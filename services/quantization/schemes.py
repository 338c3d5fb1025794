"""The quantization schemes Tunery offers, as data: what each needs (calibration, a group size), what it makes, and
where it runs. No heavy imports: the control plane reads it, the job builds the llmcompressor recipe from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    name: str
    family: str                 # "compressed-tensors" (llmcompressor oneshot) | "gguf" (llama.cpp)
    calibrated: bool            # needs a calibration dataset
    weight_bits: int
    grouped: bool               # weights quantized in groups along the input dimension (group_size applies)
    description: str
    engine: str                 # what loads the output
    gpu_only_serving: str = ""  # why the CPU engine here cannot serve it ("" if it can)


SCHEMES: dict[str, Scheme] = {s.name: s for s in [
    Scheme("gptq-w4a16", "compressed-tensors", True, 4, True,
           "GPTQ: 4-bit integer weights in groups, 16-bit activations; layer by layer, each layer's rounding "
           "corrected on the calibration activations", "vLLM (CPUWNA16 kernel on CPU, Marlin/Machete on GPU)"),
    Scheme("awq-w4a16", "compressed-tensors", True, 4, True,
           "AWQ: activation-aware per-channel scales, then 4-bit integer weights in groups, 16-bit activations",
           "vLLM (CPUWNA16 kernel on CPU, Marlin on GPU)"),
    Scheme("w8a8-int8", "compressed-tensors", True, 8, False,
           "SmoothQuant then GPTQ: 8-bit integer weights per channel, 8-bit dynamic per-token activations",
           "vLLM (oneDNN int8 on CPU, CUTLASS on GPU)"),
    Scheme("fp8-dynamic", "compressed-tensors", False, 8, False,
           "FP8 (E4M3) weights per channel, FP8 dynamic per-token activations; data-free, no calibration",
           "vLLM on an FP8 GPU (Ada, Hopper or newer)",
           gpu_only_serving="FP8 matmuls need an Ada/Hopper-class GPU; vLLM's CPU backend has no FP8 linear kernel"),
    Scheme("gguf-q4_k_m", "gguf", False, 4, False, "GGUF Q4_K_M for llama.cpp, Ollama and LM Studio", "llama.cpp"),
    Scheme("gguf-q8_0", "gguf", False, 8, False, "GGUF Q8_0 for llama.cpp, Ollama and LM Studio", "llama.cpp"),
    Scheme("gguf-f16", "gguf", False, 16, False, "GGUF F16 for llama.cpp, Ollama and LM Studio", "llama.cpp"),
]}

GROUP_SIZES = (128, 64, 32)   # tried in this order when no group size is given and 128 does not divide a layer


def recipe_args(scheme: Scheme, ignore: list[str], group_size: int) -> dict:
    """The llmcompressor modifiers' arguments for `scheme`, as plain data (services.quantization.job builds the
    modifiers from them; a unit test checks them without llmcompressor)."""
    if scheme.name == "gptq-w4a16":
        return {"modifiers": [("GPTQModifier", {"targets": ["Linear"], "ignore": ignore,
                                                "config_groups": {"group_0": w4_group(group_size)}})]}
    if scheme.name == "awq-w4a16":
        return {"modifiers": [("AWQModifier", {"targets": ["Linear"], "ignore": ignore,
                                               "config_groups": {"group_0": w4_group(group_size, symmetric=False)}})]}
    if scheme.name == "w8a8-int8":
        return {"modifiers": [("SmoothQuantModifier", {"smoothing_strength": 0.8}),
                              ("GPTQModifier", {"targets": ["Linear"], "ignore": ignore, "scheme": "W8A8"})]}
    if scheme.name == "fp8-dynamic":
        return {"modifiers": [("QuantizationModifier", {"targets": ["Linear"], "ignore": ignore,
                                                        "scheme": "FP8_DYNAMIC"})]}
    raise ValueError(f"{scheme.name} is not an llmcompressor scheme")


def w4_group(group_size: int, symmetric: bool = True) -> dict:
    return {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                                               "strategy": "group", "group_size": group_size}}
