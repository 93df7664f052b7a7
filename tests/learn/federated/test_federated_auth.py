"""`leanserve federate --listen --authorized-keys`, tried as an attacker: SuperNodes without a key, or with a key
the server never authorized, are refused and never train; the SuperNode holding an authorized key trains and
its update becomes the new version. And the keys and flags around it, refused when Flower would refuse them."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import numpy as np
import pytest
from conftest import free_port, wait_until

pytest.importorskip("flwr")
pytest.importorskip("torch")

from test_federated import (  # noqa: E402
    NO_PHONING_HOME,
    _leanserve,
    _stop,
    _untrained_cnn_repo,
    self_signed_certificate,
)

from leanserve.errors import InvalidInput  # noqa: E402
from leanserve.learn.federated.deploy import supernode_command  # noqa: E402
from leanserve.learn.federated.keys import AuthorizedKeys, check_private_key, write_key_pair  # noqa: E402


def _client(root, port: int, name: str, data, *extra) -> subprocess.Popen:
    """A `leanserve federate-client` trusting the server's certificate, its output in ``root/name.log``."""
    with (root / f"{name}.log").open("w") as log:
        return subprocess.Popen(_leanserve("federate-client", "--server", f"127.0.0.1:{port}", "--data", data,
                                           "--root-certificates", root / "cert.pem", *extra),
                                env={**os.environ, **NO_PHONING_HOME, "FLWR_HOME": str(root / f"home-{name}")},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _exit_status(process: subprocess.Popen, timeout_s: float) -> int | None:
    """``process``'s exit status once it exits by itself, or None if it is still running after ``timeout_s``."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="module")
def guarded_federation(tmp_path_factory, digits):
    """One round of `leanserve federate --listen` in TLS that authorizes one SuperNode key. Two attackers go
    first, each with poisoned data (a NaN image, so any update of theirs would be dropped, visibly): one with
    no key, one with a key of its own. Once both have stopped, the member joins with the authorized key.
    Returns (repo, server status, server stdout, server stderr, {attacker: exit status or None}, root)."""
    root = tmp_path_factory.mktemp("guarded")
    repo = _untrained_cnn_repo(root)
    x_train, x_test, y_train, y_test = digits
    np.savez(root / "member.npz", image=x_train, labels=y_train)
    poisoned = x_train[:64].copy()
    poisoned[0, 0, 0, 0] = np.nan
    np.savez(root / "poisoned.npz", image=poisoned, labels=y_train[:64])
    np.savez(root / "eval.npz", image=x_test, labels=y_test)
    cert, key = self_signed_certificate(root)
    member_key, member_pub = write_key_pair(root / "member-key")
    stranger_key, _ = write_key_pair(root / "stranger-key")
    (root / "authorized").write_text(f"# the one member of this federation\n\n{member_pub.read_text()}")
    port, server_log = free_port(), root / "server.err"
    with server_log.open("w") as err:
        server = subprocess.Popen(_leanserve("federate", "cnn", "--repo", repo.root, "--listen", f"127.0.0.1:{port}",
                                             "--clients", 1, "--rounds", 1, "--local-epochs", 1, "--data",
                                             root / "eval.npz", "--join-timeout", 240, "--json", "--tls-cert", cert,
                                             "--tls-key", key, "--authorized-keys", root / "authorized"),
                                  env={**os.environ, **NO_PHONING_HOME}, stdout=subprocess.PIPE, stderr=err, text=True,
                                  start_new_session=True)
    clients = []
    try:
        wait_until(lambda: "0 of 1 clients connected" in server_log.read_text() or server.poll() is not None,
                   timeout_s=150, interval_s=0.5, what="the federation to wait for its clients")
        clients += [_client(root, port, "keyless", root / "poisoned.npz"),
                    _client(root, port, "stranger", root / "poisoned.npz", "--auth-key", stranger_key)]
        refused = {name: _exit_status(p, timeout_s=120) for name, p in zip(("keyless", "stranger"), clients)}
        clients.append(_client(root, port, "member", root / "member.npz", "--auth-key", member_key))
        out, _ = server.communicate(timeout=280)
    finally:
        _stop(server)
        for client in clients:
            _stop(client)
    return repo, server.returncode, out, server_log.read_text(), refused, root


def test_a_supernode_without_a_key_is_refused_and_stops(guarded_federation):
    *_, refused, root = guarded_federation
    log = (root / "keyless.log").read_text()
    assert refused["keyless"] not in (None, 0), log[-2000:]
    assert "All SuperNodes must be registered" in log, log[-2000:]  # Flower's refusal, not some other failure


def test_a_supernode_with_a_key_the_server_never_authorized_is_refused_and_stops(guarded_federation):
    *_, refused, root = guarded_federation
    log = (root / "stranger.log").read_text()
    assert refused["stranger"] not in (None, 0), log[-2000:]
    assert "Failed to activate SuperNode" in log, log[-2000:]


def test_only_the_authorized_supernode_trains_and_its_update_becomes_the_new_version(guarded_federation):
    repo, code, out, err, _, _ = guarded_federation
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert (result["version"], result["parent"]) == ("cnn:2", "cnn:1")
    # Had an attacker been let in, the round would have started with it (one client is all it waits for) and
    # its NaN update would be dropped here.
    assert result["dropped"] == [] and result["failed_rounds"] == []
    assert result["accuracy"][-1] > result["accuracy"][0] + 0.1
    assert re.findall(r"(\d+) of 1 clients connected", err) == ["0", "1"]
    assert repo.versions("cnn") == [1, 2]


# --- keys and flags ----------------------------------------------------------------------------------------

def test_new_key_writes_a_private_key_only_its_owner_reads_and_a_public_line_the_server_accepts(tmp_path, capsys):
    from leanserve.cli import main

    assert main(["federate-client", "--new-key", str(tmp_path / "node")]) == 0
    assert stat.S_IMODE((tmp_path / "node").stat().st_mode) == 0o600
    assert check_private_key(tmp_path / "node") == tmp_path / "node"
    keys = AuthorizedKeys.load(tmp_path / "node.pub")
    assert len(keys.keys) == 1 and keys.keys[0].startswith("ecdsa-sha2-nistp384 ")
    before = (tmp_path / "node").read_bytes()
    assert main(["federate-client", "--new-key", str(tmp_path / "node")]) != 0
    assert "not overwriting" in capsys.readouterr().err and (tmp_path / "node").read_bytes() == before


def test_authorized_keys_name_the_line_of_a_key_flower_cannot_authenticate(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    _, good = write_key_pair(tmp_path / "good")
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH)
    (tmp_path / "keys").write_text(good.read_text() + ed.decode() + "\n")
    with pytest.raises(InvalidInput, match=r"keys, line 2: a ssh-ed25519 key"):
        AuthorizedKeys.load(tmp_path / "keys")
    (tmp_path / "keys").write_text(good.read_text() + "not a key\n")
    with pytest.raises(InvalidInput, match=r"line 2: not an OpenSSH public key"):
        AuthorizedKeys.load(tmp_path / "keys")
    (tmp_path / "keys").write_text("# nobody yet\n")
    with pytest.raises(InvalidInput, match="no public key in it"):
        AuthorizedKeys.load(tmp_path / "keys")


def test_the_same_key_listed_twice_is_registered_once(tmp_path):
    _, public = write_key_pair(tmp_path / "node")
    line = public.read_text().strip()
    (tmp_path / "keys").write_text(f"{line}\n{line} laptop\n")
    assert AuthorizedKeys.load(tmp_path / "keys").keys == (line,)


@pytest.mark.parametrize("flags, message", [
    (["--listen", "127.0.0.1:9092"], "--authorized-keys: needs --tls-cert and --tls-key"),
    ([], "--authorized-keys: only with --listen"),
])
def test_authorized_keys_without_listen_or_tls_are_refused_naming_the_flag(tmp_path, capsys, flags, message):
    from leanserve.cli import main

    _, public = write_key_pair(tmp_path / "node")
    code = main(["federate", "cnn", "--repo", str(tmp_path / "repo"), "--authorized-keys", str(public), *flags])
    assert code != 0 and message in capsys.readouterr().err


def test_fewer_authorized_keys_than_clients_are_refused_before_anything_starts(tmp_path):
    from leanserve.learn.federated import core as federated
    from leanserve.learn.federated.server import RoundSettings

    _, public = write_key_pair(tmp_path / "node")
    with pytest.raises(InvalidInput, match="--clients 2: .* admits only 1 SuperNode"):
        federated.federate_deployed(None, "cnn", RoundSettings(clients=2), None, "127.0.0.1:9092",
                                    tls=object(), authorized_keys=AuthorizedKeys.load(public))


def test_a_supernode_key_without_root_certificates_is_refused_naming_the_flag(tmp_path):
    key, _ = write_key_pair(tmp_path / "node")
    with pytest.raises(InvalidInput, match="--auth-key: needs --root-certificates"):
        supernode_command("127.0.0.1:9092", tmp_path / "d.npz", auth_key=str(key))


def test_the_supernode_signs_with_the_key_it_was_given(tmp_path):
    key, _ = write_key_pair(tmp_path / "node")
    command = supernode_command("127.0.0.1:9092", tmp_path / "d.npz", root_certificates="ca.pem", auth_key=str(key))
    assert command[command.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert "--insecure" not in command


def test_a_private_key_flower_cannot_read_is_refused_naming_the_flag(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pkcs8 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "node").write_bytes(pkcs8)
    with pytest.raises(InvalidInput, match="--auth-key .*not an unencrypted OpenSSH private key"):
        check_private_key(tmp_path / "node")
