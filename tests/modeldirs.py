"""Hand-made model directories for tests that need no torch: a valid minimal one and broken variants.

The real tiny models come from fixtures/build_tiny_models.py (make fixtures); these exist so that unit tests
can hit every validation branch precisely.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header, offset, body = {}, 0, b""
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        body += bytes((i * 7) % 251 for i in range(n))
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "the cat sat on the mat", "tunery makes models"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))


def make_model(path: Path, *, moe: bool = False, template: str | None = CHATML) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
              "model_type": "mixtral" if moe else "llama", "hidden_size": 8, "num_hidden_layers": 1,
              "vocab_size": 300, "max_position_embeddings": 64, "torch_dtype": "float32"}
    if moe:
        config.update(num_local_experts=4, num_experts_per_tok=2)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    write_safetensors(path / "model.safetensors", {"model.embed_tokens.weight": ("F32", [300, 8]),
                                                   "lm_head.weight": ("F32", [300, 8])})
    write_tokenizer(path)
    tok_config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template:
        tok_config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


def make_sharded_model(path: Path, shards: int, floats_per_shard: int = 16384) -> Path:
    """A valid model whose weights are split over many shards: an import that takes seconds, to cancel or kill."""
    make_model(path)
    (path / "model.safetensors").unlink()
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensor = f"model.layers.{i}.weight"
        write_safetensors(path / name, {tensor: ("F32", [floats_per_shard])})
        # distinct content per shard, so each is its own blob
        raw = bytearray((path / name).read_bytes())
        raw[-4:] = i.to_bytes(4, "little")
        (path / name).write_bytes(bytes(raw))
        weight_map[tensor] = name
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def reshard(src: Path, dest: Path, max_bytes: int) -> Path:
    """A copy of a safetensors model directory with its tensors spread over shards of at most `max_bytes` (a
    larger tensor gets one of its own) and an index: the same weights, byte for byte, as a multi-shard model."""
    import shutil

    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy(p, dest / p.name)
    tensors: list[tuple[str, dict, bytes]] = []
    for shard in sorted(src.glob("*.safetensors")):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        body = raw[8 + n:]
        for name, t in header.items():
            if name != "__metadata__":
                begin, end = t["data_offsets"]
                tensors.append((name, {"dtype": t["dtype"], "shape": t["shape"]}, body[begin:end]))
    groups: list[list[tuple[str, dict, bytes]]] = [[]]
    for item in tensors:
        if groups[-1] and sum(len(b) for *_, b in groups[-1]) + len(item[2]) > max_bytes:
            groups.append([])
        groups[-1].append(item)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, info, data in group:
            header[tensor] = {**info, "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
            weight_map[tensor] = name
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        (dest / name).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(d for *_, d in group))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest
