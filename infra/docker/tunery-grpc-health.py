#!/opt/venv/bin/python -I
"""tunery-grpc-health PORT [SERVICE]: exit 0 when 127.0.0.1:PORT reports SERVING for SERVICE ("" = overall).

Used by infra/compose.yaml healthchecks (Kubernetes uses its native `grpc:` probes). Uses the grpcio and
grpcio-health-checking already pinned in requirements/control.txt, so the image needs no extra binary.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    port, service = argv[1], argv[2] if len(argv) == 3 else ""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3.0
            )
    except grpc.RpcError as e:
        print(f"health check on :{port} failed: {e.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
