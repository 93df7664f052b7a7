"""CLI commands of the serving side: ``serve``, ``traffic`` and ``rollback``."""

from __future__ import annotations

import json
from pathlib import Path

from leanserve.config import ExplainConfig
from leanserve.errors import InvalidInput


def cmd_serve(args) -> int:
    from leanserve.server import run_server
    from leanserve.serve.settings import ServerConfig

    repo = Path(args.repo_path or args.repo)
    if not repo.is_dir():
        raise InvalidInput(f"{repo}: no such repository folder (create one with 'leanserve import' or 'leanserve demo')")
    config = ServerConfig.from_env(
        repo, host=args.host, port=args.port, grpc_port=None if args.grpc_port == 0 else args.grpc_port,
        max_body_bytes=args.max_body_bytes, poll_interval_s=args.poll_interval, drain_timeout_s=args.drain_timeout,
        header_timeout_s=args.header_timeout, keep_alive_timeout_s=args.keep_alive_timeout, max_connections=args.max_connections,
        max_large_bodies=args.max_large_bodies, shed_hold_s=args.shed_hold,
        access_log=not args.no_access_log, admin_allow_remote=args.admin_allow_remote,
        monitor=not args.no_monitor, monitor_sample_rate=args.monitor_sample_rate,
        monitor_db=Path(args.monitor_db) if args.monitor_db else None,
        explain=ExplainConfig(sample_interval_s=args.explain_sample_interval, sample_cpu_share=args.explain_sample_cpu_share),
    )
    if args.executor == "ray":
        from leanserve.serve.ray_serve import RayServeOptions, run_ray_server

        autoscale = RayServeOptions.parse_autoscale(args.autoscale) if args.autoscale else None
        run_ray_server(config, RayServeOptions(address=args.address, replicas=args.replicas or 1, autoscale=autoscale))
        return 0
    if args.replicas or args.autoscale or args.address:
        raise InvalidInput("--replicas, --autoscale and --address apply to --executor ray")
    run_server(config)
    return 0


def cmd_traffic(args) -> int:
    from leanserve.repository import Repository
    from leanserve.traffic import set_traffic

    repo = Repository(args.repo, create=False)
    current = repo.config(args.model)
    weights = None
    if args.weights:
        weights = {}
        for part in args.weights.split(","):
            version, sep, weight = part.partition("=")
            if not sep or not (weight.strip().isascii() and weight.strip().isdigit()):
                raise InvalidInput(f"--weights {args.weights!r}: expected VERSION=WEIGHT,..., e.g. 1=90,2=10")
            weights[str(repo.resolve(args.model, version).version)] = int(weight)
    shadow = "keep" if args.shadow is None else (None if args.shadow in ("none", "off") else repo.resolve(args.model, args.shadow).version)
    traffic = set_traffic(current.traffic, weights, shadow)
    repo.update_config(args.model, traffic=traffic)
    print(json.dumps({"weights": dict(traffic.weights), "shadow": traffic.shadow}))
    return 0


def cmd_rollback(args) -> int:
    from leanserve.repository import Repository
    from leanserve.traffic import rollback

    repo = Repository(args.repo, create=False)
    traffic, target = rollback(repo.config(args.model).traffic, repo.versions(args.model))
    repo.update_config(args.model, traffic=traffic)
    print(f"{args.model}: all traffic now goes to version {target} (a running server applies it within its poll interval)")
    return 0


def cmd_canary(args) -> int:
    from leanserve.traffic import start_rollout
    from leanserve.repository import Repository, parse_version

    repo = Repository(args.repo, create=False)
    steps = tuple(int(p) for p in args.steps.split(",")) if args.steps else None
    settings = {k: v for k, v in {"steps": steps, "step_interval_s": args.interval, "min_requests": args.min_requests,
                                  "max_p99_ratio": args.max_p99_ratio}.items() if v is not None}
    rollout = start_rollout(repo, args.model, parse_version(args.version), **settings)
    print(f"{args.model}: guarded canary of version {rollout.canary} against {rollout.primary}, steps "
          f"{'/'.join(map(str, rollout.steps))}% every {rollout.step_interval_s:g} s; a running server takes it from here")
    return 0


