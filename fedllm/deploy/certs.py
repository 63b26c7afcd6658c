"""`fedllm certs DIR`: a CA, a server certificate and node key pairs, for trying the
deployment on one machine or a small lab (use your organisation's CA in production).

TLS: the SuperLink presents `server.pem` (signed by `ca.crt`); devices verify it with
`ca.crt`. Node authentication: each device holds an ECDSA P-384 key pair in OpenSSH
format (what `ssh-keygen -t ecdsa -b 384` makes, and what Flower loads); the server
registers the public halves, and refuses any node whose key it does not know.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from fedllm import atomic
from fedllm.errors import FedllmError


def _write_private(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data)
    path.chmod(0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data)
    path.chmod(0o644)


def make_ca_and_server(out: Path, hosts: list[str], days: int = 365) -> tuple[Path, Path, Path]:
    """(ca.crt, server.pem, server.key) for `hosts` (names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedllm test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write_public(out / "ca.crt", ca.public_bytes(pem))
    _write_private(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    _write_public(out / "server.pem", cert.public_bytes(pem))
    _write_private(out / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return out / "ca.crt", out / "server.pem", out / "server.key"


def make_node_key(path: Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: `path` (private) and `path`.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    public = path.with_name(path.name + ".pub")
    _write_public(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
    return path, public


def make_certs(out: Path, nodes: int, hosts: list[str]) -> dict[str, Path]:
    if nodes < 0:
        raise FedllmError(f"--nodes={nodes}: give a number of node key pairs >= 0")
    if not hosts:
        raise FedllmError("give at least one --host the server is reached at (e.g. 127.0.0.1)")
    out = Path(out)
    if (out / "ca.key").exists():
        raise FedllmError(f"{out} already holds a CA (ca.key); use another directory, or delete it to start over")
    ca, cert, key = make_ca_and_server(out, hosts)
    made = {"ca": ca, "server_cert": cert, "server_key": key}
    for i in range(1, nodes + 1):
        made[f"node-{i}"] = make_node_key(out / "nodes" / f"node-{i}")[0]
    return made
