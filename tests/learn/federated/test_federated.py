"""Federated learning with Flower: a real simulation (Flower's engine on Ray, 10 clients), a real deployment
(`leanserve federate --listen` and `leanserve federate-client` processes on loopback), bad updates screened
out of rounds with a reason, and the result registered as a guarded canary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, wait_until

pytest.importorskip("flwr")
pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from leanserve.errors import InvalidInput, LeanserveError  # noqa: E402
from leanserve.learn.federated import core as federated  # noqa: E402
from leanserve.learn.federated.client import build_client_app, load_client_data, train_locally  # noqa: E402
from leanserve.learn.federated.server import FedProxM, RoundSettings, RoundsOutcome, build_strategy  # noqa: E402
from leanserve.learn.partition import by_class, dirichlet, iid, parse_partition  # noqa: E402
from leanserve.repository import VersionRef  # noqa: E402

CLIENTS = 10


def _untrained_cnn_repo(root: Path):
    """A repository whose version 1 is the demo CNN, untrained, with its PyTorch source attached."""
    from leanserve.demo import build_cnn
    from leanserve.from_torch import export
    from leanserve.repository import Repository
    from leanserve.torch_source import save_source

    torch.manual_seed(0)
    module, example = build_cnn().eval(), torch.zeros(2, 1, 28, 28)
    export(module, example, root / "cnn.onnx", input_names=["image"], output_names=["logits"])
    repo = Repository(root / "repo")
    repo.add(root / "cnn.onnx", "cnn", attachments=[save_source(module, example, root)])
    return repo


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, digits):
    """Two FedAvg rounds over 10 simulated clients; client 0's data has a NaN image, so its update is NaN."""
    root = tmp_path_factory.mktemp("federated")
    repo = _untrained_cnn_repo(root)
    x_train, x_test, y_train, y_test = digits
    paths = []
    for client, idx in enumerate(iid(y_train, CLIENTS)):
        images = x_train[idx].copy()
        if client == 0:
            images[0, 0, 0, 0] = np.nan
        paths.append(str(root / f"client-{client}.npz"))
        np.savez(paths[-1], image=images, labels=y_train[idx])
    client_app = build_client_app(lambda context: Path(paths[int(context.node_config["partition-id"])]))
    data = federated.TrainingData("image", x_test, y_test)  # the server holds out 20% of it
    settings = RoundSettings(rounds=2, clients=CLIENTS, local_epochs=1, lr=0.05)
    result = federated.federate(repo, "cnn", settings, data, client_app=client_app)
    return repo, result


def test_simulation_registers_the_aggregate_as_a_new_version_with_its_provenance(simulated):
    repo, result = simulated
    assert result.ref == VersionRef("cnn", 2) and result.parent == VersionRef("cnn", 1)
    manifest = repo.get("cnn", 2).manifest
    recipe = manifest.provenance.recipe
    assert (recipe["strategy"], recipe["rounds"], recipe["clients"], recipe["dp"]) == ("fedavg", 2, CLIENTS, None)
    assert manifest.provenance.parent == "cnn:1"
    assert len(recipe["per_round_accuracy"]) == 3  # before training, and after each round
    assert "torch_source.pt" in manifest.files


def test_each_round_improves_on_the_untrained_model_on_held_out_data(simulated):
    _, result = simulated
    assert len(result.accuracy) == 3
    assert result.accuracy[-1] > result.accuracy[0] + 0.1


def test_the_new_version_enters_as_a_guarded_canary(simulated):
    repo, result = simulated
    rollout = repo.config("cnn").rollout
    assert result.canary and (rollout.canary, rollout.primary) == (2, 1)


def test_a_client_sending_nans_is_dropped_with_a_reason_and_the_rounds_complete(simulated):
    repo, result = simulated
    assert [d.round for d in result.dropped] == [1, 2]
    assert all("NaN" in d.reason for d in result.dropped)
    assert result.failed_rounds == []
    assert len(repo.get("cnn", 2).manifest.provenance.recipe["dropped"]) == 2


