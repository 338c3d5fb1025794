"""lm-evaluation-harness in the eval job (serve venv): `run(...)` calls `lm_eval.simple_evaluate` with lm-eval's own
`local-completions` model against the served model (vLLM's /v1/completions: log-likelihoods from `echo` +
`logprobs`, generations as usual), writes lm-eval's own results and samples files (`EvaluationTracker`), and
turns every sample a 0/1 metric scores into one test of the general block (`sample_tests`), so flips, pass rates
and the forgetting delta cover lm-eval tasks too. Per-task metrics with their standard errors are kept beside the
tests (`task_summaries`). The tasks were checked before queueing by services.evaluation.lm_eval_tasks.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.errors import FailedPrecondition, InvalidArgument

@dataclass
class HarnessRun:
    tests: list[dict[str, Any]]
    tasks: dict[str, dict[str, Any]]  # task or group -> summary (task_summaries)
    files: list[Path]  # lm-eval's results JSON and samples JSONL files
    seconds: float
    version: str


def model_args(*, base_url: str, model: str, tokenizer: str | None, max_length: int, seed: int, device: str,
               api_key: str = "", remote_tokenizer: bool = False) -> dict[str, Any]:
    """lm-eval's `local-completions` arguments for a served model. `tokenizer`: a local tokenizer directory (the
    model's own: what vLLM tokenizes with); else the server's /tokenize when `remote_tokenizer`, else none (then
    only generate_until tasks can run). One request at a time on CPU; several in flight on a GPU, where vLLM
    batches them (greedy results do not depend on it)."""
    args: dict[str, Any] = {"base_url": base_url.rstrip("/") + "/completions", "model": model,
                            "max_length": max_length, "seed": seed, "num_concurrent": 1 if device == "cpu" else 8,
                            "max_retries": 3, "timeout": 600, "tokenized_requests": True}
    if tokenizer:
        args.update(tokenizer_backend="huggingface", tokenizer=tokenizer)
    elif remote_tokenizer:
        args.update(tokenizer_backend="remote")
    else:
        args.update(tokenizer_backend="none", tokenized_requests=False)
    if api_key:
        args.update(auth_token=api_key, header={"Authorization": f"Bearer {api_key}"})
    return args


def primary_metric(config: Mapping[str, Any]) -> str:
    metrics = [m.get("metric") for m in config.get("metric_list") or [] if isinstance(m, Mapping)]
    metrics = [m for m in metrics if isinstance(m, str)]
    if metrics:
        return metrics[0]
    return {"multiple_choice": "acc", "loglikelihood": "acc", "loglikelihood_rolling": "word_perplexity"}.get(
        str(config.get("output_type") or "generate_until"), "exact_match")


def _text(x: Any) -> str:
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, default=str)


def sample_tests(task: str, samples: list[Mapping[str, Any]], config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One general-block test per document a 0/1 metric scores (acc, exact_match, ...), in the report's test
    shape; documents scored otherwise (perplexities, BLEU) only count in the task's metrics. Tasks with several
    filters (strict / flexible answer extraction) are scored on their first."""
    metric = primary_metric(config)
    out_type = str(config.get("output_type") or "generate_until")
    first_filter = next((s.get("filter") for s in samples), None)
    tests = []
    for s in samples:
        if s.get("filter") != first_filter:
            continue
        value = s.get(metric)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or float(value) not in (0.0, 1.0):
            continue
        args = s.get("arguments") or []
        prompt = _text(args[0][0]) if args and isinstance(args[0], (list, tuple)) and args[0] else ""
        target = s.get("target")
        if out_type == "multiple_choice":
            choices = [str(a[1]).strip() if isinstance(a, (list, tuple)) and len(a) > 1 else "" for a in args]
            lls = [float(r[0]) if isinstance(r, (list, tuple)) else float("-inf") for r in s.get("filtered_resps") or []]
            output = choices[max(range(len(lls)), key=lls.__getitem__)] if lls and len(lls) == len(choices) else ""
            expected = choices[target] if isinstance(target, int) and 0 <= target < len(choices) else _text(target)
        elif out_type == "loglikelihood":
            greedy = [bool(r[1]) for r in s.get("filtered_resps") or [] if isinstance(r, (list, tuple))]
            output = "greedy continuation" if greedy and all(greedy) else "not the greedy continuation"
            expected = str(args[0][1]) if args and len(args[0]) > 1 else _text(target)
        else:
            resp = s.get("filtered_resps")
            output = _text(resp[0] if isinstance(resp, list) and resp else resp)
            expected = _text(target)
        passed = float(value) == 1.0
        tests.append({"id": f"lm-eval/{task}/{s.get('doc_id')}", "block": "general", "prompt": prompt,
                      "output": output, "passed": passed, "expected": expected, "latency_ms": 0.0,
                      "reason": "" if passed else f"{metric} 0 (expected {expected!r})"})
    return tests


