"""Serving against the real stack: deployments on the test run's Ray head as Ray Serve applications, vLLM (serve
venv) in each replica, clients through Serve's HTTP proxy. One deployment (the foundation with two adapters) is
shared by the module's tests, in order: answers per adapter, auth, streaming, hot add while other requests run,
remove, delete."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from services.gen.tunery.v1 import serving_pb2
from tests.session import job_events, rpc_error, succeeded

NAME = "it-serve"
QUESTION = "What is the capital of France?"


def pal_question() -> str:
    """A question of the pal adapter's own training data (the style adapter never saw it)."""
    from tests.session import shuffled_facts

    return shuffled_facts()[160]["question"]


def live_apps(ray_head) -> dict:
    """Serve's applications on the test run's cluster, from the dashboard's REST API."""
    with urllib.request.urlopen(ray_head.address + "/api/serve/applications/", timeout=10) as r:
        return json.loads(r.read()).get("applications") or {}


def replica_of(d: serving_pb2.Deployment) -> str:
    """The replica that answers GET /models (the deployment has one)."""
    from services.serving.replica import REPLICA_HEADER

    request = urllib.request.Request(d.base_url + "/models", headers={"Authorization": f"Bearer {d.api_key}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.headers[REPLICA_HEADER]


def openai_client(d: serving_pb2.Deployment, key: str | None = None):
    import openai

    return openai.OpenAI(base_url=d.base_url, api_key=d.api_key if key is None else key, max_retries=0, timeout=120)


def ask(client, model: str, question: str = QUESTION) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=16, temperature=0)
    return r.choices[0].message.content


@pytest.fixture(scope="module", autouse=True)
def serve_shut_down_after_the_module(ray_head):
    """Serve stopped once this module's deployments are gone: its controller and proxy keep ~7% of a core busy,
    idle, on the 2-core machine for the rest of the run (a later deployment starts it again)."""
    yield
    request = urllib.request.Request(ray_head.address + "/api/serve/applications/", method="DELETE")
    with urllib.request.urlopen(request, timeout=120) as r:
        assert r.status == 200
    assert live_apps(ray_head) == {}


@pytest.fixture(scope="module")
def deployment(seed):
    client = seed.client
    job = client.create_deployment(NAME, seed.foundation, {"style": seed.style_adapter, "pal": seed.pal_adapter},
                                   tool_call_parser="hermes")
    final = succeeded(client, job, 600)
    yield client.get_deployment(NAME), final
    try:
        client.delete_deployment(NAME)
    except grpc.RpcError:
        pass


def test_a_deployment_is_ready_with_the_base_and_every_adapter(seed, ray_head, deployment):
    d, job = deployment
    assert d.state == serving_pb2.DEPLOYMENT_STATE_READY, d.message
    assert list(d.served_models) == ["foundation", "style", "pal"]
    assert d.base_url.endswith(f"/{NAME}/v1") and d.api_key and d.job_id == job.id
    assert live_apps(ray_head)[NAME]["status"] == "RUNNING"
    models = [m.id for m in openai_client(d).models.list().data]
    assert sorted(models) == ["foundation", "pal", "style"]
    assert NAME in [x.name for x in seed.client.list_deployments()]
    # the same request again is the same deployment: its job, nothing new
    again = seed.client.create_deployment(NAME, seed.foundation, {"style": seed.style_adapter,
                                                                  "pal": seed.pal_adapter}, tool_call_parser="hermes")
    assert again.id == job.id


def test_each_model_answers_as_itself(deployment):
    d, _ = deployment
    client = openai_client(d)
    answers = {m: ask(client, m, pal_question()) for m in ("foundation", "style", "pal")}
    assert answers["style"].endswith("my friend."), answers
    assert answers["pal"].endswith("pal!"), answers
    assert "my friend" not in answers["foundation"] and "pal!" not in answers["foundation"], answers
    answers["style"] = ask(client, "style")
    # completions and streaming go through the same proxy
    text = client.completions.create(model="style", prompt="Paris is", max_tokens=4, temperature=0).choices[0].text
    assert isinstance(text, str) and text
    chunks = list(client.chat.completions.create(model="style", messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=16, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and streamed == answers["style"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_reach_the_engine_with_the_parser(deployment):
    """The deployment was made with the hermes parser: `tool_choice="auto"` is accepted (vLLM refuses it with 400
    when no parser is on), and for a named tool choice the parser turns the model's <tool_call> block into an OpenAI
    tool call (vLLM 0.32's hermes parser reads the model's own format; it forces no JSON schema, so the tiny model's
    arguments are JSON but not the function's)."""
    d, _ = deployment
    client = openai_client(d)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    auto = client.chat.completions.create(model="style", messages=messages, tools=[WEATHER], tool_choice="auto",
                                          max_tokens=24, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls"), auto
    assert auto.usage.prompt_tokens > client.chat.completions.create(
        model="style", messages=messages, max_tokens=1).usage.prompt_tokens  # the tools reached the template
    named = client.chat.completions.create(model="style", messages=messages, tools=[WEATHER], max_tokens=48,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    message = named.choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "get_weather" and call.id
    json.loads(call.function.arguments)  # the parser's output is JSON
    assert "<tool_call>" not in (message.content or ""), message  # ... taken out of the text


def test_get_deployment_shows_vllm_figures(seed, deployment):
    """GetDeployment reads one replica's Prometheus metrics: the requests the tests above sent are counted."""
    m = seed.client.get_deployment(NAME).metrics
    assert m.requests >= 4 and m.prompt_tokens > 0 and m.generation_tokens > 0, m
    assert m.running >= 0 and m.waiting >= 0 and 0.0 <= m.kv_cache_usage <= 1.0, m


def cli(seed, tmp_path, *args, stdin: str | None = None, check: bool = True):
    """The `tunery` CLI of a user pointed at this module's servers (addresses and token from the environment)."""
    import os

    from tests.e2e.conftest import tunery

    env = {**os.environ, "TUNERY_HOME": str(tmp_path), "TUNERY_TOKEN": seed.client.token,
           "COLUMNS": "200", **{f"TUNERY_{k.upper()}_ADDR": v for k, v in seed.client.endpoints.items()}}
    return tunery(env, *args, check=check, timeout=600, input=stdin)


def test_the_cli_drives_the_deployment(seed, deployment, tmp_path):
    """tunery serve list | get | create (the same spec: the same deployment) | adapters add | chat | adapters
    remove, and a clear error for a deployment that does not exist."""
    d, job = deployment
    [listed] = [x for x in json.loads(cli(seed, tmp_path, "--json", "serve", "list").stdout) if x["name"] == NAME]
    assert listed["state"] == "DEPLOYMENT_STATE_READY" and listed["base_url"] == d.base_url
    shown = cli(seed, tmp_path, "serve", "get", NAME).stdout
    assert "READY" in shown and f"export OPENAI_BASE_URL={d.base_url}" in shown, shown
    requests = int(shown.split("requests ", 1)[1].split()[0])
    assert requests >= 4, shown
    deploys = len(list(seed.client.list_jobs(kind="serving.deploy")))
    again = cli(seed, tmp_path, "serve", "create", seed.foundation, "--name", NAME, "--adapter",
                f"style={seed.style_adapter}", "--adapter", f"pal={seed.pal_adapter}", "--tool-call-parser",
                "hermes").stdout
    assert "READY" in again and d.base_url in again, again
    assert len(list(seed.client.list_jobs(kind="serving.deploy"))) == deploys  # the same deployment, no new job
    cli(seed, tmp_path, "serve", "adapters", "add", NAME, f"cli={seed.style_adapter}")
    assert "cli" in seed.client.get_deployment(NAME).served_models
    chat = cli(seed, tmp_path, "serve", "chat", NAME, "--model", "cli", "--max-tokens", "16",
               "--temperature", "0", stdin=QUESTION + "\n\n").stdout
    assert "chatting with cli" in chat and ask(openai_client(d), "style") in chat, chat
    cli(seed, tmp_path, "serve", "adapters", "remove", NAME, "cli")
    assert "cli" not in seed.client.get_deployment(NAME).served_models
    missing = cli(seed, tmp_path, "serve", "get", "nobody", check=False)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr, missing.stderr


def test_the_evaluation_service_targets_the_deployment(seed, deployment):
    """An eval job against the live deployment (promptfoo's openai provider through Serve's proxy, with the key):
    no engine of its own, the deployment's engine, precision and adapter in the report's controls."""
    from services.gen.tunery.v1 import common_pb2 as pb
    from services.gen.tunery.v1 import evaluation_pb2 as ev
    from services.sdk.client import ref

    client = seed.client
    target = ev.EvalTarget(deployment=ev.DeploymentTarget(name=NAME, model="style"))
    suite = ev.EvalSuite(heldout_dataset=ref(seed.style), heldout_assertion=ev.ASSERTION_TYPE_CONTAINS,
                         max_tests_per_block=6)
    job = succeeded(client, client.submit_eval(target, suite, name="it-serve-style"), 600)
    report = client.eval_report(job.outputs[-1].uri)
    c = report.controls
    assert (c.deployment, c.served_model, c.adapter, c.engine) == (NAME, "style", seed.style_adapter, "vllm")
    assert c.engine_version and c.precision_detail.startswith("float32") and c.chat_template_sha256
    [target_block] = [b for b in report.blocks if b.block == ev.EVAL_BLOCK_TARGET]
    assert target_block.total == 6 and target_block.passed >= 4, target_block  # the style, through the proxy
    texts = [e.text for e in job_events(client, job.id)]
    assert not any("vLLM server up" in t for t in texts), texts
    # refused up front: a model the deployment does not serve, a deployment that does not exist
    for t, want in ((ev.DeploymentTarget(name=NAME, model="nope"), grpc.StatusCode.NOT_FOUND),
                    (ev.DeploymentTarget(name="nobody"), grpc.StatusCode.NOT_FOUND)):
        code, _ = rpc_error(lambda t=t: client.submit_eval(ev.EvalTarget(deployment=t), suite))
        assert code == want
    assert pb.JOB_STATE_SUCCEEDED == job.state


def test_requests_without_the_key_get_401(deployment):
    import openai

    d, _ = deployment
    with pytest.raises(openai.AuthenticationError):
        ask(openai_client(d, key="wrong-key"), "style")
    request = urllib.request.Request(d.base_url + "/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 401


def test_an_adapter_added_while_the_others_keep_answering_then_removed(seed, deployment):
    import openai

    d, _ = deployment
    client = openai_client(d)
    stop, failures, answered = threading.Event(), [], []

    def load():
        c = openai_client(d)
        while not stop.is_set():
            try:
                answered.append(ask(c, "pal"))
            except Exception as e:  # noqa: BLE001 (every failure is reported)
                failures.append(repr(e))

    before = replica_of(d)
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        job = succeeded(seed.client, seed.client.add_adapter(NAME, "style2", seed.style_adapter), 300)
        assert seed.client.get_deployment(NAME).state == serving_pb2.DEPLOYMENT_STATE_READY
        assert ask(client, "style2") == ask(client, "style")
        time.sleep(1)
    finally:
        stop.set()
        worker.join(60)
    assert not failures and len(answered) >= 2, (failures, len(answered))
    assert replica_of(d) == before  # reconfigured in place: the same replica, never restarted
    assert list(seed.client.get_deployment(NAME).served_models) == ["foundation", "style", "pal", "style2"]
    assert job.id == seed.client.get_deployment(NAME).job_id

    succeeded(seed.client, seed.client.remove_adapter(NAME, "pal"), 300)
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "pal")
    assert "pal" in str(e.value)
    assert sorted(m.id for m in client.models.list().data) == ["foundation", "style", "style2"]
    code, details = rpc_error(lambda: seed.client.remove_adapter(NAME, "pal"))
    assert code == grpc.StatusCode.NOT_FOUND and "style2" in details


def test_refusals_have_their_status_codes(seed, deployment):
    client = seed.client
    code, details = rpc_error(lambda: client.create_deployment(NAME, seed.foundation))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "delete it first" in details
    cases = [
        (lambda: client.create_deployment("x-other-base", seed.merged, {"style": seed.style_adapter}),
         grpc.StatusCode.FAILED_PRECONDITION, "trained on"),
        (lambda: client.create_deployment("x-rank", seed.foundation, {"style": seed.style_adapter}, max_lora_rank=1),
         grpc.StatusCode.FAILED_PRECONDITION, "max_lora_rank"),
        (lambda: client.create_deployment("x-parser", seed.foundation, tool_call_parser="nope"),
         grpc.StatusCode.INVALID_ARGUMENT, "tool-call parser"),
        (lambda: client.create_deployment("x-names", seed.foundation, {"foundation": seed.style_adapter}),
         grpc.StatusCode.INVALID_ARGUMENT, "own name"),
        (lambda: client.create_deployment("x-loras", seed.foundation, {"a": seed.style_adapter,
                                                                       "b": seed.pal_adapter}, max_loras=1),
         grpc.StatusCode.INVALID_ARGUMENT, "max_loras"),
        (lambda: client.get_deployment("nobody"), grpc.StatusCode.NOT_FOUND, "no deployment"),
        (lambda: client.add_adapter("nobody", "a", seed.style_adapter), grpc.StatusCode.NOT_FOUND, "no deployment"),
        (lambda: client.add_adapter(NAME, "style", seed.style_adapter), grpc.StatusCode.ALREADY_EXISTS, "remove it"),
    ]
    for call, want, words in cases:
        code, details = rpc_error(call)
        assert code == want and words in details, (want, code, details)
    names = {x.name for x in client.list_deployments()}
    assert not names & {"x-other-base", "x-rank", "x-parser", "x-names", "x-loras"}


def test_delete_leaves_nothing_running(seed, ray_head, deployment):
    d = seed.client.delete_deployment(NAME)
    assert d.state == serving_pb2.DEPLOYMENT_STATE_STOPPED
    assert NAME not in live_apps(ray_head)
    with pytest.raises(OSError):
        urllib.request.urlopen(urllib.request.Request(d.base_url + "/models",
                                                      headers={"Authorization": f"Bearer {d.api_key}"}), timeout=10)
    assert seed.client.get_deployment(NAME).state == serving_pb2.DEPLOYMENT_STATE_STOPPED


def test_two_replicas_answer_behind_one_url(seed):
    from services.serving.replica import REPLICA_HEADER

    client = seed.client
    succeeded(client, client.create_deployment("it-replicas", seed.tiny, replicas=2, max_model_len=256), 600)
    try:
        d = client.get_deployment("it-replicas")
        replicas = set()
        for i in range(24):
            body = json.dumps({"model": "tiny", "prompt": f"{i}", "max_tokens": 2}).encode()
            request = urllib.request.Request(d.base_url + "/completions", data=body, headers={
                "Authorization": f"Bearer {d.api_key}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                assert json.loads(r.read())["choices"]
                replicas.add(r.headers[REPLICA_HEADER])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas
    finally:
        client.delete_deployment("it-replicas")


def running_replicas(ray_head, name: str) -> int:
    deployment = live_apps(ray_head)[name]["deployments"]["vllm"]
    return sum(1 for r in deployment.get("replicas") or [] if r.get("state") == "RUNNING")


def test_scale_to_zero_and_back_on_the_next_request(seed, ray_head):
    from tests.servers import wait_for

    client = seed.client
    succeeded(client, client.create_deployment("it-zero", seed.tiny, scale_to_zero=True, idle_timeout_s=5,
                                               max_model_len=256), 600)
    try:
        d = client.get_deployment("it-zero")
        assert d.state == serving_pb2.DEPLOYMENT_STATE_READY and running_replicas(ray_head, "it-zero") == 0
        body = json.dumps({"model": "tiny", "prompt": "1", "max_tokens": 2}).encode()
        request = urllib.request.Request(d.base_url + "/completions", data=body, headers={
            "Authorization": f"Bearer {d.api_key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:  # Serve holds it while a replica starts
            assert json.loads(r.read())["choices"]
        assert running_replicas(ray_head, "it-zero") == 1
        wait_for(lambda: running_replicas(ray_head, "it-zero") == 0, 180, interval=2, what="scaled to zero")
    finally:
        client.delete_deployment("it-zero")


def test_a_replica_no_node_can_place_stays_starting_with_the_reason(seed):
    """A deployment asking for a GPU the cluster lacks: STARTING, with Serve's reason naming what it waits for (as
    a queued job would); deleting it stops its job too."""
    from services.gen.tunery.v1 import common_pb2 as pb
    from tests.servers import wait_for

    client = seed.client
    options = pb.SubmitOptions(resources=pb.Resources(cpus=0.5, gpus=1))
    job = client.create_deployment("it-gpu", seed.tiny, options=options)
    try:
        def waiting():
            d = client.get_deployment("it-gpu")
            assert d.state == serving_pb2.DEPLOYMENT_STATE_STARTING, (d.state, d.message)
            return "GPU" in d.message and d

        d = wait_for(waiting, 120, interval=2, what="Serve's reason")
        assert "scheduled" in d.message or "resources" in d.message.lower(), d.message
    finally:
        assert client.delete_deployment("it-gpu").state == serving_pb2.DEPLOYMENT_STATE_STOPPED
    final = client.wait(job.id, 60)
    assert final.state == pb.JOB_STATE_CANCELLED, final.state_reason
