"""What Ray costs on this machine (issue 8), side by side with the local paths:

1. batch jobs: rows/s of the in-process engine in a plain loop, the local job and the Ray Data job on the
   same 1M-row Parquet table (batch_bench.py's MLP and table), Ray's start-up and first chunk apart from
   its steady rows/s;
2. serving: requests/s of the digits CNN (wrk, one image per request) from the local server and from
   ``leanserve serve --executor ray --replicas 1``, and how long the Ray server took to become ready.

    python benchmarks/ray_bench.py [--rows 1000000] [--duration 10] [--connections 16] [--skip-batch|--skip-serve]

Ray pays off with more machines; on one small machine it only adds processes and hand-offs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from batch_bench import make_mlp_job  # noqa: E402
from monitor_bench import wrk  # noqa: E402


def batch(rows: int, batch_size: int, chunk_rows: int) -> None:
    from leanserve.deploy.batch import run_job
    from leanserve.deploy.ray_batch import run_job_ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo, array, session = make_mlp_job(work, rows, chunk_rows)
        started = time.perf_counter()
        for start in range(0, rows, batch_size):
            session.run({"x": array[start:start + batch_size]})
        engine = rows / (time.perf_counter() - started)
        local = run_job(session, "mlp", 1, work / "rows.parquet", work / "local", chunk_rows=chunk_rows,
                        batch_size=batch_size, progress=False)
        started = time.perf_counter()
        ray = run_job_ray(repo, "mlp", 1, work / "rows.parquet", work / "ray", chunk_rows=chunk_rows,
                          batch_size=batch_size, progress=False)
        ray_total_s = time.perf_counter() - started
        assert local.written == ray.written == rows
    print(f"\nbatch job, {rows:,} rows, batch {batch_size}, chunks of {chunk_rows:,}:")
    print(f"  engine in a plain loop           {engine:>10,.0f} rows/s")
    print(f"  local job                        {local.rows_per_s:>10,.0f} rows/s   {local.rows_per_s / engine:.1%} of the engine")
    print(f"  ray job, steady                  {ray.steady_rows_per_s:>10,.0f} rows/s   {ray.steady_rows_per_s / engine:.1%} "
          f"of the engine ({ray.actors} actors, 1 engine thread each)")
    print(f"  ray job, whole run               {rows / ray_total_s:>10,.0f} rows/s   ({ray_total_s:.1f} s: Ray start-up "
          f"{ray.ray_start_s:.1f} s, first chunk after {ray.first_chunk_s:.1f} s)")


def start_server(repo: Path, port: int, ray: bool) -> tuple[subprocess.Popen, float]:
    import httpx

    args = [sys.executable, "-m", "leanserve.cli", "serve", str(repo), "--port", str(port), "--grpc-port", "0",
            "--no-access-log", "--no-monitor", *(["--executor", "ray", "--replicas", "1"] if ray else [])]
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/models/cnn/ready", timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server ({'ray' if ray else 'local'}) did not become ready")


def serving(duration: int, connections: int) -> None:
    import torch

    import leanserve
    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export
    from leanserve.serve.protocol.codec import encode_json_request

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        x_train, x_test, y_train, _ = digits_dataset()
        export(train_cnn(x_train, y_train, epochs=1, progress=False), torch.from_numpy(x_test[:2]), work / "cnn.onnx",
               input_names=["image"], output_names=["logits"])
        repo = leanserve.Repository(work / "repo")
        repo.add(work / "cnn.onnx", "cnn")
        (work / "body.json").write_bytes(encode_json_request({"image": x_test[:1]}))
        port = 18900 + os.getpid() % 400
        figures = {}
        for ray in (False, True):  # one at a time: both would share the same two cores
            process, ready_s = start_server(repo.root, port + ray, ray)
            try:
                url = f"http://127.0.0.1:{port + ray}/v2/models/cnn/infer"
                wrk(url, work / "body.json", connections, 2)  # warm-up
                figures[ray] = (*wrk(url, work / "body.json", connections, duration), ready_s)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
    (local_rps, local_p99, local_ready), (ray_rps, ray_p99, ray_ready) = figures[False], figures[True]
    print(f"\nserving the digits CNN, one image per request, {connections} connections, {duration} s:")
    print(f"  local server                     {local_rps:>8,.0f} req/s   p99 {local_p99:6.2f} ms   ready after {local_ready:.1f} s")
    print(f"  ray serve, 1 replica             {ray_rps:>8,.0f} req/s   p99 {ray_p99:6.2f} ms   ready after {ray_ready:.1f} s   "
          f"{ray_rps / local_rps:.1%} of local")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()

    if not args.skip_batch:
        batch(args.rows, args.batch_size, args.chunk_rows)
    if not args.skip_serve:
        serving(args.duration, args.connections)


if __name__ == "__main__":
    from machine import run_recorded  # benchmarks/ (the script's folder) is on sys.path

    run_recorded("ray_bench", main)