# --- screening, on real Flower messages --------------------------------------------------------------------

@pytest.fixture
def flower_task():
    """Flower messages can only be built inside a run; give this process one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class _Grid:
    """The nodes a strategy may sample (Flower's grid API, without a network)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _round(strategy, nodes, replies_by_node):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    global_arrays = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, global_arrays, ConfigRecord(), _Grid(nodes))}
    replies = []
    for node, (w, b) in replies_by_node.items():
        content = RecordDict({"arrays": ArrayRecord({"w": Array(w), "b": Array(b)}), "metrics": MetricRecord({"num-examples": 10})})
        replies.append(Message(content, reply_to=sent[node]))
    return strategy.aggregate_train(1, replies)


def test_wrong_shaped_nan_and_missing_updates_are_dropped_and_the_rest_averaged(flower_task):
    strategy = build_strategy(RoundSettings(clients=5, min_fraction=0.4))  # two usable updates suffice
    ones, b = np.ones((2, 3), np.float32), np.ones(3, np.float32)
    arrays, _ = _round(strategy, [1, 2, 3, 4, 5], {
        1: (ones, b), 2: (3 * ones, b),
        3: (np.ones((3, 2), np.float32), b),            # wrong shape
        4: (np.full((2, 3), np.nan, np.float32), b),    # NaN
    })                                                   # 5 never replies
    assert np.allclose(arrays["w"].numpy(), 2.0)
    reasons = {d.node: d.reason for d in strategy.dropped}
    assert "shape [3, 2]" in reasons[3] and "NaN" in reasons[4] and "no reply" in reasons[5]
    assert set(reasons) == {3, 4, 5}


def test_a_round_with_too_few_usable_updates_keeps_the_global_model(flower_task):
    strategy = build_strategy(RoundSettings(clients=4))  # needs half of them
    nan = np.full((2, 3), np.nan, np.float32)
    arrays, metrics = _round(strategy, [1, 2, 3, 4], {1: (np.ones((2, 3), np.float32), np.ones(3, np.float32)),
                                                       2: (nan, np.ones(3, np.float32))})
    assert arrays is None and metrics is None and strategy.failed_rounds == [1]


def test_a_failed_client_is_dropped_with_its_error(flower_task):
    from flwr.app import ArrayRecord, ConfigRecord, Error, Message

    strategy = build_strategy(RoundSettings(clients=1))
    [sent] = strategy.configure_train(1, ArrayRecord({}), ConfigRecord(), _Grid([9]))
    assert strategy.aggregate_train(1, [Message(Error(code=1, reason="connection reset"), reply_to=sent)]) == (None, None)
    assert "connection reset" in strategy.dropped[0].reason


def test_dp_wraps_the_strategy_in_flowers_server_side_clipping():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    strategy = build_strategy(federated.with_dp(RoundSettings(strategy="fedprox", clients=3), "1.5,0.3"))
    assert isinstance(strategy.inner, DifferentialPrivacyServerSideFixedClipping)
    assert (strategy.inner.clipping_norm, strategy.inner.noise_multiplier) == (1.5, 0.3)
    assert isinstance(strategy.inner.strategy, FedProxM)


def test_fedprox_tells_each_client_its_proximal_mu(flower_task):
    from flwr.app import ArrayRecord, ConfigRecord

    strategy = build_strategy(RoundSettings(strategy="fedprox", clients=2, proximal_mu=0.3))
    sent = strategy.configure_train(1, ArrayRecord({}), ConfigRecord(), _Grid([1, 2]))
    assert [m.content["config"]["proximal-mu"] for m in sent] == [0.3, 0.3]


def test_server_momentum_carries_part_of_the_last_rounds_step_into_the_next(flower_task):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    def two_rounds(momentum: float) -> np.ndarray:
        strategy = build_strategy(RoundSettings(clients=1, server_momentum=momentum))
        weights = np.zeros(3, np.float32)
        for server_round, client_weights in ((1, 1.0), (2, 2.0)):
            [sent] = strategy.configure_train(server_round, ArrayRecord({"w": Array(weights)}), ConfigRecord(), _Grid([7]))
            reply = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, client_weights, np.float32))}),
                                "metrics": MetricRecord({"num-examples": 5})})
            arrays, _ = strategy.aggregate_train(server_round, [Message(reply, reply_to=sent)])
            weights = arrays["w"].numpy()
        return weights

    assert np.allclose(two_rounds(0.0), 2.0)  # plain averaging: where the client went
    assert np.allclose(two_rounds(0.9), 2.9)  # one step of 1, then 1 + 0.9 x 1


