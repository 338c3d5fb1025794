"""The teacher that answers synthetic prompts: vLLM offline batch inference on a model artifact (the CPU build
here, the CUDA build on GPUs: same code, engine arguments chosen by device), or an OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from services.core.vllm import context_length, engine_args, offline_env
from services.datagen.synth import Sampling

class Teacher(Protocol):
    name: str

    def chat(self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int],
             tools: list[dict] | None = None) -> list[str]: ...


class VLLMTeacher:
    def __init__(self, model_dir: Path, uri: str):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        for k, v in offline_env(device).items():
            os.environ.setdefault(k, v)
        from vllm import LLM

        self.name = uri
        self.device = device
        self.llm = LLM(**engine_args(str(model_dir), device, context_length(model_dir)))

    def chat(self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int],
             tools: list[dict] | None = None) -> list[str]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, seed=s) for s in seeds]
        # the tools go into the chat template, so the teacher answers with <tool_call> blocks we parse
        outs = self.llm.chat(conversations, params, use_tqdm=False, tools=tools or None)
        return [o.outputs[0].text for o in outs]


class OpenAITeacher:
    def __init__(self, base_url: str, model: str, api_key_env: str):
        from openai import OpenAI

        self.name = f"{base_url}#{model}"
        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env, "") if api_key_env else "none")

    def chat(self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int],
             tools: list[dict] | None = None) -> list[str]:
        out = []
        for conv, seed in zip(conversations, seeds):
            extra = {"tools": tools} if tools else {}
            r = self.client.chat.completions.create(model=self.model, messages=conv, temperature=sampling.temperature,
                                                    top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=seed,
                                                    **extra)
            msg = r.choices[0].message
            calls = "".join(f"<tool_call>{json.dumps({'name': c.function.name, 'arguments': json.loads(c.function.arguments)})}</tool_call>"
                            for c in (msg.tool_calls or []))
            out.append((msg.content or "") + calls)
        return out
