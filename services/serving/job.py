"""The serving job: `python -m services.serving.job <spec-uri>` (control environment: it drives Ray Serve, the
replicas start the engine).

serving.deploy: setup (Serve on the cluster, the application from the spec) -> run (Serve deploys it; the job
follows its status until every replica is up, a replica fails, or the startup timeout passes) -> save (the record:
READY with the base_url, or FAILED with Serve's reason). The same job changes the adapters of a running deployment
(the spec differs only in `user_config`, so Serve reconfigures its replicas in place) and deletes one.
"""

from __future__ import annotations

import hashlib
import json
import time

from services.core.jobctx import JobContext, run_job
from services.serving.records import DeploymentRecords
from services.serving.spec import DeploymentSpec, ServeJobSpec

INGRESS = "vllm"
JOB_OWN_ENV = ("TUNERY_JOB_ID", "RAY_JOB_STOP_WAIT_TIME_S")
POLL_S = 1.0


def scale_to_zero(d: DeploymentSpec) -> dict:
    """Serve's autoscaling for scale_to_zero: no replica while idle, one on the first request (Serve's proxy holds
    it until the replica is up), up to `replicas` under load, the last one stopped after `idle_timeout_s` idle."""
    return {"min_replicas": 0, "initial_replicas": 0, "max_replicas": d.replicas, "target_ongoing_requests": 8,
            "upscale_delay_s": 0.0, "downscale_delay_s": 30.0, "downscale_to_zero_delay_s": d.idle_timeout_s}


def replica_config(spec: ServeJobSpec, api_key: str) -> dict:
    """The replica's fixed part (the deployment's init argument): changing any of it restarts the replicas."""
    d = spec.deployment
    from services.core.vllm import CPU_KV_CACHE_BYTES, GPU_MEMORY_UTILIZATION, lora_rank_bucket

    return {"name": d.name, "model": d.model.model_dump(), "served_name": d.served_name,
            "max_loras": d.max_loras, "max_lora_rank": lora_rank_bucket(d.max_lora_rank or 16),
            "tool_call_parser": d.tool_call_parser, "dtype": d.engine_dtype,
            "max_model_len": d.max_model_len, "device": d.device,
            "kv_cache_bytes": d.kv_cache_bytes or CPU_KV_CACHE_BYTES,
            "gpu_memory_utilization": d.gpu_memory_utilization or GPU_MEMORY_UTILIZATION,
            "tensor_parallel_size": d.tensor_parallel_size, "api_key": api_key,
            "startup_timeout_s": spec.startup_timeout_s}


