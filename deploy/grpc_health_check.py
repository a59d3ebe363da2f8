"""Container health check: ask the gRPC health service (grpc.health.v1) whether the server is SERVING.

Exit 0 when SERVING, 1 otherwise (NOT_SERVING while models load and warm up, connection refused, timeout).
Used by the Dockerfile's HEALTHCHECK and docker-compose; Kubernetes uses its native gRPC probe instead.

    python deploy/grpc_health_check.py [--port 50051] [--service diffserve.v1.Diffserve] [--timeout 3]

The port defaults to $DIFFSERVE_PORT, else 50051. Health stays open when the server requires a bearer token.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout: float) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DIFFSERVE_PORT", "50051")))
    parser.add_argument("--service", default="", help='"" = the whole server (default)')
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    return 0 if check(f"{args.host}:{args.port}", args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
