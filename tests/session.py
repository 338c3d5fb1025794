"""The test run's heavy real components, each made once per pytest session and shared by the e2e and integration
tests (a pytest plugin: tests/conftest.py loads it).

- `s3`: one S3-compatible server (moto) on 127.0.0.1;
- `ray_head`: one Ray head (2 CPUs) whose workers reach that S3 server;
- `seed`: one set of gRPC services bound to one project, with the seeded artifacts made on first use and reused by
  every later stage: the tiny base, the foundation base, a prepared dataset for each, and one adapter trained once
  (the foundation's style adapter, the demo's recipe);
- `vllm_endpoint`: one long-lived vLLM server (serve venv) with the foundation base and that adapter on one engine;
  plumbing tests evaluate it as an endpoint target instead of starting an engine of their own.

Everything here imports lazily: this module is also loaded by the train and serve venvs' pytest runs.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import uuid
from functools import cached_property
from pathlib import Path

import pytest

from tests.servers import REPO, S3_KEYS, RayHead, S3Server, ServerThread, in_loopback_namespace, wait_for

TOKEN = "integration-test-token"
BUCKET = "tunery-it"
FOUNDATION = REPO / "fixtures" / "foundation"
# what the seeded style adapter teaches: every answer ends with this (a changed answer the base never gives)
STYLE = "{answer}, my friend."
SERVICES = ("datagen", "training", "merging", "quantization", "evaluation", "serving", "pipeline")  # besides the registry


# The test cluster's background work, cut where no test looks (on the 2-core machine every idle process's CPU is taken
# from the tests): the dashboard agent's process stats every 30 s (not 5), no Prometheus metrics export. Serve's
# control loop keeps its 0.1 s (at 0.5 s deleting an app got slower). Product heads (`tunery up`, the demo's) keep
# Ray's defaults.
IDLE_QUIET = {"REPORTER_UPDATE_INTERVAL_MS": "30000", "RAY_enable_metrics_collection": "false"}


# where the integration tier's tests keep the files they import by server path: pytest's temporary folders and the
# checkout (its fixtures); anything else is outside the services' import roots, as on a real stack
IMPORT_ROOTS = os.pathsep.join([tempfile.gettempdir(), str(REPO)])


def fixture_model(name: str) -> Path:
    path = Path(os.environ.get("TUNERY_FIXTURES", REPO / "build" / "fixtures")) / name
    if not (path / "config.json").exists():
        pytest.fail(f"{path} is missing: build the fixtures with `make fixtures` (make test does it)")
    return path


def require_loopback(what: str) -> None:
    if not in_loopback_namespace() and os.environ.get("TUNERY_NETNS") != "0":
        pytest.fail(f"{what} start a Ray head, which binds every interface: run them through `make test` (a "
                    "loopback-only network namespace), or set TUNERY_NETNS=0 to run here anyway")


def foundation_facts() -> list[dict]:
    return [json.loads(line) for line in (FOUNDATION / "facts.jsonl").read_text().splitlines() if line.strip()]


def shuffled_facts() -> list[dict]:
    """The foundation's facts in the order the demo and the seeded adapter use (seeded shuffle)."""
    facts = foundation_facts()
    random.Random(0).shuffle(facts)
    return facts


def style_rows(facts: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f["question"]},
                          {"role": "assistant", "content": STYLE.format(answer=f["answer"])}]} for f in facts]


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: what is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_head(s3):
    require_loopback("integration and e2e tests")
    # the workers' own secrets: the S3 keys, and the token a pipeline job calls the integration tier's services with;
    # Serve says why a replica waits for resources after 5 s, not 30 (dead time in a test run)
    head = RayHead({**S3_KEYS, "TUNERY_S3_ENDPOINT": s3.endpoint, "TUNERY_TOKEN": TOKEN,
                    "RAY_SERVE_SLOW_STARTUP_WARNING_S": "5", "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "5",
                    **IDLE_QUIET})
    print(f"\nRay head started in {head.start_s:.2f}s")
    yield head
    head.stop()


def service_settings(s3, ray_head, project: str, cache_dir: Path):
    from services.registry.service import RegistrySettings

    return RegistrySettings(
        project=project, store_url=f"s3://{BUCKET}", s3_endpoint=s3.endpoint,
        s3_access_key=S3_KEYS["TUNERY_S3_ACCESS_KEY"], s3_secret_key=S3_KEYS["TUNERY_S3_SECRET_KEY"],
        ray_address=ray_head.address, auth_tokens=TOKEN, host="127.0.0.1", port=0, cache_dir=cache_dir,
        import_roots=IMPORT_ROOTS)


