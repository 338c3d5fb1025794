"""An OpenAI-compatible server over llama.cpp (services.core.llama_cpp) for one GGUF file: what the eval job starts to
evaluate a GGUF model artifact, as it starts vLLM for the others, so a GGUF form runs the same suite (promptfoo's
chat requests, lm-eval's completions) on the engine its users run it on.

    python -m services.core.llama_server --model FILE.gguf --served-name NAME --port P [--ctx N] [--threads N]

The API key, when there is one, comes in the environment (TUNERY_LLAMA_API_KEY), never in argv. Routes:
- `GET /v1/models`, `GET /health`;
- `POST /v1/chat/completions`: the conversation rendered from the GGUF's own chat template (tokenizer.chat_template)
  by jinja as transformers renders it (vLLM's rendering; llama.cpp's built-in renderers drop a template's default
  system prompt, which changed the answers of the seeded merged model's Q8_0 from 10/12 to 2/12 held-out tests), then
  tokenized as transformers tokenizes it (special tokens parsed, no BOS added); greedy at temperature 0, else seeded
  sampling (temperature, top_p); `stop`; no tools, no streaming (refused with 400, saying so);
- `POST /v1/completions`: a text or token-id prompt (or a list of them), `echo` and `logprobs` (each prompt token's
  log-probability and the top ones: lm-eval's log-likelihood requests), `max_tokens` 0 allowed with echo;
- `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`: vLLM's shapes, which lm-eval's remote tokenizer
  reads, so lm-eval tokenizes with the GGUF's own vocabulary.

Requests are served one at a time on one llama.cpp context (its KV cache emptied between them). A prompt plus
max_tokens beyond the context is a 400 in vLLM's words ("maximum context length"), which the eval reports as
errored, not failed. Pure Python over ctypes and numpy: runs in the serve environment.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from services.core.vllm import COMMON_ENV, VLLMServer

API_KEY_ENV = "TUNERY_LLAMA_API_KEY"
DEFAULT_CTX = 4096


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def log_softmax(logits):
    import numpy as np

    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def pick(logits, temperature: float, top_p: float, rng) -> int:
    """The next token: the argmax at temperature 0, else a draw from the tempered distribution cut to its top_p
    mass."""
    import numpy as np

    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[:int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


@dataclass
class Generation:
    tokens: list[int]
    text: str
    finish_reason: str                 # "stop" | "length"
    logprobs: list[float]              # of each generated token
    top: list[dict[str, float]]        # the top-k alternatives at each generated position


class Engine:
    """One GGUF model and one context; `lock` serializes requests."""

    def __init__(self, path: Path, served_name: str, n_ctx: int = 0, threads: int = 0, seed: int = 0):
        from services.core.llama_cpp import LlamaCpp, Toolchain

        toolchain = Toolchain()
        missing = toolchain.missing()
        if missing:
            raise RuntimeError(missing)
        self.model = LlamaCpp(toolchain).load(path)
        self.served_name, self.seed = served_name, seed
        self.session = self.model.session(min(n_ctx or DEFAULT_CTX, self.model.n_ctx_train() or DEFAULT_CTX),
                                          threads)
        self.n_ctx = self.session.n_ctx
        self.lock = threading.Lock()
        self.template = self.model.meta("tokenizer.chat_template")
        self.jinja = None
        if self.template:
            from services.core.modeldir import compile_chat_template

            self.jinja = compile_chat_template(self.template)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.model.piece(t, special) for t in tokens).decode("utf-8", "replace")

    def prompt_tokens(self, prompt: Any) -> list[list[int]]:
        """A completions prompt as token-id lists: a text, a list of ids, or a list of either."""
        def one(p: Any) -> list[int]:
            if isinstance(p, str):
                return self.tokenize(p, add_special=True)
            if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                bad = [t for t in p if not 0 <= t < self.model.n_vocab]
                if bad:
                    raise BadRequest(f"token ids outside the vocabulary (0..{self.model.n_vocab - 1}): {bad[:5]}")
                return list(p)
            raise BadRequest("prompt must be a string, a list of token ids, or a list of those")

        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return [one(p) for p in prompt]
        return [one(prompt)]

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.n_ctx:
            raise BadRequest(f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                             f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
                             "completion). Please reduce the length of the messages or completion.")

    def render(self, messages: list[dict]) -> str:
        """The conversation rendered from the GGUF's own chat template as transformers renders it (so a template's
        default system prompt is there, as vLLM and Ollama's SYSTEM give it); llama.cpp's built-in renderer where
        the file has no template."""
        from jinja2 import TemplateError

        if self.jinja is None:
            return self.model.render_chat(messages, add_assistant=True)
        try:
            return self.jinja.render(messages=messages, add_generation_prompt=True, tools=None,
                                     bos_token=self.model.special_token("bos"),
                                     eos_token=self.model.special_token("eos"))
        except TemplateError as e:
            raise BadRequest(f"the model's chat template refused the conversation: {e}") from None

    # ------------------------------------------------------------------ decoding
    def run(self, prompt: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int,
            stop: list[str], top_k: int = 0, logprobs: bool = False, echo_logprobs: bool = False):
        """Feed `prompt`, then generate; returns (the prompt's per-token logprobs and top-k when echo_logprobs,
        the Generation, with each generated token's logprob and top-k when `logprobs`). Call with `lock` held."""
        import numpy as np

        if not prompt:
            raise BadRequest("the prompt is empty")
        self.check_fits(len(prompt), max_tokens)
        rng = np.random.default_rng(seed)
        self.session.reset()
        rows = self.session.feed(prompt, all_logits=echo_logprobs)
        prompt_lp: list[float | None] = [None]
        prompt_top: list[dict[str, float] | None] = [None]
        if echo_logprobs:
            lps = log_softmax(rows[:-1])
            for i, tok in enumerate(prompt[1:]):
                prompt_lp.append(float(lps[i, tok]))
                prompt_top.append(self.top(lps[i], top_k))
        logits = rows[-1]
        out, pieces, gen_lp, gen_top, finish = [], b"", [], [], "length"
        for _ in range(max_tokens):
            tok = pick(logits, temperature, top_p, rng)
            if self.model.is_eog(tok):
                finish = "stop"
                break
            if logprobs:
                lp = log_softmax(logits)
                gen_lp.append(float(lp[tok]))
                gen_top.append(self.top(lp, top_k))
            out.append(tok)
            pieces += self.model.piece(tok)
            text = pieces.decode("utf-8", "ignore")
            cut = min((text.index(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                return (prompt_lp, prompt_top), Generation(out, text[:cut], "stop", gen_lp, gen_top)
            if len(out) == max_tokens:
                break
            logits = self.session.feed([tok])[-1]
        return (prompt_lp, prompt_top), Generation(out, pieces.decode("utf-8", "replace"), finish, gen_lp, gen_top)

    def top(self, logprobs, k: int) -> dict[str, float]:
        import numpy as np

        if k <= 0:
            return {}
        best = np.argsort(-logprobs, kind="stable")[:k]
        return {self.detokenize([int(t)], special=True): float(logprobs[t]) for t in best}

    # ------------------------------------------------------------------ routes
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "owned_by": "tunery",
                                            "max_model_len": self.n_ctx, "root": self.served_name}]}

    def _model_of(self, body: dict) -> None:
        asked = body.get("model") or self.served_name
        if asked != self.served_name:
            raise BadRequest(f"The model `{asked}` does not exist.", 404)

    def sampling(self, body: dict, default_max: int) -> dict:
        def number(key: str, default: float, lo: float, hi: float) -> float:
            v = body.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise BadRequest(f"{key} must be a number in [{lo}, {hi}], not {v!r}")
            return float(v)

        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = default_max
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise BadRequest(f"max_tokens must be an integer >= 0, not {max_tokens!r}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or a list of strings")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest(f"seed must be an integer, not {seed!r}")
        if body.get("stream"):
            raise BadRequest("streaming is not supported by this llama.cpp server (Tunery's GGUF evaluation)")
        return {"max_tokens": max_tokens, "temperature": number("temperature", 1.0, 0.0, 2.0),
                "top_p": number("top_p", 1.0, 1e-9, 1.0), "seed": self.seed if seed is None else seed, "stop": stop}

    def chat(self, body: dict) -> dict:
        self._model_of(body)
        if body.get("tools") or body.get("functions"):
            raise BadRequest("tool calls are not supported by this llama.cpp server (Tunery's GGUF evaluation): "
                             "evaluate tool calling on the merged model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a role")
            content = m.get("content") or ""
            if isinstance(content, list):  # content parts: the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
            plain.append({"role": m["role"], "content": content})
        with self.lock:
            prompt = self.tokenize(self.render(plain), add_special=False)
            params = self.sampling(body, max(self.n_ctx - len(prompt), 0))
            _, g = self.run(prompt, **params)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.served_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                             "finish_reason": g.finish_reason}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(g.tokens),
                          "total_tokens": len(prompt) + len(g.tokens)}}

    def completions(self, body: dict) -> dict:
        self._model_of(body)
        echo = bool(body.get("echo"))
        k = body.get("logprobs")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20):
            raise BadRequest(f"logprobs must be an integer in [0, 20], not {k!r}")
        choices, n_prompt, n_gen = [], 0, 0
        params = self.sampling(body, 16)
        with self.lock:
            prompts = self.prompt_tokens(body.get("prompt"))
            for i, prompt in enumerate(prompts):
                (p_lp, p_top), g = self.run(prompt, **params, top_k=k or 0, logprobs=k is not None,
                                            echo_logprobs=echo and k is not None)
                text = (self.detokenize(prompt) if echo else "") + g.text
                logprobs = None
                if k is not None:
                    toks = (prompt if echo else []) + g.tokens
                    logprobs = {"tokens": [self.detokenize([t], special=True) for t in toks],
                                "token_logprobs": (p_lp if echo else []) + g.logprobs,
                                "top_logprobs": (p_top if echo else []) + g.top,
                                "text_offset": []}
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": g.finish_reason})
                n_prompt, n_gen = n_prompt + len(prompt), n_gen + len(g.tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.served_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    def tokenizer_info(self) -> dict:
        return {"eos_token": self.model.special_token("eos"), "bos_token": self.model.special_token("bos") or None,
                "pad_token": None, "chat_template": self.template, "model_max_length": self.n_ctx}

    def tokenize_route(self, body: dict) -> dict:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise BadRequest("prompt must be a string")
        tokens = self.tokenize(text, add_special=bool(body.get("add_special_tokens", True)))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.n_ctx}

    def detokenize_route(self, body: dict) -> dict:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BadRequest("tokens must be a list of token ids")
        return {"prompt": self.detokenize(tokens)}


