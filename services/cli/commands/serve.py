"""`tunery serve create | list | get | delete | adapters add|remove | chat`: OpenAI-compatible deployments (vLLM on
Ray Serve), several LoRA adapters on one base."""

from __future__ import annotations

import typer
from rich.table import Table

from services.cli.console import OPTS, client, emit, err, follow, out, rpc, to_dict
from services.gen.tunery.v1 import serving_pb2

serve_app = typer.Typer(help="Serving: OpenAI-compatible deployments, LoRA adapters hot-swapped on one base.",
                        no_args_is_help=True)
adapters_app = typer.Typer(help="Load or unload an adapter on a READY deployment (no restart).",
                           no_args_is_help=True)
serve_app.add_typer(adapters_app, name="adapters")


def state(d: serving_pb2.Deployment) -> str:
    return serving_pb2.DeploymentState.Name(d.state).removeprefix("DEPLOYMENT_STATE_")


def parse_adapters(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, artifact = item.partition("=")
        if not sep or not name or not artifact:
            err.print(f"--adapter {item!r}: expected NAME=ADAPTER, e.g. --adapter support=adapter-0123456789ab")
            raise typer.Exit(2)
        adapters[name] = artifact
    return adapters


def usage(d: serving_pb2.Deployment) -> str:
    model = d.served_models[-1] if d.served_models else "MODEL"
    return (f"  export OPENAI_BASE_URL={d.base_url} OPENAI_API_KEY={d.api_key}\n"
            f"  curl $OPENAI_BASE_URL/chat/completions -H \"Authorization: Bearer $OPENAI_API_KEY\" "
            f"-H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"messages\": "
            f"[{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n"
            f"  python: openai.OpenAI()  (reads both variables); model= one of {', '.join(d.served_models)}")


def show(d: serving_pb2.Deployment) -> None:
    if OPTS["json"]:
        emit(to_dict(d))
        return
    out.print(f"[bold]{d.name}[/bold]  {state(d)}{'  ' + d.message if d.message else ''}")
    out.print(f"  base_url {d.base_url}   models {', '.join(d.served_models)}   replicas {d.spec.replicas}"
              f"{' (scale to zero)' if d.spec.scale_to_zero else ''}")
    m = d.metrics
    if d.state == serving_pb2.DEPLOYMENT_STATE_READY:
        out.print(f"  requests {m.requests:.0f}   prompt tokens {m.prompt_tokens:.0f}   generated tokens "
                  f"{m.generation_tokens:.0f}   running {m.running:.0f}   waiting {m.waiting:.0f}   "
                  f"KV cache {m.kv_cache_usage:.0%}  (one replica's vLLM metrics: {d.base_url[:-3]}/metrics)")
        out.print(usage(d))


@serve_app.command("create")
def create(
    model: str = typer.Argument(..., help="A model artifact: a base, a merged or a quantized model."),
    name: str = typer.Option("", "--name", help="The deployment's name (its URL path); default the model's."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=ADAPTER, repeatable: served as model NAME."),
    replicas: int = typer.Option(1, "--replicas"),
    scale_to_zero: bool = typer.Option(False, "--scale-to-zero", help="No replica while idle; one on demand."),
    max_model_len: int = typer.Option(0, "--max-model-len"),
    tool_call_parser: str = typer.Option("", "--tool-call-parser", help="e.g. hermes (enables tool calls)."),
    max_loras: int = typer.Option(0, "--max-loras", help="Adapters at once (default max(4, given))."),
    max_lora_rank: int = typer.Option(0, "--max-lora-rank", help="Largest adapter rank (default ≥ 16)."),
    key: str = typer.Option("", "--key"),
    watch: bool = typer.Option(True),
) -> None:
    """Deploy a model with its adapters; follows the start (Serve's status, the engine's load) until READY."""
    c = client()
    job = rpc(c.create_deployment, name, model, parse_adapters(adapter), replicas=replicas,
              scale_to_zero=scale_to_zero, max_model_len=max_model_len, tool_call_parser=tool_call_parser,
              max_loras=max_loras, max_lora_rank=max_lora_rank, key=key)
    if OPTS["json"] and watch:  # one JSON document: the deployment once its job ended
        rpc(c.wait, job.id, 1800)
    else:
        follow(c, job, watch)
    if watch:
        show(rpc(c.get_deployment, job.spec["deployment"]["name"] if "deployment" in job.spec else name))


@serve_app.command("list")
def list_() -> None:
    """Deployments of the project, with their state and URL."""
    deployments = list(rpc(lambda: list(client().list_deployments())))
    if OPTS["json"]:
        emit([to_dict(d) for d in deployments])
        return
    table = Table("name", "state", "models", "replicas", "base_url")
    for d in deployments:
        table.add_row(d.name, state(d), ", ".join(d.served_models), str(d.spec.replicas), d.base_url)
    out.print(table)


@serve_app.command("get")
def get(name: str) -> None:
    """One deployment: state, URL, models, vLLM's figures (requests, tokens, queue, KV cache), how to call it."""
    show(rpc(client().get_deployment, name))


@serve_app.command("delete")
def delete(name: str) -> None:
    """Stop every replica and engine of a deployment."""
    show(rpc(client().delete_deployment, name))


@adapters_app.command("add")
def adapters_add(deployment: str, adapter: str = typer.Argument(..., help="NAME=ADAPTER"),
                 watch: bool = typer.Option(True)) -> None:
    """Load an adapter into the running engines; the other models keep answering."""
    [(name, artifact)] = parse_adapters([adapter]).items()
    c = client()
    follow(c, rpc(c.add_adapter, deployment, name, artifact), watch)


@adapters_app.command("remove")
def adapters_remove(deployment: str, name: str, watch: bool = typer.Option(True)) -> None:
    """Unload an adapter; a request naming it then gets 404."""
    c = client()
    follow(c, rpc(c.remove_adapter, deployment, name), watch)


@serve_app.command("chat")
def chat(name: str, model: str = typer.Option("", "--model", help="The base or an adapter (default the last)."),
         max_tokens: int = typer.Option(256, "--max-tokens"),
         temperature: float = typer.Option(None, "--temperature", help="Default: the server's (vLLM's 1.0).")) -> None:
    """A small REPL against a deployment (streaming); an empty line or Ctrl-D ends it."""
    import openai

    d = rpc(client().get_deployment, name)
    if d.state != serving_pb2.DEPLOYMENT_STATE_READY:
        err.print(f"{name} is {state(d)}{': ' + d.message if d.message else ''}")
        raise typer.Exit(1)
    model = model or d.served_models[-1]
    api = openai.OpenAI(base_url=d.base_url, api_key=d.api_key)
    messages: list[dict] = []
    out.print(f"chatting with {model} on {name} (empty line to stop)")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        reply = ""
        try:
            sampling = {} if temperature is None else {"temperature": temperature}
            for chunk in api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                     stream=True, **sampling):
                piece = chunk.choices[0].delta.content if chunk.choices else ""
                if piece:
                    reply += piece
                    out.print(piece, end="", markup=False, highlight=False)
        except openai.APIError as e:
            err.print(f"[red]{type(e).__name__}[/red]: {e}")
            messages.pop()
            continue
        out.print()
        messages.append({"role": "assistant", "content": reply})
