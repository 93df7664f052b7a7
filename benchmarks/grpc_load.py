"""A small closed-loop gRPC load generator for serve_bench.py: N concurrent callers send prepared
ModelInferRequest messages (serialized once) for a fixed time; prints one JSON line with requests/s,
p50/p99 in ms and the error count. Python's grpc.aio client costs CPU of its own, so on a small machine
this measures the server and the client together; serve_bench says so beside the figure.

    python benchmarks/grpc_load.py 127.0.0.1:8001 REQUESTS_DIR --connections 16 --duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import grpc
import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def caller(stub, bodies: list[bytes], start: int, until: float, latencies: list[float], errors: list[str]) -> None:
    index = start
    while time.perf_counter() < until:
        began = time.perf_counter()
        try:
            await stub(bodies[index % len(bodies)])
            latencies.append(time.perf_counter() - began)
        except grpc.aio.AioRpcError as exc:
            errors.append(exc.code().name)
        index += 1


async def run(address: str, bodies: list[bytes], connections: int, duration_s: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)  # raw bytes both ways
        await stub(bodies[0])  # connect before the clock starts
        started = time.perf_counter()
        until = started + duration_s
        await asyncio.gather(*(caller(stub, bodies, i, until, latencies, errors) for i in range(connections)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies or [0.0]) * 1000
    return {"requests": len(latencies), "requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors), "error_sample": errors[:1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address")
    parser.add_argument("requests", type=Path, help="folder of N.pb files (serialized ModelInferRequest)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    bodies = [p.read_bytes() for p in sorted(args.requests.glob("*.pb"))]
    print(json.dumps(asyncio.run(run(args.address, bodies, args.connections, args.duration))))


if __name__ == "__main__":
    main()