def service_client(servers: ServerThread, settings, *services: str, **overrides: dict):
    """A client of real servers bound to `settings`' project: the registry plus `services` (names as in the
    embedded stack), each on 127.0.0.1:0 with its own settings class; `overrides` per service, e.g.
    training={"cpus_per_worker": 0.5}."""
    from services.cli.stack import health
    from services.embedded.__main__ import SERVICES as ALL
    from services.sdk.client import TuneryClient

    known = {cls.model_fields["service"].default: (cls, build) for cls, build in ALL}
    base = settings.model_dump()
    ports = {}
    for name in ("registry", *services):
        cls, build = known[name]
        extra = {"endpoints": {k: f"127.0.0.1:{p}" for k, p in ports.items()}} if name == "pipeline" else {}
        ports[name] = servers.start(cls(**{**base, "service": name, "port": 0, **extra, **overrides.get(name, {})}),
                                    build)
    for port in ports.values():
        wait_for(lambda: health(port) == "SERVING", 30, what="SERVING")
    return TuneryClient(f"127.0.0.1:{ports['registry']}", TOKEN,
                        endpoints={k: f"127.0.0.1:{p}" for k, p in ports.items()})


def succeeded(client, job, timeout: float = 600):
    from services.gen.tunery.v1 import common_pb2 as pb

    final = client.wait(job.id, timeout)
    if final.state != pb.JOB_STATE_SUCCEEDED:  # the job's own last words, whole (the state reason is capped)
        tail = "\n".join(e.text for e in list(client.watch(job.id, follow=False))[-4:])
        raise AssertionError(f"{job.id} {pb.JobState.Name(final.state)}: {final.state_reason}\n{tail}")
    return final


class Seed:
    """The seeded artifacts of the test run, in one project, each made on first use (so a run that selects a few
    tests makes only what they need) and then shared. Values are tunery:// uris."""

    # the seeded style adapter: the demo's recipe, on the foundation's first 120 shuffled facts
    STYLE_TRAINING = {"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                      "optimizer": {"learning_rate": 0.002, "lr_scheduler": "constant", "warmup_ratio": 0.0},
                      "epochs": 6, "micro_batch_size": 8, "max_seq_len": 128, "eval_samples": 0,
                      "checkpoint_every_steps": 1000}

    def __init__(self, client, project: str, work: Path):
        self.client, self.project, self.work = client, project, work

    def _import_model(self, path: Path, name: str) -> str:
        return succeeded(self.client, self.client.import_model(str(path), name)).outputs[0].uri

    def _import_rows(self, rows: list[dict], name: str, filename: str = "") -> str:
        (self.work / name).mkdir()
        path = write_jsonl(self.work / name / (filename or f"{name}.jsonl"), rows)
        return succeeded(self.client, self.client.import_dataset(str(path), name)).outputs[0].uri

    def _prepare(self, raw: str, base: str, **kw) -> str:
        return succeeded(self.client, self.client.prepare_dataset(raw, base, **kw)).outputs[-1].uri

    @cached_property
    def tiny(self) -> str:
        """The tiny Llama (build/fixtures/tiny-llama)."""
        return self._import_model(fixture_model("tiny-llama"), "tiny")

    @cached_property
    def arith_raw(self) -> str:
        """96 arithmetic chats, as imported (stage raw)."""
        return self._import_rows(arithmetic_rows(96), "arith")

    @cached_property
    def arith(self) -> str:
        """arith_raw prepared with the tiny base's template, 10% held out (exact dedup)."""
        return self._prepare(self.arith_raw, self.tiny, holdout=0.1, dedup=1)

    @cached_property
    def foundation(self) -> str:
        """The committed foundation fixture (pretrained on 314 facts)."""
        return self._import_model(FOUNDATION, "foundation")

    @cached_property
    def style(self) -> str:
        """The style data (120 facts answered in the style) prepared on the foundation, 20% held out."""
        raw = self._import_rows(style_rows(shuffled_facts()[:120]), "style")
        return self._prepare(raw, self.foundation, holdout=0.2, seed=1)

    @cached_property
    def other_facts(self) -> str:
        """40 facts the style data never used (facts.jsonl rows): the general block's probes."""
        return self._import_rows(shuffled_facts()[120:160], "other-facts", "facts.jsonl")

    @cached_property
    def style_training_job(self):
        spec = {"base_model": self.foundation, "dataset": self.style, **self.STYLE_TRAINING}
        return succeeded(self.client, self.client.submit_training(spec, key=f"{self.project}-style"), 900)

    @cached_property
    def style_adapter(self) -> str:
        """The one adapter trained in the test run: LoRA r=8 on the style data (the demo's recipe)."""
        return next(o.uri for o in self.style_training_job.outputs if "/adapter-" in o.uri)

    @cached_property
    def pal(self) -> str:
        """A second style on 96 other facts ("…, pal!"), prepared on the foundation (a second adapter's data)."""
        rows = [{"messages": [m if m["role"] == "user" else {**m, "content": m["content"].replace(", my friend.", ", pal!")}
                              for m in r["messages"]]} for r in style_rows(shuffled_facts()[160:256])]
        return self._prepare(self._import_rows(rows, "pal"), self.foundation, holdout=0.0)

    @cached_property
    def pal_adapter(self) -> str:
        """A second adapter on the foundation (the pal style, the style adapter's recipe): deployments serve two."""
        spec = {"base_model": self.foundation, "dataset": self.pal, **self.STYLE_TRAINING}
        job = succeeded(self.client, self.client.submit_training(spec, key=f"{self.project}-pal"), 900)
        return next(o.uri for o in job.outputs if "/adapter-" in o.uri)

    @cached_property
    def merged_job(self):
        """The seeded adapter merged into the foundation (its own dtype, bf16), checked equal to base + adapter."""
        return succeeded(self.client, self.client.submit_merge(self.foundation, self.style_adapter,
                                                               key=f"{self.project}-merge"), 600)

    @cached_property
    def merged(self) -> str:
        """The foundation with the style adapter merged in: the model artifact later stages start from."""
        return self.merged_job.outputs[-1].uri

    def download_dir(self, artifact: str, dest: Path) -> Path:
        """Every file of an artifact into `dest` (sha256-verified by the download)."""
        for f in self.client.get_artifact(artifact).files:
            self.client.download(artifact, f.path, dest / f.path)
        return dest