def replica_runtime_env() -> dict:
    """The replicas' runtime env: this job's, less what is this job's own (its id, its stop grace). Serve would
    give the replicas the job's runtime env, which differs per job, and a changed runtime env restarts them; the
    same env for every job of a deployment keeps an adapter change the in-place reconfigure it should be."""
    import ray

    env = dict((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {})
    for own in JOB_OWN_ENV:
        env.pop(own, None)
    return {"env_vars": dict(sorted(env.items()))}


def user_config(d: DeploymentSpec) -> dict:
    """What may change without a restart: the adapters (name -> ref)."""
    return {"adapters": {a.name: a.adapter.model_dump() for a in d.adapters}}


def application(spec: ServeJobSpec, api_key: str):
    from ray import serve

    from services.serving.replica import VLLMReplica

    d = spec.deployment
    config = replica_config(spec, api_key)
    version = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    gpus = d.tensor_parallel_size if d.device == "cuda" else 0
    actor = {"num_cpus": d.cpus_per_replica, "num_gpus": gpus, "runtime_env": replica_runtime_env()}
    if d.replica_resources:  # on serve-role nodes (their image has vLLM), as the role's jobs are
        actor["resources"] = d.replica_resources
    scaling = {"autoscaling_config": scale_to_zero(d)} if d.scale_to_zero else {"num_replicas": d.replicas}
    deployment = serve.deployment(
        VLLMReplica, name=INGRESS, user_config=user_config(d),
        ray_actor_options=actor,
        max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20, **scaling)
    # Serve gives an imperatively deployed class a random version, so every serve.run would restart its replicas;
    # with the version of the fixed config, a change of user_config only (the adapters) is the lightweight update
    # that calls reconfigure on the running replicas. (`version` is internal in Ray 2.60's options.)
    return deployment.options(version=version, _internal=True).bind(config)


def app_status(name: str):
    """(status, message) of the application in Serve: RUNNING, DEPLOYING, DEPLOY_FAILED, ... or None."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return None
    messages = [app.message] + [f"{dn}: {ds.message}" for dn, ds in app.deployments.items() if ds.message]
    return str(app.status.value if hasattr(app.status, "value") else app.status), "; ".join(m for m in messages if m)


def connect(spec: ServeJobSpec) -> str:
    """Serve on the cluster (started with the spec's HTTP options if it is not running yet); the deployment's
    base_url from where Serve's proxy really listens (a running Serve keeps its own options)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    serve.start(http_options={"host": spec.http_host, "port": spec.http_port}, proxy_location="HeadOnly")
    if spec.public_url:
        return spec.base_url
    http = _get_global_client().http_config  # Ray 2.60: the running proxy's HTTPOptions (no public getter)
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{host}:{http.port}/{spec.deployment.name}/v1"


def deploy(ctx: JobContext, spec: ServeJobSpec) -> None:
    from ray import serve
    from ray.serve.api import RunTarget

    records = DeploymentRecords(ctx.artifacts)
    d = spec.deployment
    record = records.get(d.name)
    if record is None:  # the service writes it (with the key) before it submits
        ctx.fail(f"deployment {d.name} has no record in the store; create it again")
    # setup
    base_url = connect(spec)
    app = application(spec, record.api_key)
    what = "changing the adapters of" if spec.action == "adapters" else "deploying"
    ctx.event(f"{what} {d.name}: {d.served_name} + {len(d.adapters)} adapter(s) "
              f"({', '.join(d.adapter_names()) or 'none'}), {d.replicas} replica(s){' (scale to zero when idle)' if d.scale_to_zero else ''}")
    # run
    serve.run_many([RunTarget(target=app, name=d.name, route_prefix=f"/{d.name}")],
                   wait_for_applications_running=False)
    status, message = wait_running(ctx, spec)
    # save
    record = record.model_copy(update={"spec": d, "job_id": ctx.job_id, "updated_at": time.time(),
                                       "base_url": base_url})
    if status != "RUNNING":
        records.put(record.model_copy(update={"state": "FAILED", "message": message}))
        ctx.fail(f"{d.name} did not start: {message}")
    records.put(record.model_copy(update={"state": "READY", "message": "", "controls": controls(ctx, d)}))
    ctx.event(f"{d.name} is READY at {base_url}; models: {', '.join(d.served_models())}")


def controls(ctx: JobContext, d: DeploymentSpec) -> dict:
    """The engine's controls as an eval job's report records them for its own engine, so a report of this
    deployment compares with one of the same model evaluated the usual way (services.evaluation.job)."""
    from services.core.settings import RaySettings
    from services.core.vllm import engine_info

    model = ctx.artifacts.resolve(d.model)
    names = {f.path for f in model.files}
    wanted = [p for p in ("chat_template.jinja", "tokenizer_config.json") if p in names]
    model_dir = ctx.artifacts.materialize(model.ref(), ctx.settings.cache_dir, paths=wanted)
    template = (model_dir / "chat_template.jinja").read_text() if "chat_template.jinja" in wanted else (
        json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template", "") or ""
        if "tokenizer_config.json" in wanted else "")
    info = engine_info(RaySettings().python_for("serve"))
    return {"engine": info["engine"], "engine_version": info["version"],
            "precision": f"{d.engine_dtype} ({model.metadata.get('dtype', '?')} weights)",
            "quantization": d.quantization, "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "tool_call_parser": d.tool_call_parser, "lora_enabled": True}


def wait_running(ctx: JobContext, spec: ServeJobSpec) -> tuple[str, str]:
    """Follow the application until RUNNING or failed; every new status message is an event."""
    name = spec.deployment.name
    deadline = time.monotonic() + spec.startup_timeout_s
    last = None
    while True:
        status, message = app_status(name) or ("NOT_STARTED", "")
        if (status, message) != last:
            ctx.event(f"Serve: {name} {status}{': ' + message if message else ''}")
            last = status, message
        if status == "RUNNING":
            return status, message
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            return status, message or status
        if time.monotonic() > deadline:
            return "TIMEOUT", f"not RUNNING after {spec.startup_timeout_s:.0f} s ({status}: {message})"
        ctx.check_cancelled()
        time.sleep(POLL_S)


def delete(ctx: JobContext, spec: ServeJobSpec) -> None:
    from ray import serve

    records = DeploymentRecords(ctx.artifacts)
    name = spec.deployment.name
    connect(spec)
    serve.delete(name, _blocking=True)
    record = records.get(name)
    if record is not None:
        records.put(record.model_copy(update={"state": "STOPPED", "message": "deleted", "job_id": ctx.job_id,
                                              "updated_at": time.time()}))
    ctx.event(f"{name} deleted: its replicas and engines are stopped")


def main() -> None:
    run_job("serving", {"serving.deploy": (deploy, ServeJobSpec), "serving.adapters": (deploy, ServeJobSpec),
                        "serving.delete": (delete, ServeJobSpec)})


if __name__ == "__main__":
    main()
