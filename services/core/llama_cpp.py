"""llama.cpp from this machine's toolchain (`make setup-llama-cpp`, build/llama-cpp): its HF -> GGUF converter
(convert_hf_to_gguf.py and its own gguf-py, from the llama.cpp source that the pinned npm package node-llama-cpp
ships) and its prebuilt CPU library (libllama from @node-llama-cpp/linux-x64, the same release), called through
ctypes: quantize, load, tokenize, render the chat template, greedy decode. Nothing is compiled here.

The structs that llama.cpp passes by value (model, context and quantize params, a batch) are handled as opaque
buffers larger than the real ones, filled by llama.cpp's own `*_default_params()`: on x86-64 a struct that large
travels in memory, so only the quantize params' leading fields (nthread, ftype), whose offsets the header fixes,
are ever written from here.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from services.core.settings import REPO_ROOT

FTYPES = {"gguf-q8_0": 7, "gguf-q4_k_m": 15, "gguf-f16": 1}   # enum llama_ftype (include/llama.h)
OPAQUE = 1024                                                   # bytes; every by-value struct is smaller


class Toolchain:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or os.environ.get("TUNERY_LLAMA_CPP_DIR") or REPO_ROOT / "build" / "llama-cpp")
        self.src = self.root / "src"
        self.bins = self.root / "pkg" / "@node-llama-cpp" / "linux-x64" / "bins" / "linux-x64"

    def missing(self) -> str:
        """What is absent ('' when the toolchain is complete)."""
        for path, what in ((self.src / "convert_hf_to_gguf.py", "llama.cpp's converter"),
                           (self.src / "gguf-py" / "gguf", "llama.cpp's gguf-py"),
                           (self.libllama(), "the prebuilt libllama")):
            if path is None or not path.exists():
                return f"{what} is missing under {self.root}: run `make setup-llama-cpp`"
        return ""

    def version(self) -> str:
        """node-llama-cpp's version and the llama.cpp commit of the converter (what made a file)."""
        import json

        pkg = self.root / "pkg" / "node-llama-cpp" / "package.json"
        v = json.loads(pkg.read_text())["version"] if pkg.is_file() else "?"
        head = (self.src / ".git" / "HEAD").read_text().strip() if (self.src / ".git" / "HEAD").is_file() else "?"
        return f"node-llama-cpp {v}, llama.cpp {head[:12]}"

    def libllama(self) -> Path | None:
        found = sorted(self.bins.glob("libllama.*so")) if self.bins.is_dir() else []
        return found[0] if found else None

    def convert(self, model_dir: Path, out: Path, outtype: str) -> str:
        """HF folder -> one GGUF file (outtype f32 | f16 | bf16 | q8_0), through services.quantization.convert_gguf
        (the converter with Tunery's honest pre-tokenizer fallback). Returns the converter's log."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.src / "gguf-py"), str(self.src),
                                                            str(REPO_ROOT)])}
        cmd = [sys.executable, "-m", "services.quantization.convert_gguf", str(model_dir), "--outfile", str(out),
               "--outtype", outtype]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-6:])
            raise RuntimeError(f"llama.cpp's converter refused {model_dir.name}: {tail}")
        return run.stderr


LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
QUIET = LOG_CALLBACK(lambda level, text, user: None)   # llama.cpp's load chatter off the job's log


class LlamaChatMessage(ctypes.Structure):
    _fields_ = [("role", ctypes.c_char_p), ("content", ctypes.c_char_p)]


class Opaque(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_ubyte * OPAQUE)]


class QuantizeParams(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int32), ("rest", ctypes.c_ubyte * (OPAQUE - 8))]


class ContextParams(ctypes.Structure):
    """struct llama_context_params: its leading fields (include/llama.h), the rest opaque."""
    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_ubatch", ctypes.c_uint32),
                ("n_seq_max", ctypes.c_uint32), ("n_rs_seq", ctypes.c_uint32), ("n_outputs_max", ctypes.c_uint32),
                ("n_outputs_max_per_seq", ctypes.c_uint32), ("n_threads", ctypes.c_int32),
                ("n_threads_batch", ctypes.c_int32), ("rest", ctypes.c_ubyte * (OPAQUE - 36))]


def cpu_threads() -> int:
    """llama.cpp's threads: TUNERY_LLAMA_THREADS, else half the cores this process may run on (at least 1).
    ggml's threads spin while they wait for each other, so more of them than free cores is many times slower: on
    this project's 2-core machines 16 greedy tokens of SmolLM2-135M took 50 s with llama.cpp's default 4 threads,
    0.25 s with 2 threads on an idle machine, and under load (the test suite beside it) 4.7-14 s with 2 threads
    against 0.8-1.0 s with 1."""
    if os.environ.get("TUNERY_LLAMA_THREADS", "").strip():
        return max(1, int(os.environ["TUNERY_LLAMA_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


class Batch(ctypes.Structure):
    """struct llama_batch (include/llama.h), passed by value to llama_decode."""
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.POINTER(ctypes.c_float)), ("pos", ctypes.POINTER(ctypes.c_int32)),
                ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


class LlamaCpp:
    """The library, its backends loaded once per process."""

    _lib: ctypes.CDLL | None = None

    def __init__(self, toolchain: Toolchain):
        if LlamaCpp._lib is None:
            path = toolchain.libllama()
            ctypes.CDLL(str(toolchain.bins / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
            ggml = ctypes.CDLL(str(next(toolchain.bins.glob("libggml.*so"))), mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(toolchain.bins).encode())
            self._declare(lib)
            lib.llama_log_set(QUIET, None)
            lib.llama_backend_init()
            LlamaCpp._lib = lib
        self.lib = LlamaCpp._lib

    @staticmethod
    def _declare(lib) -> None:
        p, i32 = ctypes.c_void_p, ctypes.c_int32
        sigs = {
            "llama_backend_init": (None, []),
            "llama_log_set": (None, [LOG_CALLBACK, p]),
            "llama_model_quantize_default_params": (QuantizeParams, []),
            "llama_model_quantize": (ctypes.c_uint32, [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]),
            "llama_model_default_params": (Opaque, []),
            "llama_context_default_params": (ContextParams, []),
            "llama_model_load_from_file": (p, [ctypes.c_char_p, Opaque]),
            "llama_model_free": (None, [p]),
            "llama_init_from_model": (p, [p, ContextParams]),
            "llama_free": (None, [p]),
            "llama_model_get_vocab": (p, [p]),
            "llama_vocab_n_tokens": (i32, [p]),
            "llama_vocab_is_eog": (ctypes.c_bool, [p, i32]),
            "llama_tokenize": (i32, [p, ctypes.c_char_p, i32, ctypes.POINTER(i32), i32, ctypes.c_bool, ctypes.c_bool]),
            "llama_batch_get_one": (Batch, [ctypes.POINTER(i32), i32]),
            "llama_decode": (i32, [p, Batch]),
            "llama_get_memory": (p, [p]),
            "llama_memory_clear": (None, [p, ctypes.c_bool]),
            "llama_n_ctx": (ctypes.c_uint32, [p]),
            "llama_model_n_ctx_train": (i32, [p]),
            "llama_vocab_bos": (i32, [p]),
            "llama_vocab_eos": (i32, [p]),
            "llama_token_to_piece": (i32, [p, i32, ctypes.c_char_p, i32, i32, ctypes.c_bool]),
            "llama_get_logits_ith": (ctypes.POINTER(ctypes.c_float), [p, i32]),
            "llama_model_chat_template": (ctypes.c_char_p, [p, ctypes.c_char_p]),
            "llama_chat_apply_template": (i32, [ctypes.c_char_p, ctypes.POINTER(LlamaChatMessage), ctypes.c_size_t,
                                                ctypes.c_bool, ctypes.c_char_p, i32]),
            "llama_model_meta_val_str": (i32, [p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    def quantize(self, src: Path, dest: Path, scheme: str, threads: int = 0) -> None:
        params = self.lib.llama_model_quantize_default_params()
        params.nthread, params.ftype = threads, FTYPES[scheme]
        rc = self.lib.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
        if rc != 0 or not dest.exists():
            raise RuntimeError(f"llama_model_quantize({scheme}) failed with {rc}")

    def load(self, path: Path) -> "Model":
        model = self.lib.llama_model_load_from_file(str(path).encode(), self.lib.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path.name}")
        return Model(self, model)


class Model:
    def __init__(self, cpp: LlamaCpp, handle):
        self.lib, self.handle = cpp.lib, handle
        self.vocab = self.lib.llama_model_get_vocab(handle)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if self.handle:
            self.lib.llama_model_free(self.handle)
            self.handle = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        raw = text.encode()
        n_max = len(raw) + 16
        out = (ctypes.c_int32 * n_max)()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), out, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(out[:n])

    def render_chat(self, messages: list[dict], add_assistant: bool = True) -> str:
        """The conversation rendered by llama.cpp from the GGUF's embedded template (its built-in renderers,
        chosen by what the template looks like: what Ollama and llama-server do without a jinja engine)."""
        tmpl = self.lib.llama_model_chat_template(self.handle, None)
        if not tmpl:
            raise RuntimeError("the GGUF has no tokenizer.chat_template")
        keep = [(m["role"].encode(), (m.get("content") or "").encode()) for m in messages]
        chat = (LlamaChatMessage * len(keep))(*[LlamaChatMessage(r, c) for r, c in keep])
        size = 4 * sum(len(c) + len(r) for r, c in keep) + 1024
        buf = ctypes.create_string_buffer(size)
        n = self.lib.llama_chat_apply_template(tmpl, chat, len(keep), add_assistant, buf, size)
        if n < 0:
            raise RuntimeError("llama.cpp has no built-in renderer for this chat template")
        return buf.raw[:n].decode("utf-8", "replace")

    def n_ctx_train(self) -> int:
        return int(self.lib.llama_model_n_ctx_train(self.handle))

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int, special: bool = False) -> bytes:
        """A token's bytes (special tokens rendered only when `special`); pieces may split a UTF-8 character."""
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:max(n, 0)]

    def special_token(self, which: str) -> str:
        """The text of the model's "bos" or "eos" token ("" when it has none)."""
        token = (self.lib.llama_vocab_bos if which == "bos" else self.lib.llama_vocab_eos)(self.vocab)
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def session(self, n_ctx: int, threads: int = 0) -> "Session":
        return Session(self, n_ctx, threads or cpu_threads())

    def greedy(self, prompt: list[int], max_tokens: int, n_ctx_min: int = 512) -> list[int]:
        """Greedy continuation of `prompt` (token ids), stopping at an end-of-generation token."""
        with self.session(max(n_ctx_min, len(prompt) + max_tokens + 1)) as s:
            logits = s.feed(prompt)[-1]
            out: list[int] = []
            for _ in range(max_tokens):
                nxt = int(logits.argmax())
                if self.is_eog(nxt):
                    break
                out.append(nxt)
                logits = s.feed([nxt])[-1]
            return out


