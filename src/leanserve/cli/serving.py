"""Running a server: ``serve``, and ``demo`` (a first model, optionally served)."""

from __future__ import annotations

from pathlib import Path

from leanserve.cli.args import add_repo, command, config_default, given, positive_int
from leanserve.errors import InvalidInput

SERVER = "leanserve.serve.settings:ServerConfig"
EXPLAIN = "leanserve.config:ExplainConfig"


def cmd_serve(args) -> int:
    from leanserve.config import ExplainConfig
    from leanserve.serve.settings import ServerConfig
    from leanserve.server import check_ports, run_server

    repo = Path(args.repo_path or args.repo)
    if not repo.is_dir():
        raise InvalidInput(f"{repo}: no such repository folder (create one with 'leanserve import' or 'leanserve demo')")
    explain = ExplainConfig(**given(args, sample_interval_s="explain_sample_interval",
                                    sample_cpu_share="explain_sample_cpu_share"))
    config = ServerConfig.from_env(
        repo, explain=explain, access_log=not args.no_access_log, admin_allow_remote=args.admin_allow_remote,
        monitor=not args.no_monitor, monitor_db=Path(args.monitor_db) if args.monitor_db else None,
        **_grpc_port(args),
        **given(args, host="host", port="port", max_body_bytes="max_body_bytes", poll_interval_s="poll_interval",
                drain_timeout_s="drain_timeout", header_timeout_s="header_timeout",
                keep_alive_timeout_s="keep_alive_timeout", max_connections="max_connections",
                max_large_bodies="max_large_bodies", shed_hold_s="shed_hold", monitor_sample_rate="monitor_sample_rate"),
    )
    if args.executor == "ray":
        from leanserve.serve.ray_serve import RayServeOptions, run_ray_server

        check_ports(config)
        autoscale = RayServeOptions.parse_autoscale(args.autoscale) if args.autoscale else None
        run_ray_server(config, RayServeOptions(address=args.address, replicas=args.replicas or 1, autoscale=autoscale))
        return 0
    if args.replicas or args.autoscale or args.address:
        raise InvalidInput("--replicas, --autoscale and --address apply to --executor ray")
    try:
        run_server(config)
    except KeyboardInterrupt:  # Ctrl-C is how a foreground server is stopped: it drained and closed
        pass
    return 0


def _grpc_port(args) -> dict:
    if args.grpc_port is None:
        return {}
    return {"grpc_port": None if args.grpc_port == 0 else args.grpc_port}


def cmd_demo(args) -> int:
    from leanserve.demo import run_demo
    from leanserve.repository import Repository
    from leanserve.serve.settings import ServerConfig
    from leanserve.server import check_ports

    server = ServerConfig(repo=Path(args.repo), **_grpc_port(args), **given(args, host="host", port="port"))
    if args.serve:
        check_ports(server)  # before minutes of training
    result = run_demo(Repository(args.repo), **given(args, name="name", epochs="epochs"))
    print(f"exported with the {result.exporter} exporter (max abs diff vs PyTorch {result.max_abs_diff:.2g})")
    print(f"imported as {result.ref} into {args.repo}")
    print(f"held-out accuracy: {result.accuracy:.2%} on scikit-learn digits")
    if result.example_files:
        print("wrote example data for the README's first session: " + ", ".join(p.name for p in result.example_files))
    if args.serve:
        from leanserve.server import run_server

        print(f"\nserving; from another terminal, classify a held-out digit (a {result.request_label}):\n")
        print(f"  curl -s http://{server.host}:{server.port}/v2/models/{result.ref.name}/infer -d @{result.request_file}\n")
        run_server(server)
    return 0


def _add_address(p) -> None:
    config_default(p.add_argument("--host", help="address to listen on (0.0.0.0 for all interfaces)"), SERVER, "host")
    config_default(p.add_argument("--port", type=int, help="HTTP port"), SERVER, "port")
    config_default(p.add_argument("--grpc-port", type=int, help="gRPC port (0 turns gRPC off)"), SERVER, "grpc_port")


