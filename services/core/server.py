"""The gRPC server factory: health, reflection, bearer-token auth, one error interceptor, graceful shutdown.

    server, port = await create_server(settings, [Registration(add_fn, servicer, full_name)], readiness=[...])
    await serve_until_signalled(server, settings)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from services.core.convert import unknown_enums
from services.core.errors import TuneryError, check
from services.core.settings import ServiceSettings

log = logging.getLogger("tunery.server")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Liveness: SERVING while the process can answer, whatever Ray and the store do (readiness is "" and the services).
LIVENESS = "tunery.liveness"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


@dataclass
class Registration:
    add: Callable[[object, grpc.aio.Server], None]   # the generated add_XServicer_to_server
    servicer: object
    full_name: str                                    # e.g. tunery.v1.RegistryService


def _status(err: TuneryError) -> grpc.Status:
    code = getattr(code_pb2, err.code, code_pb2.INTERNAL)
    details = []
    if err.violations:
        br = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations
        ])
        detail = any_pb2.Any()
        detail.Pack(br)
        details.append(detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=err.message, details=details))


def check_enums(request) -> None:
    """Every RPC refuses enum numbers its protos do not define, naming the fields (before the servicer runs)."""
    check(unknown_enums(request))


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    async def on_error(e: Exception, context) -> None:
        if isinstance(e, TuneryError):
            st = _status(e)
            log.info("%s -> %s: %s", method, e.code, e.message, extra={"rpc": method, "code": e.code})
            await context.abort(st.code, st.details, trailing_metadata=st.trailing_metadata)
        log.exception("%s crashed", method, extra={"rpc": method})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(e).__name__}; see the server log")

    def mapped(inner, check_request: bool):
        async def handle(request, context):
            try:
                if check_request:
                    check_enums(request)
                return await inner(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as e:
                await on_error(e, context)

        return handle

    io = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(mapped(handler.unary_unary, True), **io)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request, context):
            try:
                check_enums(request)
                async for item in inner_stream(request, context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as e:
                await on_error(e, context)

        return grpc.unary_stream_rpc_method_handler(stream, **io)
    if handler.stream_unary is not None:  # an upload: the servicer checks each message's enums as it reads them
        return grpc.stream_unary_rpc_method_handler(mapped(handler.stream_unary, False), **io)
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps typed domain errors to their status codes (with BadRequest field details); anything else is INTERNAL."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith((HEALTH_PREFIX, *REFLECTION_PREFIXES)):
            return handler
        return _wrap(handler, details.method)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens: `authorization: Bearer <token>`. Health and reflection are exempt."""

    def __init__(self, tokens: set[str]):
        self.tokens = [t.encode() for t in tokens]

    async def intercept_service(self, continuation, details):
        if details.method.startswith((HEALTH_PREFIX, *REFLECTION_PREFIXES)):
            return await continuation(details)
        md = dict(details.invocation_metadata or ())
        auth = md.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(token.encode(), t) for t in self.tokens):
            return await continuation(details)
        why = "missing bearer token" if not auth else "invalid bearer token"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{why}: send 'authorization: Bearer <token>' (tunery reads TUNERY_TOKEN or ~/.tunery/token)")

        handler = await continuation(details)
        if handler is not None and handler.unary_stream is not None:
            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover

            return grpc.unary_stream_rpc_method_handler(deny_stream)
        if handler is not None and handler.stream_unary is not None:  # refused before a byte of an upload is read
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


async def _watch_readiness(health_servicer, names: list[str], checks: Sequence[Callable[[], None]]) -> None:
    """NOT_SERVING until every check passes; re-checked every few seconds so an outage shows."""
    serving = None
    while True:
        try:
            for check in checks:
                await asyncio.to_thread(check)
            ok = True
        except Exception as e:
            ok = False
            if serving is not False:
                log.warning("not ready: %s", e)
        if ok != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ["", *names]:
                await health_servicer.set(name, status)
            serving = ok
            log.info("health: %s", "SERVING" if ok else "NOT_SERVING")
        await asyncio.sleep(5.0 if ok else 0.5)


async def create_server(settings: ServiceSettings, registrations: Sequence[Registration],
                        readiness: Sequence[Callable[[], None]] = ()) -> tuple[grpc.aio.Server, int]:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    tokens = settings.tokens()
    if tokens:
        interceptors.append(AuthInterceptor(tokens))
    else:
        log.warning("auth is disabled: no TUNERY_AUTH_TOKENS and no token file")
    interceptors.append(ErrorInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [r.full_name for r in registrations]
    for r in registrations:
        r.add(r.servicer, server)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {settings.host}:{settings.port}")
    await server.start()
    server._tunery_health = health_servicer  # type: ignore[attr-defined]
    server._tunery_ready = asyncio.create_task(_watch_readiness(health_servicer, names, readiness))  # type: ignore[attr-defined]
    log.info("serving %s on %s:%d", ", ".join(names), settings.host, port)
    return server, port


async def stop_server(server: grpc.aio.Server, grace: float) -> None:
    """Graceful shutdown: report NOT_SERVING, stop taking new calls, let calls in flight finish for `grace`."""
    task = getattr(server, "_tunery_ready", None)
    if task:
        task.cancel()
    hs = getattr(server, "_tunery_health", None)
    if hs is not None:
        await hs.enter_graceful_shutdown()
    await server.stop(grace)


async def serve_until_signalled(servers: Sequence[grpc.aio.Server], grace: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: shutting down (grace %.0fs)", grace)
    await asyncio.gather(*(stop_server(s, grace) for s in servers))