class Session:
    """One llama.cpp context of `n_ctx` tokens: feed tokens, read their logits; `reset` empties its KV cache so the
    next sequence starts at position 0 (one context serves request after request)."""

    def __init__(self, model: Model, n_ctx: int, threads: int):
        self.model, self.lib = model, model.lib
        params = self.lib.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_ubatch = min(n_ctx, 512)
        params.n_threads = params.n_threads_batch = threads
        self.ctx = self.lib.llama_init_from_model(model.handle, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} tokens")
        self.n_ctx = int(self.lib.llama_n_ctx(self.ctx))
        self.pos = 0

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.pos = 0

    def feed(self, tokens: list[int], all_logits: bool = False):
        """Decode `tokens` after what was fed before; the logits (float32, one row per token when `all_logits`,
        else the last token's row alone) as a numpy array of shape (rows, n_vocab)."""
        import numpy as np

        n = len(tokens)
        if not n:
            raise ValueError("nothing to decode")
        if self.pos + n > self.n_ctx:
            raise ValueError(f"{self.pos + n} tokens do not fit the context of {self.n_ctx}")
        i32 = ctypes.c_int32
        token = (i32 * n)(*tokens)
        pos = (i32 * n)(*range(self.pos, self.pos + n))
        n_seq = (i32 * n)(*([1] * n))
        seq0 = (i32 * 1)(0)
        seq = (ctypes.POINTER(i32) * n)(*([ctypes.cast(seq0, ctypes.POINTER(i32))] * n))
        out = (ctypes.c_int8 * n)(*([1] * n if all_logits else [0] * (n - 1) + [1]))
        batch = Batch(n, token, None, pos, n_seq, seq, out)
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        self.pos += n
        vocab = self.model.n_vocab
        rows = range(n) if all_logits else [n - 1]
        return np.stack([np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(vocab,)).copy()
                         for i in rows])
