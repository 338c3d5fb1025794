"""A quantized checkpoint computed in float32 (a CPU without native bf16) is stored in the model's own dtype again:
its float32 tensors cast shard by shard, its integer tensors (packed weights, zero points) untouched, config.json
saying so (services.quantization.job.store_floats_as). Runs in the train venv (torch, safetensors)."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.quantization.job import store_floats_as, stored_dtype


def test_float32_tensors_are_stored_in_the_models_dtype_and_integers_are_kept(tmp_path):
    packed = torch.randint(-2**31, 2**31 - 1, (8, 4), dtype=torch.int32)
    shards = {"model-00001-of-00002.safetensors": {"a.weight_packed": packed, "a.weight_scale": torch.rand(8, 2)},
              "model-00002-of-00002.safetensors": {"norm.weight": torch.rand(16), "zp": torch.zeros(8, dtype=torch.int8),
                                                   "already": torch.rand(4).to(torch.bfloat16)}}
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name, metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "quantization_config": {"format": "x"}}))
    assert store_floats_as(tmp_path, "bfloat16") == 2
    for name, tensors in shards.items():
        with safe_open(tmp_path / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k, t in tensors.items():
                got = f.get_tensor(k)
                if t.dtype == torch.float32:
                    assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), k
                else:
                    assert got.dtype == t.dtype and torch.equal(got, t), k
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"] == {"format": "x"}
    assert stored_dtype(tmp_path) == "bfloat16"
    assert not list(tmp_path.glob("*.tmp"))
