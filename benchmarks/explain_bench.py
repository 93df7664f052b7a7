"""Cost of explanations (issue 10): p50/p99 of explained requests to a real ``leanserve serve``, per method,
next to a plain inference request, with the CPU they ran on.

Cases: the digits CNN (784 pixels, reference profile of 500 training images) explained by SHAP's
permutation explainer against the reference's mean image (the default) and against black, by the
partition and kernel explainers, and by Captum's Integrated Gradients (50 steps, over its PyTorch
source); a 30-feature tabular MLP explained by each SHAP method with a background of 32 reference rows;
with ``--minilm``, all-MiniLM-L6-v2 (ONNX, 16 tokens) explained per token by its cosine similarity to
itself. Goal: an explained CNN request at most 60 ms p50 with the permutation explainer and with
Integrated Gradients.

    python benchmarks/explain_bench.py [--requests 40] [--epochs 3] [--minilm] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

GOAL_P50_MS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_repo(root: Path, epochs: int, with_minilm: bool) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """digits (CNN with source and profile), tabular (30-feature MLP with source and profile) and, when
    asked, minilm (ONNX); returns a test image batch, tabular rows and tokenized sentences (or None)."""
    import torch

    from leanserve import Repository
    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export
    from leanserve.monitor.reference import build_reference
    from leanserve.torch_source import save_source

    repo = Repository(root / "repo")

    def register(module, example: np.ndarray, name: str, input_name: str) -> None:
        path = root / f"{name}.onnx"
        export(module, torch.from_numpy(example), path, input_names=[input_name], output_names=["logits"])
        repo.add(path, name, attachments=[save_source(module, torch.from_numpy(example), root)])

    x_train, x_test, y_train, _ = digits_dataset()
    register(train_cnn(x_train, y_train, epochs=epochs, progress=False), x_test[:4], "digits", "image")
    build_reference(repo, "digits", 1, {"image": x_train[:500]})  # its mean image is SHAP's default background
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3000, 30)).astype(np.float32)
    labels = (rows[:, :3].sum(axis=1) > 0).astype(np.int64)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 2))
    optimizer = torch.optim.Adam(mlp.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(mlp(torch.from_numpy(rows)), torch.from_numpy(labels)).backward()
        optimizer.step()
    register(mlp.eval(), rows[:4], "tabular", "features")
    build_reference(repo, "tabular", 1, {"features": rows[:2000]})
    return x_test, rows[2000:], (add_minilm(repo, root) if with_minilm else None)


def add_minilm(repo, root: Path) -> dict[str, np.ndarray]:
    """all-MiniLM-L6-v2 with mean pooling as ONNX (``benchmarks/minilm.py``); returns its test sentences
    tokenized to 16 positions."""
    sys.path.insert(0, str(Path(__file__).parent))
    import minilm

    minilm.export_minilm_onnx(root / "minilm.onnx", seq_len=16)
    repo.add(root / "minilm.onnx", "minilm")
    return minilm.tokenize(minilm.load_minilm()[1], minilm.SENTENCES, 16)


def body(name: str, array: np.ndarray, **parameters) -> bytes:
    doc = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(array.shape), "data": array.ravel().tolist()}],
           "parameters": parameters}
    return json.dumps(doc).encode()


def token_body(tokens: dict[str, np.ndarray], row: int, **parameters) -> bytes:
    inputs = [{"name": n, "datatype": "INT64", "shape": [1, a.shape[1]], "data": a[row].tolist()} for n, a in tokens.items()]
    return json.dumps({"inputs": inputs, "parameters": parameters}).encode()


def timed(client: httpx.Client, url: str, bodies: list[bytes]) -> list[float]:
    """Milliseconds per request, sequential (one client, like a user asking why)."""
    times = []
    for payload in bodies:
        started = time.perf_counter()
        response = client.post(url, content=payload, headers={"content-type": "application/json"})
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            sys.exit(f"{url} answered {response.status_code}: {response.text[:300]}")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="timed requests per case")
    parser.add_argument("--epochs", type=int, default=3, help="CNN training epochs")
    parser.add_argument("--minilm", action="store_true", help="add all-MiniLM-L6-v2 per-token cases (ONNX export: ~20 s)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from leanserve.measure import cpu_description

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, rows, tokens = build_repo(root, args.epochs, args.minilm)
        port = free_port()
        log = open(root / "server.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "leanserve.cli", "serve", str(root / "repo"), "--port", str(port),
                                   "--grpc-port", "0", "--no-access-log", "--no-monitor"], stdout=log, stderr=subprocess.STDOUT)
        try:
            results = run_cases(f"http://127.0.0.1:{port}", images, rows, tokens, args.requests)
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()
    report = {"cpu": cpu_description(), "goal_p50_ms": GOAL_P50_MS, "cases": results}
    print(f"CPU: {report['cpu']}")
    print(f"{'case':58s} {'p50 ms':>8s} {'p99 ms':>8s}  goal")
    for case in results:
        goal = case.get("goal_p50_ms")
        verdict = "" if goal is None else ("met" if case["p50_ms"] <= goal else "MISSED") + f" (<= {goal:g} ms p50)"
        print(f"{case['case']:58s} {case['p50_ms']:8.1f} {case['p99_ms']:8.1f}  {verdict}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


def run_cases(url: str, images: np.ndarray, rows: np.ndarray, tokens: dict | None, requests: int) -> list[dict]:
    models = ["digits", "tabular", *(["minilm"] if tokens is not None else [])]
    with httpx.Client(timeout=120) as client:
        wait_ready(client, url, models)
        cases = cnn_cases(images, requests) + tabular_cases(rows, requests)
        if tokens is not None:
            cases += minilm_cases(tokens, requests)
        results = []
        for name, model, verb, bodies, goal in cases:
            timed(client, f"{url}/v2/models/{model}/{verb}", bodies[:3])  # warm-up: imports, Numba, sessions
            times = np.asarray(timed(client, f"{url}/v2/models/{model}/{verb}", bodies))
            results.append({"case": name, "p50_ms": round(float(np.percentile(times, 50)), 2),
                            "p99_ms": round(float(np.percentile(times, 99)), 2), "requests": len(times),
                            **({"goal_p50_ms": goal} if goal else {})})
    return results


def wait_ready(client: httpx.Client, url: str, models: list[str]) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if all(client.get(f"{url}/v2/models/{m}/ready").status_code == 200 for m in models):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit("the server did not become ready")
        time.sleep(0.2)


def cnn_cases(images: np.ndarray, requests: int) -> list[tuple]:
    def bodies(**parameters) -> list[bytes]:
        return [body("image", images[i:i + 1], **parameters) for i in range(requests)]

    return [
        ("digits CNN: inference only", "digits", "infer", bodies(), None),
        ("digits CNN: SHAP permutation, reference mean image", "digits", "explain",
         bodies(explain_method="permutation"), GOAL_P50_MS),
        ("digits CNN: SHAP permutation, black background", "digits", "explain",
         bodies(explain_method="permutation", explain_background="zeros"), GOAL_P50_MS),
        ("digits CNN: SHAP partition (500 evals), reference mean", "digits", "explain",
         bodies(explain_method="partition"), None),
        ("digits CNN: SHAP kernel (1570 coalitions), reference mean", "digits", "explain",
         bodies(explain_method="kernel"), None),
        ("digits CNN: Integrated Gradients (50 steps), reference mean", "digits", "explain",
         bodies(explain_method="integrated_gradients"), GOAL_P50_MS),
    ]


def tabular_cases(rows: np.ndarray, requests: int) -> list[tuple]:
    return [(f"tabular MLP: SHAP {method} (30 features, 32 ref. rows)", "tabular", "explain",
             [body("features", rows[i:i + 1], explain_method=method) for i in range(requests)], None)
            for method in ("permutation", "partition", "kernel")]


def minilm_cases(tokens: dict[str, np.ndarray], requests: int) -> list[tuple]:
    count = min(requests, len(tokens["input_ids"]))
    cases = [("MiniLM (16 positions): inference only", "minilm", "infer",
              [token_body(tokens, i) for i in range(count)], None)]
    for method, extra, label in (("permutation", {"explain_permutations": 4}, "4 permutations"),
                                 ("partition", {}, "500 evals"), ("kernel", {}, "500 coalitions")):
        cases.append((f"MiniLM per token: SHAP {method} ({label}), similarity", "minilm", "explain",
                      [token_body(tokens, i, explain_method=method, explain_score="similarity", **extra)
                       for i in range(count)], None))
    return cases


if __name__ == "__main__":
    from machine import run_recorded  # benchmarks/ (the script's folder) is on sys.path

    sys.exit(run_recorded("explain_bench", main))