def task_summaries(results: Mapping[str, Any], sources: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{task or group: {metrics, stderr, primary, value, n, num_fewshot, output_type, source, version, filter}}."""
    out = {}
    configs = results.get("configs") or {}
    nshot = results.get("n-shot") or {}
    nsamples = results.get("n-samples") or {}
    versions = results.get("versions") or {}
    for name, row in (results.get("results") or {}).items():
        metrics, stderr, filt = {}, {}, None
        for key, v in row.items():
            if "," not in key or not isinstance(v, (int, float)):
                continue
            metric, f = key.split(",", 1)
            filt = filt or f
            if f != filt:
                continue
            if metric.endswith("_stderr"):
                stderr[metric[:-len("_stderr")]] = float(v)
            else:
                metrics[metric] = float(v)
        cfg = configs.get(name) or {}
        primary = primary_metric(cfg) if cfg else next(iter(metrics), "")
        out[name] = {"metrics": metrics, "stderr": stderr, "primary": primary, "value": metrics.get(primary),
                     "primary_stderr": stderr.get(primary), "filter": filt or "none",
                     "n": int((nsamples.get(name) or {}).get("effective") or row.get("sample_len") or 0),
                     "num_fewshot": nshot.get(name), "output_type": cfg.get("output_type", "group"),
                     "source": sources.get(name, "local" if name in configs else "group"),
                     "version": versions.get(name), "higher_is_better": (results.get("higher_is_better") or {})
                     .get(name, {}).get(primary)}
    return out


def _quiet_logs() -> None:
    import logging

    for name in ("lm-eval", "lm_eval", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether this worker can open a connection to the Hugging Face hub (HF_ENDPOINT, default huggingface.co).
    Asked once, up front: where it cannot, huggingface_hub would retry each request with backoff (~30 s here)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
        return True
    except OSError:
        return False


def prepare_environment(cache_dir: Path, hub: bool) -> bool:
    """Before datasets is imported: its cache beside the job's (unless one is configured); offline when no task
    needs the hub, so local tasks never reach for the network, and offline too when the hub cannot be reached, so
    standard tasks load from HF_DATASETS_CACHE or fail at once. Returns whether the hub is used."""
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir / "hf-datasets"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    online = hub and os.environ.get("HF_HUB_OFFLINE") != "1" and hub_reachable()
    if not online:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    return online


def task_manager(task_dir: Path | None, standard: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=standard)


def preload(names: list[str], task_dir: Path | None, tm) -> None:
    """Load every task's documents before the model server starts: a dataset the hub cannot give, or a config
    lm-eval rejects, fails here in seconds, not after the server's start. The datasets stay in the cache."""
    import contextlib

    from lm_eval.tasks import get_task_dict

    with contextlib.chdir(task_dir) if task_dir else contextlib.nullcontext():
        try:
            get_task_dict(names, tm)
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise anything; the message is what matters
            msg = f"{type(e).__name__}: {e}".strip()
            if re.search(r"offline|ConnectionError|resolve|Max retries|hf\.co|huggingface\.co|couldn't reach|"
                         r"Couldn't find", msg, re.IGNORECASE):
                raise FailedPrecondition(f"lm-eval tasks {names}: a dataset could not be fetched from the Hugging "
                                         f"Face hub ({msg[:400]}); give local task files, or pre-fill "
                                         "HF_DATASETS_CACHE on the workers") from None
            raise InvalidArgument(f"lm-eval could not load the tasks {names}: {msg[:800]}") from None


def run(*, names: list[str], sources: Mapping[str, str], task_dir: Path | None, tm, args: dict[str, Any],
        out_dir: Path, label: str, num_fewshot: int | None, limit: int, apply_chat_template: bool,
        system_instruction: str, seed: int) -> HarnessRun:
    """Run `names` with lm-eval's local-completions model (`args`: model_args) and save lm-eval's own files."""
    import contextlib

    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    _quiet_logs()
    tracker = EvaluationTracker(output_path=str(out_dir / f"lm-eval-{label}"))
    t0 = time.monotonic()
    with contextlib.chdir(task_dir) if task_dir else contextlib.nullcontext():
        results = lm_eval.simple_evaluate(
            model="local-completions", model_args=args, tasks=names, task_manager=tm, num_fewshot=num_fewshot,
            limit=limit or None, log_samples=True, apply_chat_template=apply_chat_template,
            system_instruction=system_instruction or None, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, confirm_run_unsafe_code=False,
            evaluation_tracker=tracker)
    seconds = time.monotonic() - t0
    samples = results.pop("samples", {}) or {}
    configs = results.get("configs") or {}
    # before saving: the tracker rewrites the samples' arguments into its file layout in place
    tests = [t for task, rows in samples.items() for t in sample_tests(task, rows, configs.get(task) or {})]
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in samples:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    files = sorted(p for p in (out_dir / f"lm-eval-{label}").rglob("*") if p.is_file())
    return HarnessRun(tests=tests, tasks=task_summaries(results, sources), files=files, seconds=seconds,
                      version=lm_eval.__version__)