def handler(engine: Engine, api_key: str):
    routes_get = {"/v1/models": engine.models, "/health": lambda: {"status": "ok"},
                  "/tokenizer_info": engine.tokenizer_info}
    routes_post = {"/v1/chat/completions": engine.chat, "/v1/completions": engine.completions,
                   "/tokenize": engine.tokenize_route, "/detokenize": engine.detokenize_route}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request, on the server's log
            print(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}", flush=True)

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str) -> None:
            kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(status, "Error")
            self.reply(status, {"error": {"message": message, "type": kind, "code": status}, "object": "error",
                                "message": message})

        def authorized(self) -> bool:
            if not api_key or self.path == "/health":
                return True
            if self.headers.get("Authorization", "") == f"Bearer {api_key}":
                return True
            self.error(401, "Unauthorized")
            return False

        def do_GET(self):
            route = routes_get.get(self.path.split("?")[0])
            if route is None:
                return self.error(404, f"no route {self.path}")
            if self.authorized():
                self.reply(200, route())

        def do_POST(self):
            route = routes_post.get(self.path.split("?")[0])
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if route is None:
                return self.error(404, f"no route {self.path}")
            if not self.authorized():
                return
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                self.reply(200, route(body))
            except json.JSONDecodeError as e:
                self.error(400, f"the body is not JSON: {e}")
            except BadRequest as e:
                self.error(e.status, str(e))
            except Exception as e:  # noqa: BLE001 - the engine's own words, as a 500, and the server keeps serving
                self.error(500, f"{type(e).__name__}: {e}")

    return Handler


