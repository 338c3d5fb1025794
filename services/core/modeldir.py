"""What a Hugging Face model directory is, without torch: checks that it is a usable causal LM, and the metadata a
model artifact carries.

`quick_check` is what the registry runs before queueing (cheap, precise status codes); `inspect_model` is what a
job that writes a model artifact runs on the directory (the import job, the merge job): safetensors headers,
tokenizer, chat template, architecture, parameter count, dtype, MoE.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.hostpaths import host_path
from services.core.weights import read_file_header

MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
SAMPLE_CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidArgument.field(what, f"{path.name} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument.field(what, f"{path.name} is not UTF-8 (byte {e.start})") from None


def quick_check(source: str, allow_trust_remote_code: bool, roots: Sequence[Path]) -> dict[str, Any]:
    """The checks worth answering synchronously with a precise status, on a folder of this host under `roots`.
    Returns the parsed config."""
    path = host_path(source, "spec.source", roots=roots, hint=" (or hf://org/name, s3://bucket/prefix/, or upload it)")
    if not path.is_dir():
        raise InvalidArgument.field("spec.source", f"{source} is a file; give the model's directory")
    return check_dir(path, source, allow_trust_remote_code)


def check_dir(path: Path, source: str, allow_trust_remote_code: bool) -> dict[str, Any]:
    """A model folder's config and code checks (the folder is one the job has: a materialised upload, a copy)."""
    if not (path / "config.json").is_file():
        raise InvalidArgument.field("spec.source", f"{source} is not a Hugging Face model directory: it has no "
                                    "config.json beside its weights")
    return check_config(load_json(path / "config.json", "spec.source"), [p.name for p in path.iterdir()],
                        source, allow_trust_remote_code)


def check_config(config: Any, names: Sequence[str], source: str, allow_trust_remote_code: bool) -> dict[str, Any]:
    """What a model's config.json and its file names must pass, wherever the files are (a folder, an upload)."""
    if not isinstance(config, dict):
        raise InvalidArgument.field("spec.source", "config.json must hold a JSON object")
    if not (config.get("model_type") or config.get("architectures")):
        raise InvalidArgument.field("spec.source", "config.json names no model_type or architectures")
    if (config.get("auto_map") or any(n.endswith(".py") for n in names)) and not allow_trust_remote_code:
        raise FailedPrecondition(
            f"{source} ships custom code (auto_map / *.py), which would run with trust_remote_code; "
            "review it and set allow_trust_remote_code to import it anyway")
    return config


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header as safetensors writes it ({name: {dtype, shape, data_offsets}}), checked (core.weights)."""
    return {t.name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
            for t in read_file_header(path).values()}


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = load_json(index, "spec.source").get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidArgument.field("spec.source", f"model.safetensors.index.json names missing shards: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" (found {', '.join(pickles)}: convert to safetensors first; pickled weights can run code)" if pickles else ""
        raise InvalidArgument.field("spec.source", f"no *.safetensors weights in {path}{hint}")
    return files


def chat_template(path: Path, tok_config: dict[str, Any]) -> str:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = tok_config.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if not tmpl and (path / "chat_template.json").is_file():
        tmpl = load_json(path / "chat_template.json", "spec.source").get("chat_template")
    return tmpl or ""


def compile_chat_template(template: str):
    """A chat template compiled the way transformers compiles it (sandboxed jinja2, trim and lstrip blocks, loop
    controls, raise_exception, strftime_now, an unescaped tojson); transformers' {% generation %} block tag is not
    standard jinja, so its body renders as plain text. Render with messages=, add_generation_prompt=, bos_token=,
    eos_token= (and tools=)."""
    import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.tests["generation"] = lambda *a: True
    return env.from_string(GENERATION_TAG.sub("", template))


def render_chat_template(template: str, tok_config: dict[str, Any]) -> str:
    """Compile and render the template the way transformers does (sandboxed jinja2)."""
    from jinja2 import TemplateError

    def token(name: str) -> str:
        v = tok_config.get(name)
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    try:
        return compile_chat_template(template).render(messages=SAMPLE_CHAT, add_generation_prompt=True, tools=None,
                                                      bos_token=token("bos_token"), eos_token=token("eos_token"))
    except TemplateError as e:
        raise InvalidArgument.field("spec.source", f"the chat template does not render: {e}") from None


def inspect_model(path: Path, allow_trust_remote_code: bool, source: str = "") -> dict[str, Any]:
    config = check_dir(path, source or str(path), allow_trust_remote_code)
    files = weight_files(path)
    params, dtypes, linear = 0, Counter(), set()
    for f in files:
        for name, t in read_safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"])
            params += n
            dtypes[t["dtype"]] += n
            if name.endswith(".weight") and len(t["shape"]) == 2:  # what LoRA can target, by short name
                linear.add(name.rsplit(".", 2)[-2])
    tokenizer_kind = ""
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise InvalidArgument.field("spec.source", f"tokenizer.json does not load: {e}") from None
        tokenizer_kind, vocab = "tokenizers", tok.get_vocab_size()
    elif (path / "tokenizer.model").is_file():
        tokenizer_kind, vocab = "sentencepiece", config.get("vocab_size", 0)
    else:
        raise InvalidArgument.field("spec.source", "no tokenizer (tokenizer.json or tokenizer.model) in the model directory")
    tok_config = load_json(path / "tokenizer_config.json", "spec.source") if (path / "tokenizer_config.json").is_file() else {}
    template = chat_template(path, tok_config)
    rendered = render_chat_template(template, tok_config) if template else ""
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    text_config = config.get("text_config") or config
    experts = next((int(text_config[k]) for k in MOE_KEYS if text_config.get(k)), 0)
    return {
        "architecture": arch,
        "model_type": config.get("model_type", ""),
        "is_causal_lm": arch.endswith("ForCausalLM") or arch.endswith("ForConditionalGeneration"),
        "parameters": params,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else "",
        "dtypes": dict(dtypes),
        "is_moe": experts > 1,
        "num_experts": experts,
        "experts_per_token": int(text_config.get("num_experts_per_tok") or 0),
        "hidden_size": text_config.get("hidden_size", 0),
        "num_layers": text_config.get("num_hidden_layers", 0),
        "max_position_embeddings": text_config.get("max_position_embeddings", 0),
        "vocab_size": vocab,
        "tokenizer": tokenizer_kind,
        "has_chat_template": bool(template),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else "",
        "chat_template_sample": rendered[:2000],
        "weight_files": [f.name for f in files],
        "linear_modules": sorted(linear),
        "trust_remote_code": bool(config.get("auto_map")),
        # a checkpoint whose config says how it was quantized (GPTQ, AWQ, compressed-tensors, bitsandbytes, ...)
        "quantization": str((config.get("quantization_config") or {}).get("quant_method", "")),
        "form": "quantized" if config.get("quantization_config") else "base",
    }
