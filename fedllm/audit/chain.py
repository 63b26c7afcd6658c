"""The ledger's hash chain, re-derived from its written rule (`fedllm/privacy/chain.py`'s
docstring) without importing the code that wrote it: an auditor's own implementation.

    canonical(x) = json.dumps(x, sort_keys=True, separators=(",", ":"))
    genesis      = sha256(canonical({k: ledger[k] for k in GENESIS_FIELDS + the GENESIS_OPTIONAL present}))
    entry.hash   = sha256(canonical({k: entry[k] for k in ENTRY_FIELDS + the ENTRY_OPTIONAL present}
                                    | {"prev_hash": prev}))
    head         = the last entry's hash (the genesis when there is none)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

GENESIS_FIELDS = ("client_id", "num_records", "delta", "target_epsilon", "noise_multiplier", "sample_rate",
                  "max_grad_norm", "planned_steps", "accountant", "sampling", "privacy_unit")
ENTRY_FIELDS = ("round", "noise_multiplier", "sample_rate", "steps", "kind", "run")
# Hashed where present: a hive's choice mechanism (its ledgers only), a record-count change's count.
GENESIS_OPTIONAL = ("planned_selections", "select_noise", "score_records")
ENTRY_OPTIONAL = ("num_records",)


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def problems(ledger: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every break in the chain of a ledger file or client report, as (field, what is wrong)."""
    try:
        genesis = _sha256({**{k: ledger[k] for k in GENESIS_FIELDS},
                           **{k: ledger[k] for k in GENESIS_OPTIONAL if k in ledger}})
    except KeyError as exc:
        return [(str(exc.args[0]), "missing; the chain cannot be checked")]
    found: list[tuple[str, str]] = []
    if ledger.get("genesis") != genesis:
        found.append(("genesis", "does not match the recorded mechanism: one of " + ", ".join(GENESIS_FIELDS)
                      + " was edited after the ledger was created"))
    history = ledger.get("history")
    if not isinstance(history, list):
        return found + [("history", "missing or not a list")]
    prev = ledger.get("genesis", genesis)
    for i, entry in enumerate(history):
        needed = (*ENTRY_FIELDS, "prev_hash", "hash")
        if not isinstance(entry, Mapping) or any(k not in entry for k in needed):
            return found + [(f"history[{i}]", "malformed entry (needs " + ", ".join(needed) + ")")]
        if entry["prev_hash"] != prev:
            found.append((f"history[{i}]", f"prev_hash does not link to the entry before (round {entry['round']}): "
                                           "an entry was deleted, inserted or reordered here"))
        hashed = {k: entry[k] for k in (*ENTRY_FIELDS, *ENTRY_OPTIONAL) if k in entry}
        if _sha256({**hashed, "prev_hash": entry["prev_hash"]}) != entry["hash"]:
            found.append((f"history[{i}]", f"contents do not match its hash (round {entry['round']}): "
                                           "an entry was edited"))
        prev = entry["hash"]
    if ledger.get("head") != prev:
        found.append(("head", "is not the hash of the last entry: entries were removed from the end, "
                              "or the file was edited"))
    return found
