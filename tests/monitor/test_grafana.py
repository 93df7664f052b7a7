import json
import re
from importlib import resources

from leanserve.serve.metrics import ServerMetrics


def test_grafana_dashboard_queries_only_metrics_the_server_exports():
    dashboard = json.loads(resources.files("leanserve.monitor").joinpath("grafana.json").read_text())
    exported = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for family in ServerMetrics().registry.collect():
        exported |= {family.name + suffix for suffix in suffixes[family.type]}
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"leanserve_[a-z_]+", target["expr"])}
    assert used and used <= exported, used - exported
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