def register(sub) -> None:
    """Add serve and demo."""
    p = command(sub, "serve", cmd_serve,
                "serve every model in a repository over the Open Inference Protocol (HTTP and gRPC)",
                "leanserve serve model-repo --port 8000 --grpc-port 8001\n"
                "  LEANSERVE_ADMIN_TOKEN=secret leanserve serve model-repo   # enables the admin API on loopback\n"
                "  LEANSERVE_FEEDBACK_TOKEN=secret leanserve serve model-repo   # feedback needs Authorization: Bearer secret\n"
                "      (without it feedback is open: request ids are random, so a client can label only requests whose\n"
                "      ids it holds; set a token when labels come from a trusted pipeline or canaries are judged on them)\n"
                "  leanserve serve model-repo --executor ray --autoscale 1:4   # versions as Ray Serve deployments\n"
                "  leanserve serve model-repo --explain-sample-interval 10   # live feature importance, budgeted\n"
                "\nbackground work beside serving, and its switch:\n"
                "  repository watch          every --poll-interval seconds (new, removed and changed versions)\n"
                "  prediction log writer     a separate process at low priority; off with --no-monitor\n"
                "  monitor round             live windows and alerts every second, quality, bias and drift from\n"
                "                            the log every 10 s; off with --no-monitor\n"
                "  rollout guard             every second; acts only on a model with a canary running\n"
                "  live explanation sampling off unless --explain-sample-interval S, within\n"
                "                            --explain-sample-cpu-share of one core (SHAP compiles before ready)")
    p.add_argument("repo_path", nargs="?", metavar="REPO", help="repository folder (default: --repo)")
    _add_address(p)
    for flag, field, kind, text in (
        ("--max-body-bytes", "max_body_bytes", int, "largest request body accepted"),
        ("--header-timeout", "header_timeout_s", float, "seconds a client has to send a request's headers (from "
         "connecting, or from the request's first byte on a kept-alive connection); slower connections are closed"),
        ("--keep-alive-timeout", "keep_alive_timeout_s", float,
         "seconds an idle keep-alive connection stays open (gRPC: idle connections get GOAWAY)"),
        ("--max-connections", "max_connections", int,
         "open connections served at once; requests on connections beyond it get 503 + Retry-After"),
        ("--max-large-bodies", "max_large_bodies", int, "request bodies over 1 MiB read and parsed at once; more get "
         "503 + Retry-After, unread. Load is also shed by queueing delay: see batching.max_queue_wait_ms (leanserve config)"),
        ("--shed-hold", "shed_hold_s", float, "seconds a shed request's 503 (and a refused large body's error) is held "
         "before it is sent, so clients that ignore Retry-After cannot spend the server on refusals; doubled for each "
         "refusal in a row on one connection, up to 4x (0: at once)"),
        ("--poll-interval", "poll_interval_s", float, "seconds between repository checks"),
        ("--drain-timeout", "drain_timeout_s", float, "seconds to finish in-flight requests on SIGTERM"),
        ("--monitor-sample-rate", "monitor_sample_rate", float, "share of requests logged for monitoring"),
    ):
        config_default(p.add_argument(flag, type=kind, help=text, metavar={int: "N", float: "S"}[kind] if "rate" not in flag else "SHARE"), SERVER, field)
    p.add_argument("--no-access-log", action="store_true", help="do not write JSON access log lines to stderr")
    p.add_argument("--no-monitor", action="store_true", help="do not log predictions (no drift, feedback or live quality)")
    p.add_argument("--monitor-db", metavar="DIR", help="prediction log folder (default: REPO/.monitor/predictions.db; "
                   "set it when the repository is read-only)")
    p.add_argument("--admin-allow-remote", action="store_true", help="accept admin calls from non-loopback clients")
    p.add_argument("--explain-sample-interval", type=float, metavar="S",
                   help="live importance: explain one request per version at most every S seconds in the background "
                        "(off unless given; it competes with serving for CPU)")
    config_default(p.add_argument("--explain-sample-cpu-share", type=float, metavar="SHARE",
                                  help="most of the time live importance sampling may run, as a share (a sample that ran T s "
                                       "waits T/SHARE s before the next; wall time, since under load it competes "
                                       "with requests for longer than it is on a core)"),
                   EXPLAIN, "sample_cpu_share")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where versions run: in this process (local) or as Ray Serve deployments (pip install 'leanserve[ray]')")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="--executor ray: replicas per version (default: 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="--executor ray: scale replicas per version on queue length")
    p.add_argument("--address", help="--executor ray: an existing Ray cluster (default: start a local Ray)")
    add_repo(p)

    p = command(sub, "demo", cmd_demo, "train a small CNN on scikit-learn digits, export it to ONNX and import it",
                "leanserve demo --repo model-repo --serve")
    config_default(p.add_argument("--name", help="model name"), "leanserve.demo:run_demo", "name")
    config_default(p.add_argument("--epochs", type=positive_int, help="training epochs"), "leanserve.demo:run_demo",
                   "epochs")
    p.add_argument("--serve", action="store_true", help="serve the repository afterwards")
    _add_address(p)
    add_repo(p)
