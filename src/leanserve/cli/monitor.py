"""What the monitor sees and is told: ``monitor`` (a running server's picture of a model), ``feedback``
(true labels for earlier requests) and ``profile`` (the reference data drift is measured against)."""

from __future__ import annotations

from leanserve.cli.args import add_json, add_model_ref, add_repo, command, model_ref, open_repo, print_json
from leanserve.errors import InvalidInput

from leanserve.serve.settings import ServerConfig

DEFAULT_URL = f"http://{ServerConfig.host}:{ServerConfig.port}"


def cmd_monitor(args) -> int:
    status = _call(args.url, "GET", f"/v2/monitor/models/{args.model}")
    if args.json:
        print_json(status)
    else:
        print_status(status)
    return 0


def cmd_feedback(args) -> int:
    import os
    from pathlib import Path

    import orjson

    from leanserve.serve.settings import FEEDBACK_TOKEN_ENV

    path = Path(args.file)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise InvalidInput(f"{path}:{number}: not a JSON object ({exc})") from None
    token = os.environ.get(FEEDBACK_TOKEN_ENV)
    result = _call(args.url, "POST", f"/v2/models/{args.model}/feedback", content=orjson.dumps({"feedback": items}),
                   headers={"authorization": f"Bearer {token}"} if token else None)
    print(f"accepted {result['accepted']} labels; unknown ids: {len(result['unknown'])}, "
          f"already labelled: {len(result['duplicate'])}")
    return 0


def _call(url: str, method: str, path: str, **kwargs) -> dict:
    """The server's JSON answer; InvalidInput when it cannot be reached or answers with an error."""
    import httpx

    try:
        response = httpx.request(method, f"{url.rstrip('/')}{path}", timeout=60, **kwargs)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"cannot reach the server at {url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        raise InvalidInput(f"{url}{path}: HTTP {response.status_code}, not a leanserve answer") from None
    if response.status_code != 200:
        raise InvalidInput(body.get("error", response.text) if isinstance(body, dict) else response.text)
    return body


def cmd_profile(args) -> int:
    from leanserve.monitor.reference import build_reference, profile_path
    from leanserve.optimize.run import load_data

    repo = open_repo(args)
    name, version = model_ref(args)
    ref = repo.resolve(name, version)
    data = load_data(args.data, repo.get(ref.name, ref.version, verify=False).signature, "reference")
    build_reference(repo, ref.name, ref.version, data)
    print(f"reference profile of {ref} from {len(next(iter(data.values())))} rows: {profile_path(repo, ref.name, ref.version)}")
    return 0


def print_status(status: dict) -> None:
    """The dashboard's picture of one model, as text."""
    def f(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    print(f"model {status['model']}   traffic {status['traffic']['weights'] or 'newest version'}"
          f"   shadow {status['traffic']['shadow'] or '-'}")
    states = status.get("states") or {}
    if states:
        print("versions: " + ", ".join(f"v{v} {state}" for v, state in sorted(states.items(), key=lambda i: int(i[0]))))
    print(f"{'version':<8}{'requests':>9}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}{'accuracy':>10}"
          f"{'labelled':>9}{'bias gap':>9}{'shadow':>8}  drift")
    for version, v in status["versions"].items():
        print(f"{version:<8}{v['requests']:>9}{v['throughput_rps']:>8.1f}{v['p50_ms']:>8.2f}{v['p99_ms']:>8.2f}"
              f"{v['error_rate']:>8.1%}{f(v['accuracy'], '.2%'):>10}{v['labelled']:>9}{f(v['bias_gap'], '.3f'):>9}"
              f"{f(v['shadow_agreement'], '.0%'):>8}  {', '.join(v['drift_features']) if v['drifted'] else 'none'}")
        for group in v["bias_groups"]:
            print(f"{'':8}group {group['group']}: accuracy {group['accuracy']:.2%}, positive rate {group['positive_rate']:.2%} "
                  f"({group['samples']} labelled)")
    rollout = status["rollout"]
    print("rollout: " + (f"canary v{rollout['canary']} at {rollout['steps'][rollout['stage']]}% against v{rollout['primary']}"
                         if rollout["canary"] else "none running"))
    verdict = rollout.get("verdict")
    if verdict and rollout["canary"]:
        print(f"  latest check: {verdict['action']}: {verdict['reason']}")
    for event in status["rollout_events"][-3:]:  # decisions that changed traffic, with their reasons
        print(f"  {event['action']}: {event['reason']}")
    print("alerts: " + ("; ".join(f"v{a['version']} {a['rule']}: {a['message']}" for a in status["alerts"]) or "none"))


def register(sub) -> None:
    """Add profile, feedback and monitor."""
    p = command(sub, "profile", cmd_profile,
                "store a reference profile of a version's inputs and outputs, against which live traffic is checked for drift",
                "leanserve profile digits-cnn:1 --data train.npz")
    add_model_ref(p)
    p.add_argument("--data", required=True, help=".npz with one array per model input (typical traffic)")
    add_repo(p)

    p = command(sub, "feedback", cmd_feedback, "send delayed true labels for earlier requests (JSON lines: {\"id\": ..., \"label\": ...})",
                "leanserve feedback digits-cnn --file labels.jsonl --url http://127.0.0.1:8000")
    p.add_argument("model", help="model name")
    p.add_argument("--file", required=True, help="JSON lines, one {\"id\": REQUEST_ID, \"label\": VALUE} each")
    p.add_argument("--url", default=DEFAULT_URL, help="the server's HTTP address "
                   "(a server with a feedback token: set LEANSERVE_FEEDBACK_TOKEN here too)")

    p = command(sub, "monitor", cmd_monitor, "print a running server's monitoring picture of a model (as the dashboard shows it)",
                "leanserve monitor digits-cnn --url http://127.0.0.1:8000")
    p.add_argument("model", help="model name")
    p.add_argument("--url", default=DEFAULT_URL, help="the server's HTTP address")
    add_json(p, "the server's status document")