# --- clients, settings and data ----------------------------------------------------------------------------

def test_fedprox_proximal_term_keeps_local_weights_closer_to_the_global_model(digits):
    from leanserve.demo import build_cnn

    x, _, y, _ = digits
    distances = []
    for mu in (0.0, 1.0):
        torch.manual_seed(0)
        module = build_cnn()
        start = [p.detach().clone() for p in module.parameters()]
        train_locally(module, x[:64], y[:64], epochs=2, lr=0.05, batch_size=16, proximal_mu=mu)
        distances.append(sum(float(((p - s) ** 2).sum()) for p, s in zip(module.parameters(), start)))
    assert distances[1] < distances[0]


@pytest.mark.parametrize("text", ["1.0", "0,0.5", "a,b", "1.0,-1"])
def test_bad_dp_settings_are_refused_with_the_expected_form(text):
    with pytest.raises(InvalidInput, match="CLIP,NOISE"):
        federated.parse_dp(text)


def test_a_federation_that_completes_no_round_registers_nothing(tmp_path):
    repo = _untrained_cnn_repo(tmp_path)
    parent = VersionRef("cnn", 1)
    outcome = RoundsOutcome(state_dict={}, accuracy=[0.1], failed_rounds=[1])
    with pytest.raises(LeanserveError, match="no federated round completed"):
        federated.register_federated(repo, parent, None, outcome, RoundSettings(rounds=1), np.zeros((2, 1, 28, 28), np.float32))
    assert repo.versions("cnn") == [1]


def test_client_data_without_labels_is_refused_naming_what_is_missing(tmp_path):
    np.savez(tmp_path / "d.npz", image=np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(InvalidInput, match="labels"):
        load_client_data(tmp_path / "d.npz", "image")


def test_partitions_cover_every_row_once_and_skew_labels_as_asked():
    labels = np.repeat(np.arange(10), 50)
    for parts in (iid(labels, 10), dirichlet(labels, 10, alpha=0.5), by_class(labels, 10, classes_per_client=2)):
        assert sorted(np.concatenate(parts).tolist()) == list(range(500))
    assert all(len(np.unique(labels[p])) == 2 for p in by_class(labels, 10))
    with pytest.raises(InvalidInput, match="dirichlet:ALPHA"):
        parse_partition("dirichlet:-1")


@pytest.mark.parametrize("model", ["affine", "affine:1"])
def test_federate_command_refuses_a_version_without_a_pytorch_source(tmp_path, affine_repo, capsys, model):
    from leanserve.cli import main

    code = main(["federate", model, "--repo", str(affine_repo.root), "--rounds", "1", "--data", str(tmp_path / "x.npz")])
    assert code != 0
    assert "has no PyTorch source" in capsys.readouterr().err  # MODEL:VERSION names the version like --version


# --- a real deployment: server and client processes on loopback ---------------------------------------------

NO_PHONING_HOME = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                   "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "ORT_DISABLE_TELEMETRY": "1"}


def test_flower_processes_run_without_telemetry_update_checks_or_installs(monkeypatch, tmp_path):
    from leanserve.learn.federated.deploy import flower_env

    for key in NO_PHONING_HOME:
        monkeypatch.delenv(key, raising=False)
    env = flower_env(tmp_path)
    assert {k: env[k] for k in NO_PHONING_HOME} == NO_PHONING_HOME
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # Flower starts helpers by name


def _leanserve(*args) -> list[str]:
    return [sys.executable, "-m", "leanserve.cli", *map(str, args)]


def _live_processes_mentioning(text: str) -> list[str]:
    """Command lines of running (not zombie) processes that contain ``text`` in their command line, or in their
    environment (every server-side Flower process of a federation has the SuperLink's socket path there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if (text in cmdline or text in environ) and state != "Z" and proc.name != str(os.getpid()):
            found.append(cmdline)
    return found


def _no_process_left(port: int) -> bool:
    """No process of a federation on ``port`` lives: none naming the port, and no Flower process of any
    federation (whose environment names its SuperLink's socket)."""
    from leanserve.learn.federated.socket_patch import SOCKET_ENV

    return not _live_processes_mentioning(f"127.0.0.1:{port}") and not _live_processes_mentioning(f"{SOCKET_ENV}=")


def _stop(process: subprocess.Popen) -> None:
    """Stop ``process`` and its process group (every test-started process leads one: start_new_session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)  # what the leader left behind in its group
    except ProcessLookupError:
        pass


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files of a self-signed certificate for 127.0.0.1 and localhost."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, digits):
    """`leanserve federate --listen` on a loopback port in TLS and three `leanserve federate-client` processes
    trusting its certificate, two rounds; client 2's data has a NaN image, so its updates are NaN."""
    root = tmp_path_factory.mktemp("deployed")
    repo = _untrained_cnn_repo(root)
    x_train, x_test, y_train, y_test = digits
    files = []
    for client, idx in enumerate(iid(y_train, 3)):
        images = x_train[idx].copy()
        if client == 2:
            images[0, 0, 0, 0] = np.nan
        files.append(root / f"client-{client}.npz")
        np.savez(files[-1], image=images, labels=y_train[idx])
    np.savez(root / "eval.npz", image=x_test, labels=y_test)
    cert, key = self_signed_certificate(root)
    port, env = free_port(), {**os.environ, **NO_PHONING_HOME}
    server = subprocess.Popen(_leanserve("federate", "cnn", "--repo", repo.root, "--listen", f"127.0.0.1:{port}",
                                         "--clients", 3, "--rounds", 2, "--local-epochs", 1, "--data", root / "eval.npz",
                                         "--join-timeout", 120, "--json",
                                         "--tls-cert", cert, "--tls-key", key),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    clients = [subprocess.Popen(_leanserve("federate-client", "--server", f"127.0.0.1:{port}", "--data", path,
                                           "--root-certificates", cert),
                                env={**env, "FLWR_HOME": str(root / f"home-{n}")},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for n, path in enumerate(files)]
    try:
        out, err = server.communicate(timeout=280)
    finally:
        _stop(server)
        for client in clients:
            _stop(client)
    return repo, port, server.returncode, out, err


def test_a_real_federation_registers_the_aggregate_with_its_provenance(deployed):
    repo, _, code, out, err = deployed
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert (result["version"], result["parent"], result["canary"]) == ("cnn:2", "cnn:1", True)
    provenance = repo.get("cnn", 2).manifest.provenance
    assert provenance.source == "leanserve federate (deployment)" and provenance.parent == "cnn:1"
    assert (provenance.recipe["rounds"], provenance.recipe["clients"]) == (2, 3)
    assert result["accuracy"][-1] > result["accuracy"][0] + 0.1


def test_a_real_client_sending_nans_is_dropped_with_a_logged_reason_and_the_rounds_complete(deployed):
    _, _, code, out, err = deployed
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert [d["round"] for d in result["dropped"]] == [1, 2] and result["failed_rounds"] == []
    assert len({d["node"] for d in result["dropped"]}) == 1
    assert all("NaN" in d["reason"] for d in result["dropped"])
    assert f"dropped client {result['dropped'][0]['node']}: parameter" in err


def test_a_real_federation_leaves_no_flower_process_running(deployed):
    _, port, _, _, _ = deployed
    wait_until(lambda: _no_process_left(port), timeout_s=20, interval_s=0.2, what="Flower processes to exit")


def test_federate_listen_refuses_a_port_in_use(tmp_path, capsys):
    from leanserve.cli import main

    repo = _untrained_cnn_repo(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["federate", "cnn", "--repo", str(repo.root), "--listen", f"127.0.0.1:{port}", "--data",
                     str(_eval_file(tmp_path))])
    assert code != 0
    assert f"--listen 127.0.0.1:{port}: cannot listen there" in capsys.readouterr().err


def test_a_real_federation_says_how_many_clients_joined_when_too_few_do(tmp_path):
    repo = _untrained_cnn_repo(tmp_path)
    port = free_port()
    held_out = federated.load_training_data(_eval_file(tmp_path), "image")
    with pytest.raises(LeanserveError, match="only 0 of 2 clients joined within 2 s"):
        federated.federate_deployed(repo, "cnn", RoundSettings(clients=2, rounds=1), held_out, f"127.0.0.1:{port}",
                                    join_timeout_s=2)
    assert repo.versions("cnn") == [1]
    wait_until(lambda: _no_process_left(port), timeout_s=20, interval_s=0.2, what="Flower processes to exit")


def test_ctrl_c_stops_a_waiting_federation_and_every_flower_process(tmp_path):
    repo = _untrained_cnn_repo(tmp_path)
    port = free_port()
    server = subprocess.Popen(_leanserve("federate", "cnn", "--repo", repo.root, "--listen", f"127.0.0.1:{port}",
                                         "--clients", 2, "--join-timeout", 90, "--data", _eval_file(tmp_path)),
                              env={**os.environ, **NO_PHONING_HOME}, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        for line in server.stderr:  # the ServerApp is running once it reports who has joined
            if "0 of 2 clients connected" in line or time.monotonic() > deadline:
                break
        server.send_signal(signal.SIGINT)
        assert server.wait(60) == 130
    finally:
        _stop(server)
        server.stderr.close()
    wait_until(lambda: _no_process_left(port), timeout_s=20, interval_s=0.2, what="Flower processes to exit")


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key: give both"),
    (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert {missing}: no such file"),
    (["--tls-cert", "{key}", "--tls-key", "{key}"], "not a PEM certificate and its private key"),
])
def test_federate_listen_refuses_unusable_tls_files_naming_the_flag(tmp_path, capsys, flags, message):
    from leanserve.cli import main

    repo = _untrained_cnn_repo(tmp_path)
    cert, key = self_signed_certificate(tmp_path)
    paths = {"cert": cert, "key": key, "missing": tmp_path / "missing.pem"}
    code = main(["federate", "cnn", "--repo", str(repo.root), "--listen", f"127.0.0.1:{free_port()}",
                 *[f.format(**paths) for f in flags]])
    assert code != 0
    assert message.format(**paths) in capsys.readouterr().err


def test_federate_client_refuses_a_data_file_that_is_not_npz(tmp_path, capsys):
    from leanserve.cli import main

    (tmp_path / "data.npz").write_text("not numpy")
    assert main(["federate-client", "--server", "127.0.0.1:9092", "--data", str(tmp_path / "data.npz")]) != 0
    assert "not a readable .npz file" in capsys.readouterr().err


def test_the_supernode_command_names_its_data_and_its_own_runtime_port(tmp_path):
    from leanserve.learn.federated.deploy import supernode_command

    command = supernode_command("10.0.0.5:9092", tmp_path / "d.npz", runtime_port=9555)
    assert command[command.index("--superlink") + 1] == "10.0.0.5:9092"
    assert command[command.index("--node-config") + 1] == f'data-path="{tmp_path / "d.npz"}"'
    assert command[command.index("--port") + 1] == "9555" and "--insecure" in command
    with pytest.raises(InvalidInput, match="HOST:PORT"):
        supernode_command("10.0.0.5", tmp_path / "d.npz")


def _eval_file(folder: Path) -> Path:
    path = folder / "eval.npz"
    np.savez(path, image=np.zeros((4, 1, 28, 28), np.float32), labels=np.arange(4))
    return path
