"""The Ollama Modelfile of a GGUF artifact: FROM the file, a TEMPLATE in Go template syntax that renders what the
model's own chat template renders, PARAMETER stop for its end-of-turn token, and the template's default system
prompt as SYSTEM. No heavy imports (unit-tested without llama.cpp).

Tunery writes the TEMPLATE for the ChatML family (<|im_start|>role\\n…<|im_end|>: SmolLM2, Qwen, many fine-tunes)
and checks it: `render_chatml` is the Python mirror of exactly that Go template, compared with the Hugging Face
template's text on probe conversations. A chat template of another family gets no TEMPLATE (Ollama then reads the
GGUF's tokenizer.chat_template itself), and the artifact says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable

CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""
DEFAULT_SYSTEM = re.compile(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S)


def render_chatml(system: str, messages: list[dict]) -> str:
    """What CHATML_TEMPLATE renders (Ollama passes the system prompt as .System, the other turns as .Messages)."""
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    for i, m in enumerate(turns):
        last = i == len(turns) - 1
        if m["role"] == "user":
            out += f"<|im_start|>user\n{m['content']}<|im_end|>\n"
            if last:
                out += "<|im_start|>assistant\n"
        else:
            out += f"<|im_start|>assistant\n{m['content']}" + ("" if last else "<|im_end|>\n")
    return out


def chatml_system(hf_render: Callable[[list[dict]], str], probes: list[list[dict]]) -> tuple[bool, str]:
    """(whether the model's template is ChatML as CHATML_TEMPLATE writes it, its default system prompt): the
    Hugging Face template (`hf_render`: messages -> text with the generation prompt) against the mirror, on each
    probe with and without its system message."""
    bare = hf_render([{"role": "user", "content": "Hi"}])
    m = DEFAULT_SYSTEM.match(bare)
    default = m.group(1) if m else ""
    for probe in probes:
        system = next((p["content"] for p in probe if p["role"] == "system"), "")
        rest = [p for p in probe if p["role"] != "system"]
        if hf_render(probe) != render_chatml(system or default, rest):
            return False, default
        if hf_render(rest) != render_chatml(default, rest):
            return False, default
    return True, default


def modelfile(gguf_name: str, chatml: bool, default_system: str, stop: list[str]) -> str:
    lines = ["# Ollama: ollama create NAME -f Modelfile (written by Tunery)", f"FROM ./{gguf_name}", ""]
    if chatml:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
    else:
        lines += ["# no TEMPLATE: the chat template is not one Tunery writes in Go template syntax (ChatML); Ollama",
                  "# reads tokenizer.chat_template from the GGUF", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    if default_system:
        lines += ["", 'SYSTEM """' + default_system.replace('"""', '\\"\\"\\"') + '"""']
    return "\n".join(lines) + "\n"