@dataclass
class LlamaServerSpec:
    model_path: str          # the .gguf file
    served_name: str
    api_key: str = ""        # "" = no key; else every route but /health answers 401 without it
    max_model_len: int = 0   # 0: the model's context, at most DEFAULT_CTX
    seed: int = 0            # the default sampling seed (a request's own seed wins)
    threads: int = 0         # 0: llama_cpp.cpu_threads() (half the cores; TUNERY_LLAMA_THREADS)


class LlamaServer(VLLMServer):
    """`with LlamaServer(LlamaServerSpec(...)) as server:` this module's server on a free port of 127.0.0.1, started,
    waited for and stopped as vLLM's is (VLLMServer's process handling)."""

    engine = "llama.cpp"

    def server_command(self) -> list[str]:
        s = self.spec
        return [self.python, "-m", "services.core.llama_server", "--model", str(s.model_path), "--served-name",
                s.served_name, "--host", "127.0.0.1", "--port", str(self.port), "--ctx", str(s.max_model_len),
                "--threads", str(s.threads), "--seed", str(s.seed)]

    def environment(self) -> dict[str, str]:
        from services.core.settings import REPO_ROOT

        env = dict(os.environ if self.base_env is None else self.base_env)
        env.update(COMMON_ENV)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.pop(API_KEY_ENV, None)
        if self.spec.api_key:
            env[API_KEY_ENV] = self.spec.api_key
        return env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--served-name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ctx", type=int, default=0, help="context length (0: the model's, at most 4096)")
    p.add_argument("--threads", type=int, default=0, help="0: half the cores (TUNERY_LLAMA_THREADS overrides)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.monotonic()
    engine = Engine(a.model, a.served_name, a.ctx, a.threads, a.seed)
    server = ThreadingHTTPServer((a.host, a.port), handler(engine, os.environ.get(API_KEY_ENV, "")))
    print(f"llama.cpp server for {a.model.name} as {a.served_name!r} on http://{a.host}:{a.port}/v1 "
          f"(context {engine.n_ctx}, loaded in {time.monotonic() - t0:.1f}s)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
