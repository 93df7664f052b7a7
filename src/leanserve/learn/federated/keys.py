"""Key material of a federation: the SuperNodes' authentication keys, and the SuperLink's private certificate.

Flower's SuperNode authentication (open-source Flower 1.42): the SuperLink, started with
``--enable-supernode-auth``, refuses the Fleet API's self-registration and lets a SuperNode in only when its
public key was registered beforehand through the Control API (``flwr supernode register``), and every Fleet
call is signed with the matching private key. Keys are elliptic-curve keys on a NIST curve (Flower makes
P-384 ones) in OpenSSH format: ``ecdsa-sha2-nistp384 AAAA...`` lines for the public halves, an
``OPENSSH PRIVATE KEY`` file for the SuperNode's own. Both ends insist on TLS: the SuperLink exits at start
with ``--enable-supernode-auth`` and ``--insecure``, a SuperNode with a key and no root certificates exits too.

The SuperLink behind leanserve's front listens only on a Unix socket in a private folder, but it still
wants TLS, so it gets a certificate made for it at start (``superlink_certificate``), trusted by the
programs that reach it through the socket and nothing else.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from leanserve.errors import InvalidInput

# The address Flower's server-side programs are told; the socket patch sends it to the Unix socket.
SUPERLINK_HOST = "127.0.0.1"


@dataclass(frozen=True)
class AuthorizedKeys:
    """The SuperNode public keys a federation admits (OpenSSH lines), read from ``path``."""

    path: Path
    keys: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> AuthorizedKeys:
        """The keys in ``path``: one OpenSSH EC public key per line, blank lines and ``#`` comments skipped,
        repeats kept once. Raises InvalidInput naming the file and line of a key Flower would refuse."""
        path = Path(path)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"--authorized-keys {path}: cannot read it ({exc})") from None
        keys: dict[str, None] = {}
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                _check_public_key(line, f"--authorized-keys {path}, line {number}")
                keys[" ".join(line.split()[:2])] = None  # the comment (third field) is no part of the key
        if not keys:
            raise InvalidInput(f"--authorized-keys {path}: no public key in it (one `ecdsa-sha2-nistp384 AAAA...` "
                               "line per SuperNode, as `leanserve federate-client --new-key` writes)")
        return cls(path, tuple(keys))


def _check_public_key(line: str, where: str) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        key = load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidInput(f"{where}: a {line.split()[0]} key; Flower authenticates SuperNodes with "
                           "elliptic-curve keys only (ecdsa-sha2-nistp384)")


def check_private_key(path: str | Path) -> Path:
    """``path`` if it holds an unencrypted OpenSSH elliptic-curve private key (what ``flower-supernode
    --auth-supernode-private-key`` reads); InvalidInput naming ``--auth-key`` otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = Path(path)
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except OSError as exc:
        raise InvalidInput(f"--auth-key {path}: cannot read it ({exc.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(f"--auth-key {path}: not an unencrypted OpenSSH private key ({exc}); make one with "
                           "`leanserve federate-client --new-key PATH`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"--auth-key {path}: not an elliptic-curve key; Flower authenticates SuperNodes with "
                           "ECDSA keys (`leanserve federate-client --new-key PATH` makes a P-384 one)")
    return path


def write_key_pair(path: str | Path) -> tuple[Path, Path]:
    """Make a P-384 key pair: the private key at ``path`` (OpenSSH format, readable by this user only) and
    its public line at ``path.pub``. Returns both paths; InvalidInput if either exists (nothing is overwritten)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = Path(path), Path(f"{path}.pub")
    for existing in (private, public):
        if existing.exists():
            raise InvalidInput(f"--new-key {path}: {existing} exists; not overwriting a key")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file created with mode 0600, so the key is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def superlink_certificate(folder: Path) -> Path:
    """Write a self-signed certificate for ``SUPERLINK_HOST`` and its key into ``folder`` (private to this
    user), valid for a year; returns ``folder``. The certificate is its own CA: ``cert.pem`` is what the
    SuperLink presents and what the programs reaching it through its socket trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leanserve federation superlink")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(SUPERLINK_HOST))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    _write_private(folder / "key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder
