"""CLI commands of federated learning: ``federate`` (the server, or a whole simulation on one machine) and
``federate-client`` (a Flower SuperNode on an edge device). Flower is imported only when they run."""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from leanserve.cli.args import (add_force, add_json, add_repo, command, config_default, given, model_ref, open_repo,
                                positive_int, subject)
from leanserve.errors import InvalidInput

ROUNDS = "leanserve.learn.federated.server:RoundSettings"


def register(sub) -> None:
    """Add federate and federate-client."""
    p = command(sub, "federate", cmd_federate,
                "train a version with Flower (simulated clients on this machine, or real ones with --listen); "
                "register the result as a guarded canary",
                "leanserve federate digits-cnn --strategy fedprox --rounds 20 --clients 10 --data digits.npz\n"
                "  leanserve federate digits-cnn --listen 10.0.0.5:9092 --clients 3 --data held-out.npz\n"
                "  leanserve federate digits-cnn --listen 10.0.0.5:9092 --clients 3 --tls-cert cert.pem "
                "--tls-key key.pem --authorized-keys devices.pub")
    p.add_argument("model", help="model whose version has a PyTorch source (leanserve demo / export --name keep one)")
    p.add_argument("--version", help="version to start from (default: the version serving most traffic)")
    config_default(p.add_argument("--strategy", choices=("fedavg", "fedprox"), help="Flower strategy"), ROUNDS, "strategy")
    config_default(p.add_argument("--rounds", type=positive_int, help="federated rounds"), ROUNDS, "rounds")
    config_default(p.add_argument("--clients", type=positive_int, help="clients per round (simulated, or SuperNodes to "
                                  "wait for)"), ROUNDS, "clients")
    p.add_argument("--dp", metavar="CLIP,NOISE",
                   help="differential privacy: server-side clipping norm and Gaussian noise multiplier, e.g. 1.0,0.5")
    p.add_argument("--data", metavar="NPZ",
                   help="labelled data (.npz: the model input and 'labels'). Simulation: split among the clients less a "
                        "held-out 20%% the server evaluates on; --listen: the server's held-out evaluation data. "
                        "Default: scikit-learn digits (the demo CNN's task; its test split with --listen)")
    p.add_argument("--partition", default="iid", help="simulation: iid, dirichlet:ALPHA or classes:N")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="run a real federation: waits for --clients `leanserve federate-client` SuperNodes on this "
                        "address. The port serves only Flower's Fleet API (what SuperNodes call); the SuperLink's "
                        "Control API (which accepts runs, i.e. code) and Runtime API listen on a Unix socket in a "
                        "folder only you can enter, so no one else can submit code, loopback included. Any "
                        "SuperNode that reaches the port can join and train unless --authorized-keys is given; "
                        "use --tls-cert/--tls-key off a trusted network")
    p.add_argument("--tls-cert", metavar="PEM",
                   help="--listen: certificate (chain) the port presents; clients pass its CA as --root-certificates")
    p.add_argument("--tls-key", metavar="PEM", help="--listen: the certificate's private key")
    p.add_argument("--authorized-keys", metavar="FILE",
                   help="--listen: admit only SuperNodes holding one of these keys (Flower's SuperNode "
                        "authentication): one OpenSSH public key per line, each the .pub that `leanserve "
                        "federate-client --new-key` writes (ECDSA; '#' comments allowed). Needs --tls-cert/--tls-key "
                        "(Flower authenticates only over TLS). Registered for this federation only")
    config_default(p.add_argument("--join-timeout", type=float, metavar="SECONDS",
                                  help="--listen: how long to wait for the clients to connect"),
                   "leanserve.learn.federated.core:federate_deployed", "join_timeout_s")
    config_default(p.add_argument("--local-epochs", type=positive_int, help="local epochs per round on each client"),
                   ROUNDS, "local_epochs")
    config_default(p.add_argument("--lr", type=float, help="clients' SGD learning rate"), ROUNDS, "lr")
    config_default(p.add_argument("--mu", type=float, help="FedProx proximal weight mu"), ROUNDS, "proximal_mu")
    config_default(p.add_argument("--server-momentum", type=float, help="momentum of the server's update (Flower's "
                                  "FedAvgM); 0 for plain averaging"), ROUNDS, "server_momentum")
    p.add_argument("--no-canary", action="store_true", help="register without starting a guarded canary")
    add_force(p, "a model whose held-out accuracy ends below the start's (a collapsed model is never registered)")
    add_json(p, "the result")
    add_repo(p)

    p = command(sub, "federate-client", cmd_federate_client,
                "take part in federated rounds with local data (a Flower SuperNode)",
                "leanserve federate-client --server 10.0.0.5:9092 --data my-data.npz\n"
                "  leanserve federate-client --new-key node-key    # then give node-key.pub to the server\n"
                "  leanserve federate-client --server fl.example.org:9092 --data my-data.npz "
                "--root-certificates ca.pem --auth-key node-key")
    p.add_argument("--server", metavar="HOST:PORT", help="the `leanserve federate --listen` address (required)")
    p.add_argument("--data", metavar="PATH", help="local labelled data (.npz: the model input and 'labels'; required)")
    p.add_argument("--root-certificates", metavar="PEM",
                   help="CA certificate of a TLS server (default: plaintext, for trusted networks only)")
    p.add_argument("--auth-key", metavar="KEY",
                   help="this SuperNode's private key (OpenSSH ECDSA), for a server started with --authorized-keys "
                        "that lists its public half; needs --root-certificates (Flower authenticates only over TLS)")
    p.add_argument("--new-key", metavar="PATH",
                   help="make a key pair (P-384) and exit: the private key at PATH (mode 0600), the public line at "
                        "PATH.pub for the server's --authorized-keys")
    p.add_argument("--runtime-port", type=int, metavar="PORT",
                   help="loopback port of the SuperNode's own Runtime API, used by its ClientApp processes "
                        "(default: a free one)")


def cmd_federate(args) -> int:
    from leanserve.learn.federated import core as federated
    from leanserve.learn.federated.processes import Terminated
    from leanserve.learn.federated.server import RoundSettings
    from leanserve.learn.partition import parse_partition
    from leanserve.torch_source import has_source, load_source

    tls = _tls_files(args)  # the flags first: a wrong combination is refused before any work
    authorized_keys = _authorized_keys(args, tls)
    repo = open_repo(args)
    settings = federated.with_dp(RoundSettings(**given(
        args, strategy="strategy", rounds="rounds", clients="clients", local_epochs="local_epochs", lr="lr",
        proximal_mu="mu", server_momentum="server_momentum")), args.dp)
    federated.check_settings(settings)
    ref = subject(repo, *model_ref(args))
    if not has_source(repo.get(ref.name, ref.version)):
        load_source(repo.get(ref.name, ref.version))  # raises UnsupportedFormat saying how to get a source
    input_name = federated.single_input_name(repo, ref)
    if args.listen:
        held_out = (federated.load_training_data(args.data, input_name) if args.data
                    else federated.digits_held_out(input_name))
        try:
            result = federated.federate_deployed(repo, ref.name, settings, held_out, args.listen, version=ref.version,
                                                 canary=not args.no_canary, tls=tls, force=args.force,
                                                 authorized_keys=authorized_keys,
                                                 **given(args, join_timeout_s="join_timeout"))
        except Terminated as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 128 + signal.SIGTERM
    else:
        data = (federated.load_training_data(args.data, input_name) if args.data
                else federated.digits_training_data(input_name))
        result = federated.federate(repo, ref.name, settings, data, version=ref.version,
                                    partition=parse_partition(args.partition), canary=not args.no_canary,
                                    force=args.force)
    _print_result(result, args.json)
    return 0


def _tls_files(args):
    """The --tls-cert/--tls-key pair, checked, or None; InvalidInput when only one is given or without --listen."""
    from leanserve.learn.federated.proxy import TlsFiles

    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise InvalidInput("--tls-cert and --tls-key: give both (the certificate and its private key) or neither")
    if not args.listen:
        raise InvalidInput("--tls-cert/--tls-key: only with --listen (a simulation opens no port)")
    return TlsFiles(Path(args.tls_cert), Path(args.tls_key)).check()


def _authorized_keys(args, tls):
    """The --authorized-keys file, read and checked, or None; InvalidInput without --listen or TLS."""
    from leanserve.learn.federated.keys import AuthorizedKeys

    if args.authorized_keys is None:
        return None
    if not args.listen:
        raise InvalidInput("--authorized-keys: only with --listen (simulated clients need no keys)")
    if tls is None:
        raise InvalidInput("--authorized-keys: needs --tls-cert and --tls-key (Flower's SuperNode authentication "
                           "runs only over TLS)")
    return AuthorizedKeys.load(args.authorized_keys)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"version": str(result.ref) if result.ref else None, "parent": str(result.parent),
                          "accuracy": result.accuracy, "failed_rounds": result.failed_rounds,
                          "dropped": [asdict(d) for d in result.dropped], "canary": result.canary}))
        return
    curve = " ".join(f"{a:.3f}" for a in result.accuracy)
    print(f"held-out accuracy per round (0 = {result.parent}): {curve}")
    for drop in result.dropped:
        print(f"  round {drop.round}: dropped client {drop.node}: {drop.reason}")
    if result.failed_rounds:
        print(f"  rounds without enough usable updates (global model kept): {result.failed_rounds}")
    if result.ref:
        print(f"registered {result.ref}" + (" as a guarded canary (a running server drives it)" if result.canary else ""))


def cmd_federate_client(args) -> int:
    from leanserve.learn.federated.deploy import run_client

    if args.new_key:
        return _new_key(args)
    for flag, value in (("--server", args.server), ("--data", args.data)):
        if value is None:
            raise InvalidInput(f"{flag}: required (or --new-key PATH to make a key pair)")
    if not Path(args.data).is_file():
        raise InvalidInput(f"--data {args.data}: no such file")
    run_client(args.server, Path(args.data), root_certificates=args.root_certificates, runtime_port=args.runtime_port,
               auth_key=args.auth_key)
    return 0  # not reached: run_client replaces this process with the SuperNode


def _new_key(args) -> int:
    from leanserve.learn.federated.keys import write_key_pair

    if args.server or args.data or args.auth_key:
        raise InvalidInput("--new-key: makes a key pair and exits; give it without --server, --data or --auth-key")
    private, public = write_key_pair(args.new_key)
    print(f"private key: {private} (keep it on this device; pass it as --auth-key)")
    print(f"public key:  {public} (add its line to the server's --authorized-keys file)")
    return 0
