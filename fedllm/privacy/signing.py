"""A device's signature on its epsilon reports, so an auditor can trust a report without
trusting the server's files: whoever can write a run directory can re-link a hash chain,
but cannot sign for a device.

Each state store holds an Ed25519 key made on the device at its first private use
(`signing.key`, 0600; its public half in `signing.pub`). A report is signed over

    b"fedllm epsilon report v1\\n" + canonical({client_id, genesis, head, epsilon, declined})

(canonical: `json.dumps(..., sort_keys=True, separators=(",", ":"))`): the head covers the
whole chain, the genesis the mechanism. The operator registers each device's public key
(`fedllm client key`), and `fedllm audit --keys` checks every report against it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedllm.errors import FedllmError

KEY_FILE, PUBLIC_FILE = "signing.key", "signing.pub"
SIGNED_FIELDS = ("client_id", "genesis", "head", "epsilon", "declined")
PREFIX = b"fedllm epsilon report v1\n"


def signed_bytes(report: dict[str, Any]) -> bytes:
    return PREFIX + json.dumps({k: report[k] for k in SIGNED_FIELDS}, sort_keys=True, separators=(",", ":")).encode()


def device_key(store_dir: Path):
    """The device's signing key in `store_dir`, made there on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(store_dir) / KEY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise FedllmError(f"{path} is not a readable signing key ({exc}); move it aside: the device makes a new "
                              "one, whose public half its operator must register again (fedllm client key)") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise FedllmError(f"{path} is not an Ed25519 key; move it aside (the device makes a new one)")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    (Path(store_dir) / PUBLIC_FILE).write_text(public_hex(key) + "\n")
    return key


def public_hex(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign(report: dict[str, Any], store_dir: Path) -> dict[str, Any]:
    """`report` with the device's signature and the public half of its key."""
    key = device_key(store_dir)
    return {**report, "signature": key.sign(signed_bytes(report)).hex(), "signing_key": public_hex(key)}