@pytest.fixture(scope="session")
def seed(s3, ray_head, tmp_path_factory):
    servers = ServerThread()
    project = f"seed-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("seed")
    settings = service_settings(s3, ray_head, project, work / "cache")
    # 0.5 CPU per training worker: two workers plus the driver fit the 2-CPU test head
    # Serve's HTTP proxy on a free port of 127.0.0.1; replicas of half a CPU (the head has 2)
    from services.core.net import free_port

    client = service_client(servers, settings, *SERVICES, training={"cpus_per_worker": 0.5},
                            serving={"serve_http_port": free_port(), "replica_cpus": 0.5, "startup_timeout_s": 300})
    yield Seed(client, project, work)
    client.close()
    servers.close()


@pytest.fixture(scope="session")
def vllm_endpoint(seed, tmp_path_factory):
    """The foundation base (served as `foundation`) and the seeded style adapter (`style`) on one vLLM server in
    the serve venv, for the whole run, with the tokenizer endpoints lm-eval's remote tokenizer needs."""
    from services.core.vllm import ServerSpec, VLLMServer

    work = tmp_path_factory.mktemp("vllm-endpoint")
    adapter = seed.download_dir(seed.style_adapter, work / "style")
    spec = ServerSpec(model_dir=str(FOUNDATION), served_name="foundation", adapters={"style": str(adapter)},
                      tool_call_parser="hermes", dtype="float32", extra_args=["--enable-tokenizer-info-endpoint"])
    server = VLLMServer(spec, python=str(REPO / ".venvs" / "serve" / "bin" / "python"), log_path=work / "vllm.log")
    server.start()
    print(f"\nshared vLLM server up in {server.start_s:.1f}s at {server.base_url}")
    yield server
    server.stop()


def rpc_error(fn) -> tuple:
    """The status code and details of the gRPC error `fn()` raises (the test fails if it raises none)."""
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def job_events(client, job_id: str) -> list:
    """Every event a job has written so far."""
    return list(client.watch(job_id, follow=False))
