"""A gRPC server that answers health checks and nothing else: the cost of
Python gRPC itself on this machine, for the benchmarks' bounds.
Usage: python tests/load/floor_server.py PORT"""

from __future__ import annotations

import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio


async def serve(port: int) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
