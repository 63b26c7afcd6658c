"""The audit's checks that need no trust in whoever wrote the run directory.

A hash chain proves order, not authorship: anyone who can write the files can drop a
charge and re-link it. Three checks close that:

- signature: each device signs its report's head with an Ed25519 key kept in its state
  store; the auditor verifies it against a key it got from the operator (`--keys`, what
  `fedllm client key` printed on each device) or from the device's store, never against
  the key a report names for itself;
- records: every record-count change carries the count, its sample rate must be the one
  that count gives, and in this run the count in force must be what the device declared
  to the server at discovery;
- select: a hive round whose specialists differed (the server records it) shows a choice
  charged before the training charge, at the noise the ledger's header pins; an evaluation
  with another specialist than 0 among ones that differed shows a choice charged in or
  before it (in the final round: in it).

Re-implemented here from the documented formats (docs/auditing.md), not imported from the
code that signs: the audit checks that code, it does not reuse it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm.audit.evidence import Checker, ServerRecord

SIGNED = ("client_id", "genesis", "head", "epsilon", "declined")
PREFIX = b"fedllm epsilon report v1\n"


def read_keys(path: Path | str) -> dict[str, str]:
    """`--keys FILE`: a JSON object client id -> public key (64 hex digits)."""
    from fedllm.errors import FedllmError

    try:
        keys = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise FedllmError(f"--keys {path}: unreadable ({exc}); give a JSON object of client id -> public key "
                          "(fedllm client key prints a device's)") from None
    if not isinstance(keys, dict) or not all(isinstance(k, str) and _hex_key(v) for k, v in keys.items()):
        raise FedllmError(f"--keys {path}: expected a JSON object of client id -> 64 hex digits (an Ed25519 public "
                          "key, as fedllm client key prints it)")
    return {k: v.strip().lower() for k, v in keys.items()}


def _hex_key(value: Any) -> bool:
    try:
        return isinstance(value, str) and len(bytes.fromhex(value.strip())) == 32
    except ValueError:
        return False


def trusted_key(client: str, keys: Mapping[str, str] | None, store: Path | None) -> tuple[str | None, str]:
    """(the public key to verify `client`'s report with, where it came from)."""
    if keys is not None:
        return keys.get(client), "--keys"
    if store is not None and (store / "signing.pub").is_file():
        text = (store / "signing.pub").read_text().strip()
        return (text.lower() if _hex_key(text) else None), str(store / "signing.pub")
    return None, ""


def check_signature(check: Checker, report: Mapping[str, Any], key: str | None, source: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signature = report.get("signature")
    if not isinstance(signature, str) or not signature:
        check("signature", False, "signature", "the report is unsigned: nothing shows the device made it")
        return
    if key is None:
        check("signature", False, "signature", f"no trusted public key for this client ({source or 'none given'}): "
              "give --keys (what fedllm client key prints on each device) or the devices' state stores")
        return
    if report.get("signing_key", key) != key:
        check("signature", False, "signing_key", f"signed with key {str(report.get('signing_key'))[:16]}..., not "
              f"the device's {key[:16]}... ({source})")
        return
    try:
        body = PREFIX + json.dumps({k: report.get(k) for k in SIGNED}, sort_keys=True, separators=(",", ":")).encode()
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(bytes.fromhex(signature), body)
    except (InvalidSignature, ValueError):
        check("signature", False, "signature", f"does not verify with the device's key ({source}): the report was "
              "changed after the device signed it, or signed by someone else")
        return
    check("signature", True)


def expected_rate(n: int, batch: int) -> float:
    return 1.0 / -(-n // min(batch, n))


def check_records(check: Checker, report: Mapping[str, Any], batch: int | None, declared: int | None,
                  run_id: str) -> None:
    """Each `records` entry's count and rate, and the count in force in this run against
    the one the device declared at discovery."""
    history, n0, rate0 = report["history"], int(report["num_records"]), float(report["sample_rate"])
    largest = max([n0] + [e["num_records"] for e in history if isinstance(e.get("num_records"), int)])
    batches = [batch] if batch else _batches(n0, rate0, largest)
    problems, counts = [], n0
    in_force_at_run: int | None = None
    for i, e in enumerate(history):
        if run_id and e.get("run", "") == run_id and e.get("kind") != "records" and in_force_at_run is None:
            in_force_at_run = counts
        if e.get("kind") != "records":
            continue
        n = e.get("num_records")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(f"history[{i}] changes the record count without saying it (num_records)")
            continue
        if not any(abs(float(e["sample_rate"]) - expected_rate(n, b)) <= 1e-12 for b in batches):
            problems.append(f"history[{i}]: rate {e['sample_rate']} is not what {n} records give "
                            f"(batch size {batch or 'the header implies'})")
        counts = n
        if run_id and e.get("run", "") == run_id and in_force_at_run is None:
            in_force_at_run = n
    if declared is not None and in_force_at_run is not None and in_force_at_run != declared:
        problems.append(f"charged as {in_force_at_run} records in this run, but the device declared {declared} "
                        "at discovery")
    check("records", not problems, "history[].num_records", "; ".join(problems[:3]))


def _batches(n: int, rate: float, largest: int) -> range:
    """The batch sizes b that give the header's `rate` over its `n` records (no config at
    hand): 1/rate = ceil(n / min(b, n)); `largest`, the largest count any entry names."""
    if not (0 < rate <= 1) or n < 1:
        return range(0)
    m = round(1 / rate)
    if m <= 1:
        return range(n, max(n, largest) + 1)
    return range(math.ceil(n / m), math.ceil(n / (m - 1)))


def check_selects(check: Checker, report: Mapping[str, Any], server: ServerRecord | None, run_id: str) -> None:
    """In a hive round whose specialists differed, the device's choice read its records:
    its charge must come right before the training charge, at the header's select noise."""
    history = report["history"]
    noise = report.get("select_noise")
    problems = []
    for i, e in enumerate(history):
        if e.get("kind") == "select" and noise is not None and float(e["noise_multiplier"]) != float(noise):
            problems.append(f"history[{i}]: a choice charged at noise {e['noise_multiplier']}, but the device's "
                            f"votes carry select noise {noise} (sensitivity 1)")
    if server is not None:
        for i, e in enumerate(history):
            if e.get("run", "") != run_id or e.get("kind") not in (None, "", "train"):
                continue
            r = int(e["round"])
            if server.hive_differed.get(r):
                before = history[i - 1] if i > 0 else {}
                if before.get("kind") != "select" or int(before.get("round", -1)) != r:
                    problems.append(f"history[{i}]: round {r} trained one of specialists that differed, with no "
                                    "choice charged before it")
        problems += _evaluation_selects(history, server, run_id)
    if problems or noise is not None or (server is not None and server.hive_differed):
        check("select", not problems, "history[].kind", "; ".join(problems[:3]))
    else:
        check("select", None, "", "not a hive run")


def _evaluation_selects(history: list, server: ServerRecord, run_id: str) -> list[str]:
    """An evaluation among specialists that differed used a choice that read the records: one
    the device keeps from an earlier charged choice, or, in the final round (the specialists it
    personalises from), one charged in that round. Specialist 0 is also what a device takes
    when it cannot pay (chosen without its data), so only another specialist needs its charge."""
    selects = [int(e["round"]) for e in history if e.get("kind") == "select" and e.get("run", "") == run_id]
    problems = []
    for r, (specialist, final) in sorted(server.hive_evaluated.items()):
        if specialist == 0:
            continue
        if final and r not in selects:
            problems.append(f"round {r} (the last) evaluated specialist {specialist} with no choice charged in it")
        elif not any(s <= r for s in selects):
            problems.append(f"round {r} evaluated specialist {specialist} with no choice charged in or before it")
    return problems
