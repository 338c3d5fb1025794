"""The llama.cpp OpenAI-compatible server's own logic, without a model: sampling (greedy at temperature 0, seeded
draws, the top_p cut), log-probabilities, and the requests it refuses before touching the engine, each with its
reason (services.core.llama_server; the server on a real GGUF: tests/integration/test_quantization.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from services.core.llama_server import BadRequest, Engine, LlamaServer, LlamaServerSpec, log_softmax, pick


def test_greedy_at_temperature_zero_and_seeded_draws_otherwise():
    logits = np.array([0.1, 2.0, 1.9, -1.0], dtype=np.float32)
    assert pick(logits, 0.0, 1.0, np.random.default_rng(0)) == 1
    draws = [pick(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(200)]
    assert draws == [pick(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(200)]  # the seed decides
    assert {1, 2} <= set(draws) and draws.count(1) > draws.count(0)
    # top_p keeps the smallest set of tokens holding that much of the mass: here the two best
    assert set(pick(logits, 1.0, 0.8, np.random.default_rng(s)) for s in range(200)) == {1, 2}
    assert set(pick(logits, 1.0, 1e-6, np.random.default_rng(s)) for s in range(50)) == {1}


def test_log_softmax_is_a_log_distribution_per_row():
    rows = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    lp = log_softmax(rows)
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0) and np.isfinite(lp).all() and lp[1, 0] == pytest.approx(0.0)


def bare_engine() -> Engine:
    e = Engine.__new__(Engine)  # the request checks only: no model loaded
    e.served_name, e.seed, e.n_ctx, e.lock = "m", 7, 64, threading.Lock()
    return e


@pytest.mark.parametrize("body, status, words", [
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "The model `other` does not exist"),
    ({"messages": []}, 400, "messages must be a non-empty list"),
    ({"messages": ["hi"]}, 400, "messages[0] must be an object with a role"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tool calls are not supported"),
])
def test_chat_requests_it_cannot_serve_are_refused_with_the_reason(body, status, words):
    with pytest.raises(BadRequest) as e:
        bare_engine().chat(body)
    assert e.value.status == status and words in str(e.value)


@pytest.mark.parametrize("body, words", [
    ({"max_tokens": -1}, "max_tokens must be an integer >= 0"),
    ({"max_tokens": True}, "max_tokens must be an integer >= 0"),
    ({"temperature": 3}, "temperature must be a number in [0.0, 2.0]"),
    ({"top_p": 0}, "top_p must be a number"),
    ({"stop": 5}, "stop must be a string or a list of strings"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"stream": True}, "streaming is not supported"),
])
def test_sampling_parameters_are_checked(body, words):
    with pytest.raises(BadRequest, match=words.replace("[", r"\[").replace("]", r"\]")):
        bare_engine().sampling(body, 16)


def test_sampling_defaults_and_the_server_seed():
    e = bare_engine()
    assert e.sampling({}, 16) == {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": 7, "stop": []}
    got = e.sampling({"max_completion_tokens": 4, "temperature": 0, "seed": 3, "stop": "\n"}, 16)
    assert got == {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 3, "stop": ["\n"]}
    with pytest.raises(BadRequest, match="maximum context length is 64 tokens.*60 in the messages, 8 in"):
        e.check_fits(60, 8)


def test_the_server_command_keeps_the_key_out_of_argv(tmp_path):
    s = LlamaServer(LlamaServerSpec(model_path="/m.gguf", served_name="m", api_key="secret", max_model_len=512),
                    python="/py", port=9, log_path=tmp_path / "l.log")
    assert s.server_command() == ["/py", "-m", "services.core.llama_server", "--model", "/m.gguf", "--served-name",
                                  "m", "--host", "127.0.0.1", "--port", "9", "--ctx", "512", "--threads", "0",
                                  "--seed", "0"]
    env = s.environment()
    assert env["TUNERY_LLAMA_API_KEY"] == "secret" and "secret" not in " ".join(s.server_command())
    assert s.auth_headers() == {"Authorization": "Bearer secret"}


def test_llama_threads_are_half_the_cores_unless_set(monkeypatch):
    import os

    from services.core.llama_cpp import cpu_threads

    monkeypatch.delenv("TUNERY_LLAMA_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert cpu_threads() == 1  # ggml's threads spin: never as many as a busy machine's cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_threads() == 8
    monkeypatch.setenv("TUNERY_LLAMA_THREADS", "3")
    assert cpu_threads() == 3
