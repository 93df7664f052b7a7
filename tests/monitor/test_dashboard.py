"""The monitoring picture over HTTP, alert rules firing (log, metric, webhook), and the dashboard page
rendered by a real headless Chromium against a live server."""

import http.server
import json
import shutil
import subprocess
import tempfile
import threading

import httpx
import orjson
import pytest

from conftest import wait_until
from leanserve.config import AlertConfig

BODY = lambda rid, group: orjson.dumps({"id": rid, "parameters": {"group": group},  # noqa: E731
                                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 9]}]})


def traffic_with_labels(server, n=40):
    # Arg-max of y = 2x + 1 is index 3. Group "a" is always labelled right, group "b" half the time.
    for i in range(n):
        group = "a" if i % 2 else "b"
        assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY(f"r{i}", group)).status_code == 200
    wait_until(lambda: server.server.prediction_log.count("affine") >= n, what="samples logged")
    labels = [{"id": f"r{i}", "label": 3 if i % 2 or i % 4 == 0 else 0} for i in range(n)]
    assert httpx.post(server.url + "/v2/models/affine/feedback", content=orjson.dumps({"feedback": labels})).status_code == 200


@pytest.fixture
def server(affine_repo, live_server_factory):
    return live_server_factory(affine_repo.root, guard_interval_s=0.2)


def test_monitor_json_shows_traffic_quality_and_bias(server):
    traffic_with_labels(server)

    def status():
        s = httpx.get(server.url + "/v2/monitor/models/affine").json()
        return s if s["versions"]["1"]["labelled"] == 40 and s["versions"]["1"]["history"] else None

    s = wait_until(status, what="labels and history in the monitoring picture")
    v1 = s["versions"]["1"]
    assert v1["requests"] >= 40 and v1["error_rate"] == 0 and v1["accuracy"] == pytest.approx(0.75)
    groups = {g["group"]: g["accuracy"] for g in v1["bias_groups"]}
    assert groups == {"a": 1.0, "b": 0.5} and v1["bias_gap"] == pytest.approx(0.5)
    assert httpx.get(server.url + "/v2/monitor/models/nope").status_code == 404


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alert_rules_fire_to_log_metric_and_webhook(affine_repo, live_server_factory):
    hook = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        affine_repo.update_config("affine", alerts=AlertConfig(
            max_p99_ms=0.000001, max_bias_gap=0.2, webhook_url=f"http://127.0.0.1:{hook.server_port}/alerts"))
        server = live_server_factory(affine_repo.root, guard_interval_s=0.2)
        traffic_with_labels(server)
        wait_until(lambda: {a["rule"] for a in _Hook.received} >= {"p99_latency", "bias_gap"}, what="webhook calls")
        metrics = httpx.get(server.url + "/metrics").text
        assert 'leanserve_alert_active{model="affine",rule="p99_latency",version="1"} 1.0' in metrics
        assert 'leanserve_alerts_total{model="affine",rule="bias_gap"} 1.0' in metrics
        active = httpx.get(server.url + "/v2/monitor/models/affine").json()["alerts"]
        assert {a["rule"] for a in active} >= {"p99_latency", "bias_gap"}
    finally:
        hook.shutdown()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_dashboard_renders_live_figures_in_headless_chromium(server):
    traffic_with_labels(server)
    wait_until(lambda: httpx.get(server.url + "/v2/monitor/models/affine").json()["versions"]["1"]["labelled"] == 40,
               what="labels in the picture")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", server.url + "/dashboard"],
            capture_output=True, text=True, timeout=120).stdout
    assert 'data-testid="model-affine"' in dom
    assert 'data-testid="version-affine-1"' in dom
    assert 'data-testid="accuracy-1">75.0%' in dom
    assert 'data-testid="chart-rps"' in dom and "no rollout running" in dom


def test_monitor_command_prints_the_picture(server, capsys):
    from leanserve.cli import main

    traffic_with_labels(server)
    wait_until(lambda: httpx.get(server.url + "/v2/monitor/models/affine").json()["versions"]["1"]["labelled"] == 40,
               what="labels in the picture")
    assert main(["monitor", "affine", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "model affine" in out and "75.00%" in out and "group b: accuracy 50.00%" in out
    assert main(["monitor", "nope", "--url", server.url]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