def cmd_monitor(args) -> int:
    import httpx

    try:
        response = httpx.get(f"{args.url.rstrip('/')}/v2/monitor/models/{args.model}", timeout=10)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"cannot reach the server at {args.url}: {exc}") from None
    if response.status_code != 200:
        raise InvalidInput(response.json().get("error", response.text))
    print_status(response.json())
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


def cmd_feedback(args) -> int:
    import os

    import httpx
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
    try:
        token = os.environ.get(FEEDBACK_TOKEN_ENV)
        response = httpx.post(f"{args.url.rstrip('/')}/v2/models/{args.model}/feedback",
                              content=orjson.dumps({"feedback": items}), timeout=60,
                              headers={"authorization": f"Bearer {token}"} if token else None)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"cannot reach the server at {args.url}: {exc}") from None
    if response.status_code != 200:
        raise InvalidInput(response.json().get("error", response.text))
    result = response.json()
    print(f"accepted {result['accepted']} labels; unknown ids: {len(result['unknown'])}, already labelled: {len(result['duplicate'])}")
    return 0


def cmd_profile(args) -> int:
    from leanserve.monitor.reference import build_reference, profile_path
    from leanserve.optimize.run import load_data
    from leanserve.repository import Repository

    repo = Repository(args.repo, create=False)
    name, _, version = args.model.partition(":")
    ref = repo.resolve(name, version or None)
    data = load_data(args.data, repo.get(ref.name, ref.version, verify=False).signature, "reference")
    build_reference(repo, ref.name, ref.version, data)
    print(f"reference profile of {ref} from {len(next(iter(data.values())))} rows: {profile_path(repo, ref.name, ref.version)}")
    return 0


