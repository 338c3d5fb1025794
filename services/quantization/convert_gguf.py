"""`python -m services.quantization.convert_gguf MODEL_DIR --outfile F --outtype T`: llama.cpp's own
convert_hf_to_gguf.py (from the toolchain on PYTHONPATH, services.core.llama_cpp.Toolchain.convert), with one
change: a BPE tokenizer whose token hash the converter does not know (a custom tokenizer, where adding a hash needs
the hub) gets llama.cpp's `gpt-2` pre-tokenizer when, and only when, its own tokenizer.json says it is what that
pre-tokenizer does: a byte-level BPE with `use_regex: true` and `add_prefix_space: false` (the GPT-2 split, token
for token). Any other unknown tokenizer is refused, as upstream does, with what was found.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def gpt2_compatible(tokenizer_json: dict) -> tuple[bool, str]:
    """Whether a tokenizer.json's pre-tokenizer is exactly GPT-2's byte-level split; and what it is."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    model = tokenizer_json.get("model") or {}
    shown = json.dumps(pre, sort_keys=True)[:300]
    ok = (model.get("type") == "BPE" and len(steps or []) == 1 and steps[0].get("type") == "ByteLevel"
          and steps[0].get("use_regex", True) is True and steps[0].get("add_prefix_space", False) is False
          and not tokenizer_json.get("normalizer"))
    return ok, shown


def patch() -> None:
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            if not path.is_file():
                raise
            ok, shown = gpt2_compatible(json.loads(path.read_text(encoding="utf-8")))
            if not ok:
                raise NotImplementedError(f"the BPE pre-tokenizer is not one llama.cpp knows, and not GPT-2's "
                                          f"byte-level split either ({shown}): this tokenizer cannot be written "
                                          "to GGUF faithfully") from None
            print("tunery: unknown BPE hash; tokenizer.json is a byte-level BPE with use_regex=true and "
                  "add_prefix_space=false: llama.cpp's gpt-2 pre-tokenizer", file=sys.stderr)
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    patch()
    sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
    runpy.run_module("convert_hf_to_gguf", run_name="__main__")


if __name__ == "__main__":
    main()
