"""The gRPC server's life: started with the app (when `server.grpc_port` is set), stopped with it.

Health through the standard grpc.health.v1 service (SERVING once started, NOT_SERVING while draining, like
/readyz), server reflection on, and TLS with the HTTP side's certificate when it has one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from starlette.types import ASGIApp

from strata.api.grpc_api.bridge import Bridge
from strata.api.grpc_api.services import Chat, Models, Runs, Sessions
from strata.config import ServerConfig
from strata.v1 import strata_pb2 as pb
from strata.v1 import strata_pb2_grpc as rpc

log = structlog.get_logger("strata.grpc")
SERVICES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Chat", "Models", "Runs", "Sessions"))
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # above Strata's HTTP body limit, which the routes enforce themselves


@contextlib.asynccontextmanager
async def grpc_server(app: ASGIApp, config: ServerConfig, max_body_bytes: int) -> AsyncIterator[None]:
    if config.grpc_port is None:
        yield
        return
    size = max(max_body_bytes, 1024) + 64 * 1024
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", min(size, MAX_MESSAGE_BYTES)),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
    )  # fmt: skip
    bridge = Bridge(app)
    rpc.add_ChatServicer_to_server(Chat(bridge), server)
    rpc.add_ModelsServicer_to_server(Models(bridge), server)
    rpc.add_RunsServicer_to_server(Runs(bridge), server)
    rpc.add_SessionsServicer_to_server(Sessions(bridge), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.grpc_port}"
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())]
        )
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    await server.start()
    for name in ("", *SERVICES):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("grpc listening", address=address, tls=config.tls_cert_file is not None)
    try:
        yield
    finally:
        for name in ("", *SERVICES):
            await checks.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=config.shutdown_grace_s)
