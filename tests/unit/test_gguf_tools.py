"""The GGUF schemes' pure parts: the Modelfile (its ChatML TEMPLATE's Python mirror against a real Hugging Face
ChatML template rendered with jinja, the default system prompt, other families getting no TEMPLATE), the honest
pre-tokenizer fallback of the converter, and the Q4_K fallback count. (Converting, quantizing and loading in
llama.cpp: tests/integration/test_quantization.py.)"""

from __future__ import annotations

from collections import Counter

import pytest

from services.core.modeldir import render_chat_template
from services.quantization.convert_gguf import gpt2_compatible
from services.quantization.gguf import PROBES, q4_fallback, with_system
from services.quantization.modelfile import CHATML_TEMPLATE, chatml_system, modelfile, render_chatml

pytestmark = pytest.mark.unit

# SmolLM2-Instruct's template (ChatML with a default system prompt), as its tokenizer_config.json has it
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
           " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def renderer(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = env.from_string(template)
    return lambda messages: compiled.render(messages=messages, add_generation_prompt=True)


def test_the_chatml_template_matches_a_real_chatml_template_and_keeps_its_default_system():
    hf = renderer(SMOLLM2)
    chatml, default = chatml_system(hf, PROBES)
    assert chatml and default == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    multi = PROBES[2]
    assert render_chatml(default, multi) == hf(multi)
    assert render_chatml("Be brief.", multi) == hf([{"role": "system", "content": "Be brief."}, *multi])
    text = modelfile("m.gguf", chatml, default, ["<|im_end|>"])
    assert text.splitlines()[1] == "FROM ./m.gguf" and CHATML_TEMPLATE in text
    assert 'PARAMETER stop "<|im_end|>"' in text and f'SYSTEM """{default}"""' in text
    # the probes a load check compares carry the system message llama.cpp's renderers would not add
    assert with_system(PROBES[0], default)[0] == {"role": "system", "content": default}


def test_another_family_gets_no_template_rather_than_a_wrong_one():
    chatml, default = chatml_system(renderer(LLAMA3), PROBES)
    assert not chatml and default == ""
    text = modelfile("m.gguf", chatml, default, ["<|eot_id|>"])
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "reads tokenizer.chat_template" in text
    # a ChatML-looking template that renders differently (no newline after the role) is not taken for ChatML
    off = SMOLLM2.replace("message['role'] + '\n'", "message['role'] + ' '")
    assert off != SMOLLM2
    assert chatml_system(renderer(off), PROBES)[0] is False


def test_the_fixture_templates_render_through_the_registry_renderer_too(tmp_path):
    # the registry's sandboxed renderer (what import checks) and the mirror agree on the tiny fixture's template
    from tests.session import REPO

    template = (REPO / "build" / "fixtures" / "tiny-llama" / "chat_template.jinja")
    if not template.exists():
        pytest.fail("build the fixtures first (make fixtures)")
    text = render_chat_template(template.read_text(), {})
    assert text.startswith("<|im_start|>system\n")


def test_an_unknown_bpe_tokenizer_gets_gpt2_only_when_it_is_gpt2s_split():
    bpe = {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                       "use_regex": True, "trim_offsets": True}}
    assert gpt2_compatible(bpe)[0]
    assert gpt2_compatible({**bpe, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [bpe["pre_tokenizer"]]}})[0]
    for bad in ({**bpe, "pre_tokenizer": {**bpe["pre_tokenizer"], "add_prefix_space": True}},
                {**bpe, "pre_tokenizer": {**bpe["pre_tokenizer"], "use_regex": False}},
                {**bpe, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": "\\d{1,3}"}}, bpe["pre_tokenizer"]]}},
                {**bpe, "normalizer": {"type": "NFC"}},
                {**bpe, "model": {"type": "Unigram"}}):
        ok, shown = gpt2_compatible(bad)
        assert not ok and shown


def test_q4_k_m_fallback_counts_what_is_not_a_k_quant():
    assert q4_fallback(Counter({"F32": 9, "Q4_K": 10, "Q6_K": 2, "Q5_0": 4, "Q8_0": 1})) == {"Q5_0": 4, "Q8_0": 1}
    assert q4_fallback(Counter({"F32": 9, "Q4_K": 12})) == {}
