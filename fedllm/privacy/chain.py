"""Tamper evidence for ledgers: a hash chain over the mechanism and every charge.

The rule is short enough for an auditor to re-implement without this code:

    canonical(x) = json.dumps(x, sort_keys=True, separators=(",", ":"))
    genesis      = sha256(canonical({k: ledger[k] for k in GENESIS_FIELDS + the GENESIS_OPTIONAL present}))
    entry.hash   = sha256(canonical({k: entry[k] for k in ENTRY_FIELDS + the ENTRY_OPTIONAL present}
                                    | {"prev_hash": prev}))

where `prev` is the genesis hash for the first entry and the previous entry's hash after
that; the ledger's `head` is the last hash (the genesis when there is no entry). Editing
the mechanism or an entry breaks its hash; deleting or reordering entries breaks the
`prev_hash` links; truncating the tail is caught by `head`, and by the server's record of
the rounds the client trained in (``fedllm audit`` compares both).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

GENESIS_FIELDS = ("client_id", "num_records", "delta", "target_epsilon", "noise_multiplier", "sample_rate",
                  "max_grad_norm", "planned_steps", "accountant", "sampling", "privacy_unit")
ENTRY_FIELDS = ("round", "noise_multiplier", "sample_rate", "steps", "kind", "run")
# Hashed where present: a hive's choice mechanism (its ledgers only), a record-count change's count.
GENESIS_OPTIONAL = ("planned_selections", "select_noise", "score_records")
ENTRY_OPTIONAL = ("num_records",)


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def genesis_hash(header: Mapping[str, Any]) -> str:
    return _sha256({**{k: header[k] for k in GENESIS_FIELDS},
                    **{k: header[k] for k in GENESIS_OPTIONAL if k in header}})


def entry_hash(entry: Mapping[str, Any], prev_hash: str) -> str:
    return _sha256({**_entry(entry), "prev_hash": prev_hash})


def _entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in (*ENTRY_FIELDS, *ENTRY_OPTIONAL) if k in entry}


def link(header: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(genesis, entries with `prev_hash` and `hash` filled in)."""
    prev = genesis = genesis_hash(header)
    chained = []
    for entry in entries:
        h = entry_hash(entry, prev)
        chained.append({**_entry(entry), "prev_hash": prev, "hash": h})
        prev = h
    return genesis, chained


def problems(ledger: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every break in `ledger`'s chain, as (field, what is wrong); [] when intact.

    `ledger` is a ledger file or a client report (both carry the chain).
    """
    found: list[tuple[str, str]] = []
    try:
        genesis = genesis_hash(ledger)
    except KeyError as exc:
        return [(str(exc.args[0]), "missing; the chain cannot be checked")]
    if ledger.get("genesis") != genesis:
        found.append(("genesis", "does not match the recorded mechanism: one of " + ", ".join(GENESIS_FIELDS)
                      + " was edited after the ledger was created"))
    history = ledger.get("history")
    if not isinstance(history, list):
        return found + [("history", "missing or not a list")]
    prev = ledger.get("genesis", genesis)
    for i, entry in enumerate(history):
        where = f"history[{i}]"
        if not isinstance(entry, Mapping) or any(k not in entry for k in (*ENTRY_FIELDS, "prev_hash", "hash")):
            found.append((where, "malformed entry (needs " + ", ".join((*ENTRY_FIELDS, "prev_hash", "hash")) + ")"))
            return found
        if entry["prev_hash"] != prev:
            found.append((where, f"prev_hash does not link to the entry before (round {entry['round']}): "
                                 "an entry was deleted, inserted or reordered here"))
        if entry_hash(entry, entry["prev_hash"]) != entry["hash"]:
            found.append((where, f"contents do not match its hash (round {entry['round']}): an entry was edited"))
        prev = entry["hash"]
    if ledger.get("head") != prev:
        found.append(("head", "is not the hash of the last entry: entries were removed from the end, "
                              "or the file was edited"))
    return found