def add_serve_commands(sub, command, add_repo) -> None:
    """Add serve/traffic/rollback to the main parser."""
    from leanserve.serve.settings import ServerConfig

    p = command(sub, "serve", cmd_serve,
                "serve every model in a repository over the Open Inference Protocol (HTTP and gRPC)",
                "leanserve serve model-repo --port 8000 --grpc-port 8001\n"
                "  LEANSERVE_ADMIN_TOKEN=secret leanserve serve model-repo   # enables the admin API on loopback\n"
                "  LEANSERVE_FEEDBACK_TOKEN=secret leanserve serve model-repo   # feedback needs Authorization: Bearer secret\n"
                "      (default: feedback is open: request ids are random, so a client can label only requests whose\n"
                "      ids it holds; set a token when labels come from a trusted pipeline or canaries are judged on them)\n"
                "  leanserve serve model-repo --executor ray --autoscale 1:4   # versions as Ray Serve deployments\n"
                "  leanserve serve model-repo --explain-sample-interval 10   # live feature importance, budgeted\n"
                "\nbackground work beside serving, and its switch:\n"
                "  repository watch          every --poll-interval seconds (new, removed and changed versions)\n"
                "  prediction log writer     a separate process at low priority; off with --no-monitor\n"
                "  monitor round             live windows and alerts every second, quality, bias and drift from\n"
                "                            the log every 10 s; off with --no-monitor\n"
                "  rollout guard             every second; acts only on a model with a canary running\n"
                "  live explanation sampling off by default; --explain-sample-interval S turns it on, within\n"
                "                            --explain-sample-cpu-share of one core (SHAP compiles before ready)")
    p.add_argument("repo_path", nargs="?", metavar="REPO", help="repository folder (default: --repo)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0 disables gRPC)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="largest request body accepted")
    p.add_argument("--header-timeout", type=float, default=ServerConfig.header_timeout_s, metavar="S",
                   help="seconds a client has to send a request's headers (from connecting, or from the request's "
                        "first byte on a kept-alive connection); slower connections are closed")
    p.add_argument("--keep-alive-timeout", type=float, default=ServerConfig.keep_alive_timeout_s, metavar="S",
                   help="seconds an idle keep-alive connection stays open (gRPC: idle connections get GOAWAY)")
    p.add_argument("--max-connections", type=int, default=ServerConfig.max_connections, metavar="N",
                   help="open connections served at once; requests on connections beyond it get 503 + Retry-After")
    p.add_argument("--max-large-bodies", type=int, default=ServerConfig.max_large_bodies, metavar="N",
                   help="request bodies over 1 MiB read and parsed at once; more get 503 + Retry-After, unread. "
                        "Load is also shed by queueing delay: see batching.max_queue_wait_ms (leanserve config)")
    p.add_argument("--shed-hold", type=float, default=ServerConfig.shed_hold_s, metavar="S",
                   help="seconds a shed request's 503 (and a refused large body's error) is held before it is sent, "
                        "so clients that ignore Retry-After cannot spend the server on refusals (0: at once)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between repository checks")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM")
    p.add_argument("--no-access-log", action="store_true", help="do not write JSON access log lines to stderr")
    p.add_argument("--no-monitor", action="store_true", help="do not log predictions (no drift, feedback or live quality)")
    p.add_argument("--monitor-sample-rate", type=float, default=1.0, help="share of requests logged for monitoring")
    p.add_argument("--monitor-db", metavar="DIR", help="prediction log folder (default REPO/.monitor/predictions.db; "
                   "set it when the repository is read-only)")
    p.add_argument("--admin-allow-remote", action="store_true", help="accept admin calls from non-loopback clients")
    p.add_argument("--explain-sample-interval", type=float, metavar="S",
                   help="live importance: explain one request per version at most every S seconds in the background "
                        "(default: off; it competes with serving for CPU)")
    p.add_argument("--explain-sample-cpu-share", type=float, default=ExplainConfig.sample_cpu_share, metavar="SHARE",
                   help="most CPU live importance sampling may use, as a share of one core")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where versions run: in this process (local) or as Ray Serve deployments (pip install 'leanserve[ray]')")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="--executor ray: replicas per version (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="--executor ray: scale replicas per version on queue length")
    p.add_argument("--address", help="--executor ray: an existing Ray cluster (default: start a local Ray)")
    add_repo(p)

    p = command(sub, "traffic", cmd_traffic, "split a model's traffic across versions (A/B, canary) and set a shadow",
                "leanserve traffic cnn --weights 1=90,2=10 --shadow 3")
    p.add_argument("model", help="model name")
    p.add_argument("--weights", help="VERSION=WEIGHT,... (relative weights)")
    p.add_argument("--shadow", help="version that gets a copy of live traffic ('none' to stop)")
    add_repo(p)

    p = command(sub, "canary", cmd_canary,
                "roll a version out as a guarded canary: traffic raised step by step, rolled back automatically if worse",
                "leanserve canary cnn 3 --steps 5,25,50,100 --interval 120")
    p.add_argument("model", help="model name")
    p.add_argument("version", help="the version to roll out")
    p.add_argument("--steps", help="traffic percentages, increasing (default 5,25,50,100)")
    p.add_argument("--interval", type=float, help="seconds per step at least (default 60)")
    p.add_argument("--min-requests", type=int, help="canary requests per step before judging (default 50)")
    p.add_argument("--max-p99-ratio", type=float, help="largest canary/primary p99 latency ratio (default 1.5)")
    add_repo(p)

    p = command(sub, "profile", cmd_profile,
                "store a reference profile of a version's inputs and outputs, against which live traffic is checked for drift",
                "leanserve profile digits-cnn:1 --data train.npz")
    p.add_argument("model", help="MODEL or MODEL:VERSION")
    p.add_argument("--data", required=True, help=".npz with one array per model input (typical traffic)")
    add_repo(p)

    p = command(sub, "feedback", cmd_feedback, "send delayed true labels for earlier requests (JSON lines: {\"id\": ..., \"label\": ...})",
                "leanserve feedback digits-cnn --file labels.jsonl --url http://127.0.0.1:8000")
    p.add_argument("model", help="model name")
    p.add_argument("--file", required=True, help="JSON lines, one {\"id\": REQUEST_ID, \"label\": VALUE} each")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address "
                   "(a server with a feedback token: set LEANSERVE_FEEDBACK_TOKEN here too)")

    p = command(sub, "monitor", cmd_monitor, "print a running server's monitoring picture of a model (as the dashboard shows it)",
                "leanserve monitor digits-cnn --url http://127.0.0.1:8000")
    p.add_argument("model", help="model name")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")

    p = command(sub, "rollback", cmd_rollback, "move all of a model's traffic back to the previous version in one step",
                "leanserve rollback cnn --repo model-repo")
    p.add_argument("model", help="model name")
    add_repo(p)
