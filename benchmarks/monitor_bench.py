"""Cost of monitoring (issue 5): server throughput on the digits CNN with the prediction log off and on
at a 100% sampling rate, measured side by side in alternating rounds.

    python benchmarks/monitor_bench.py [--duration 5] [--rounds 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent


def start(repo: Path, port: int, monitor: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "leanserve.cli", "serve", str(repo), "--port", str(port), "--grpc-port", "0",
            "--no-access-log", *([] if monitor else ["--no-monitor"])]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def wrk(url: str, body: Path, connections: int, duration: int) -> tuple[float, float]:
    env = {**os.environ, "BODY_FILE": str(body), "HEADER_LENGTH": ""}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(HERE / "wrk" / "post_file.lua"), url],
                         capture_output=True, text=True, env=env, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)", out, re.M).groups()
    return rps, float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def measured(url: str, body: Path, connections: int, duration: int, pid: int) -> tuple[float, float, float, float]:
    """Throughput, p99, and CPU microseconds per request of the server process and of its children (the
    prediction log's writer) over one wrk run."""
    kids = children(pid)
    before = cpu_seconds(pid), sum(cpu_seconds(k) for k in kids)
    rps, p99 = wrk(url, body, connections, duration)
    after = cpu_seconds(pid), sum(cpu_seconds(k) for k in kids)
    requests = max(rps * duration, 1.0)
    return rps, p99, 1e6 * (after[0] - before[0]) / requests, 1e6 * (after[1] - before[1]) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    import torch

    import leanserve
    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export
    from leanserve.measure import cpu_description
    from leanserve.serve.protocol.codec import encode_json_request

    print(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        x_train, x_test, y_train, _ = digits_dataset()
        export(train_cnn(x_train, y_train, epochs=2, progress=False), torch.from_numpy(x_test[:2]), work / "cnn.onnx",
               input_names=["image"], output_names=["logits"])
        repo = leanserve.Repository(work / "repo")
        repo.add(work / "cnn.onnx", "cnn")
        (work / "body.json").write_bytes(encode_json_request({"image": x_test[:1]}))
        figures: dict[bool, list[tuple[float, float, float, float]]] = {False: [], True: []}
        port = 18500 + os.getpid() % 400
        # Both servers run for the whole benchmark (the idle one costs nothing) and are measured in
        # alternating rounds: the ratio of each adjacent pair cancels the machine's slow drifts.
        servers = {monitor: start(repo.root, port + monitor, monitor) for monitor in (False, True)}
        try:
            for monitor, _ in servers.items():
                wrk(f"http://127.0.0.1:{port + monitor}/v2/models/cnn/infer", work / "body.json", args.connections, 2)
            for round_ in range(args.rounds):
                for monitor in ((False, True) if round_ % 2 == 0 else (True, False)):
                    figures[monitor].append(measured(f"http://127.0.0.1:{port + monitor}/v2/models/cnn/infer",
                                                     work / "body.json", args.connections, args.duration, servers[monitor].pid))
                print(f"  round {round_ + 1}: off {figures[False][-1][0]:,.0f} req/s (p99 {figures[False][-1][1]:.2f} ms), "
                      f"on (100%) {figures[True][-1][0]:,.0f} req/s (p99 {figures[True][-1][1]:.2f} ms)")
            logged = httpx.get(f"http://127.0.0.1:{port + 1}/metrics").text
        finally:
            for process in servers.values():
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    fates = dict(re.findall(r'^leanserve_prediction_log_samples\{fate="(\w+)"\} ([\d.e+]+)', logged, re.M))
    print(f"  prediction log: {', '.join(f'{k} {float(v):,.0f}' for k, v in fates.items())}")
    ratios = [on[0] / off[0] for off, on in zip(figures[False], figures[True])]
    cost = 1 - float(np.median(ratios))
    off = float(np.median([f[0] for f in figures[False]]))
    on = float(np.median([f[0] for f in figures[True]]))
    cpu = {m: [float(np.median([f[i] for f in figures[m]])) for i in (2, 3)] for m in figures}
    print(f"  CPU per request (medians): server {cpu[False][0]:.0f} us without monitoring, {cpu[True][0]:.0f} us with it; "
          f"prediction log writer process {cpu[True][1]:.1f} us")
    print(f"\nmonitoring at 100% costs {cost:.1%} of throughput (median of {len(ratios)} paired rounds; medians "
          f"{on:,.0f} vs {off:,.0f} req/s, {args.connections} clients)   target < 10%   {'PASS' if cost < 0.10 else 'FAIL'}")


if __name__ == "__main__":
    main()
