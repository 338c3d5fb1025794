from pathlib import Path

import pytest

from services.core.errors import FailedPrecondition, InvalidArgument, NotFound
from services.core.modeldir import inspect_model, quick_check
from tests.modeldirs import make_model, make_sharded_model


def test_valid_model(tmp_path):
    info = inspect_model(make_model(tmp_path / "m"), False)
    assert info["architecture"] == "LlamaForCausalLM" and info["is_causal_lm"]
    assert info["parameters"] == 2 * 300 * 8 and info["dtype"] == "F32" and not info["is_moe"]
    assert info["has_chat_template"] and "<|im_start|>assistant" in info["chat_template_sample"]


def test_moe_and_sharded(tmp_path):
    info = inspect_model(make_model(tmp_path / "moe", moe=True), False)
    assert info["is_moe"] and info["num_experts"] == 4 and info["experts_per_token"] == 2
    info = inspect_model(make_sharded_model(tmp_path / "sh", shards=3, floats_per_shard=10), False)
    assert len(info["weight_files"]) == 3 and info["parameters"] == 30


def test_no_chat_template_is_allowed(tmp_path):
    info = inspect_model(make_model(tmp_path / "m", template=None), False)
    assert not info["has_chat_template"] and info["chat_template_sha256"] == ""


def expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_quick_check_branches(tmp_path):
    expect(InvalidArgument, "absolute", lambda: quick_check("rel/path", False, [Path("/")]))
    expect(NotFound, "does not exist", lambda: quick_check(str(tmp_path / "nope"), False, [Path("/")]))
    f = tmp_path / "file"
    f.write_text("x")
    expect(InvalidArgument, "is a file", lambda: quick_check(str(f), False, [Path("/")]))
    (tmp_path / "empty").mkdir()
    expect(InvalidArgument, "no config.json", lambda: quick_check(str(tmp_path / "empty"), False, [Path("/")]))
    m = make_model(tmp_path / "m")
    (m / "config.json").write_text('{"a": 1,\n "b": }')
    expect(InvalidArgument, "line 2, column 7", lambda: quick_check(str(m), False, [Path("/")]))
    (m / "config.json").write_text('{"hidden_size": 8}')
    expect(InvalidArgument, "no model_type", lambda: quick_check(str(m), False, [Path("/")]))
    (m / "config.json").write_text('{"model_type": "x", "auto_map": {"AutoModel": "m.X"}}')
    expect(FailedPrecondition, "allow_trust_remote_code", lambda: quick_check(str(m), False, [Path("/")]))
    assert quick_check(str(m), True, [Path("/")])["model_type"] == "x"


def test_weight_problems(tmp_path):
    m = make_model(tmp_path / "m")
    raw = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(raw[:-10])
    expect(InvalidArgument, "corrupt or truncated", lambda: inspect_model(m, False))
    (m / "model.safetensors").write_bytes(b"\xff" * 16)
    expect(InvalidArgument, "does not fit", lambda: inspect_model(m, False))
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"pickle")
    expect(InvalidArgument, "convert to safetensors", lambda: inspect_model(m, False))
    s = make_sharded_model(tmp_path / "s", shards=2, floats_per_shard=4)
    next(s.glob("model-00002*")).unlink()
    expect(InvalidArgument, "missing shards", lambda: inspect_model(s, False))


def test_tokenizer_and_template_problems(tmp_path):
    m = make_model(tmp_path / "m")
    (m / "tokenizer.json").write_text("{not json")
    expect(InvalidArgument, "tokenizer.json", lambda: inspect_model(m, False))
    (m / "tokenizer.json").unlink()
    expect(InvalidArgument, "no tokenizer", lambda: inspect_model(m, False))
    m2 = make_model(tmp_path / "m2", template="{% for m in messages %}{{ m['content'] }")
    expect(InvalidArgument, "does not render", lambda: inspect_model(m2, False))
    m3 = make_model(tmp_path / "m3", template="{{ raise_exception('no system role') }}")
    expect(InvalidArgument, "no system role", lambda: inspect_model(m3, False))


@pytest.mark.parametrize("open_tag,close_tag", [("{% generation %}", "{% endgeneration %}"),
                                               ("{%- generation -%}", "{%- endgeneration -%}"),
                                               ("{%generation%}", "{%endgeneration%}")])
def test_generation_markers_render(tmp_path, open_tag, close_tag):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{% if m['role'] == 'assistant' %}" + open_tag + "{{ m['content'] }}" + close_tag +
                "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")
    info = inspect_model(make_model(tmp_path / "m", template=template), False)
    assert "<|im_start|>assistant\nHello.<|im_end|>" in info["chat_template_sample"]
