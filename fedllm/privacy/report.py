"""Epsilon reports: what a client claims, with everything needed to recompute it, and the
schema a report must meet before a server stores it (`check_report`)."""

from __future__ import annotations

import json
import statistics
from typing import Any

from fedllm.privacy import chain
from fedllm.privacy.ledger import Ledger
from fedllm.privacy.signing import sign
from fedllm.untrusted import MAX_TEXT, number_in, say

MAX_REPORT_BYTES = 4 << 20

MECHANISM = "DP-SGD: Poisson-subsampled Gaussian mechanism on clipped per-record gradients of LoRA parameters"
SELECTION = ("; a hive's choice of specialist (history kind 'select'): report-noisy-max on per-record votes "
             "(L2 sensitivity 1: with score_records > 0 each record is scored or not independently, with "
             "probability min(1, score_records / num_records)) with Gaussian noise of std noise_multiplier, one "
             "unsampled release (sample rate 1)")
COVERS = ("the adapter updates sent to the server and everything computed from them (global adapters, "
          "checkpoints); not the plain metrics a client also sends: its record count, mean training loss and "
          "held-out metrics")


def client_report(ledger: Ledger, declined: str = "", requested_target: float | None = None) -> dict[str, Any]:
    """The ledger as a report. `requested_target`: the server's target for this request; a
    stricter one than the ledger's is applied, and recorded as `target_epsilon_applied`."""
    report = ledger.to_dict()
    applied = ledger.target_epsilon if requested_target is None else min(requested_target, ledger.target_epsilon)
    report.update({
        "mechanism": MECHANISM + (SELECTION if any(c.kind == "select" for c in ledger.history) else ""),
        "covers": COVERS,
        "epsilon": ledger.epsilon(),
        "declined": declined,
        "target_epsilon_applied": applied,
    })
    return sign(report, ledger.path.parent)  # the device's own key: a re-linked chain cannot carry it


def summarize(reports: dict[str, dict[str, Any]], declined: dict[str, list[int]]) -> dict[str, Any]:
    """Across clients: min/median/max epsilon and who declined (and in which rounds)."""
    eps = sorted(r["epsilon"] for r in reports.values())
    return {
        "clients_reporting": len(reports),
        "epsilon": {"min": eps[0], "median": statistics.median(eps), "max": eps[-1]} if eps else None,
        "target_epsilon": max((r["target_epsilon"] for r in reports.values()), default=None),
        "delta": max((r["delta"] for r in reports.values()), default=None),
        "over_target": sorted(c for c, r in reports.items() if r["epsilon"] > r["target_epsilon"] * (1 + 1e-9)),
        "declined": {c: rounds for c, rounds in sorted(declined.items())},
        "declines": sum(len(r) for r in declined.values()),
        "privacy_unit": next((r["privacy_unit"] for r in reports.values()), None),
    }


REPORT_FIELDS: dict[str, tuple] = {
    # field: (type, range or allowed values)
    "client_id": (str,), "epsilon": (float, 0.0, 1e4), "target_epsilon": (float, 0.0, 100.0),
    "delta": (float, 0.0, 1.0), "noise_multiplier": (float, 0.0, 1e6), "sample_rate": (float, 0.0, 1.0),
    "max_grad_norm": (float, 0.0, 1e6), "planned_steps": (int, 0, 10**9), "num_records": (int, 1, 2**31),
    "accountant": (str, ("prv", "rdp")), "sampling": (str, ("poisson",)), "secure_rng": (bool,),
    "ledger_version": (int, 2, 2), "history": (list,), "genesis": (str,), "head": (str,), "versions": (dict,),
    "privacy_unit": (str,), "mechanism": (str,), "covers": (str,), "declined": (str,),
}
OPTIONAL_REPORT_FIELDS: dict[str, tuple] = {
    "target_epsilon_applied": (float, 0.0, 100.0),
    "max_participations_per_day": (int, 1, 10**6),  # the device's own cap (fedllm client), when it set one
    "planned_selections": (int, 1, 10**9),  # a hive's ledger: private choices planned beside the steps
    "select_noise": (float, 0.0, 1e6),
    "score_records": (int, 0, 10**6),  # a hive's ledger: records scored per choice (0: all), each independently
    "signature": (str,),  # the device's Ed25519 signature of the report's head (fedllm.privacy.signing)
    "signing_key": (str,),  # the public half it was made with: which key to expect, not a reason to trust it
}
ENTRY_FIELDS: dict[str, tuple] = {
    "round": (int, 0, 10**9), "noise_multiplier": (float, 0.0, 1e6), "sample_rate": (float, 0.0, 1.0),
    "steps": (int, 0, 10**9), "kind": (str, ("train", "personal", "local-only", "records", "select")), "run": (str,),
    "prev_hash": (str,), "hash": (str,),
}
ENTRY_OPTIONAL: dict[str, tuple] = {"num_records": (int, 1, 2**31)}  # a record-count change's new count
MAX_HISTORY = 100_000


def _field_ok(value: Any, spec: tuple) -> bool:
    kind = spec[0]
    if kind is float:
        return number_in(value, spec[1], spec[2])
    if kind is int:
        return number_in(value, spec[1], spec[2], integer=True)
    if kind is bool:
        return isinstance(value, bool)
    if not isinstance(value, kind):
        return False
    if kind is str:
        return len(value) <= MAX_TEXT and (len(spec) == 1 or value in spec[1])
    return True


def check_report(text: Any, client_id: str) -> tuple[dict[str, Any] | None, str]:
    """(the report, "") when `text` is a well-formed epsilon report of `client_id` whose
    hash chain holds, else (None, why)."""
    if not isinstance(text, str) or len(text) > MAX_REPORT_BYTES:
        return None, "epsilon report is not a JSON string of at most 4 MiB"

    def no_constants(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        report = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return None, "epsilon report is not valid JSON"
    if not isinstance(report, dict):
        return None, "epsilon report is not a JSON object"
    unknown = set(report) - set(REPORT_FIELDS) - set(OPTIONAL_REPORT_FIELDS)
    if unknown:
        return None, f"epsilon report has unknown fields {[say(k, 40) for k in sorted(unknown)][:3]}"
    for name, spec in REPORT_FIELDS.items():
        if name not in report or not _field_ok(report[name], spec):
            return None, f"epsilon report field {name}: missing or not {spec[0].__name__} in range"
    for name, spec in OPTIONAL_REPORT_FIELDS.items():
        if name in report and not _field_ok(report[name], spec):
            return None, f"epsilon report field {name}: not {spec[0].__name__} in range"
    if report["client_id"] != client_id:
        return None, f"epsilon report is for client {say(report['client_id'])}, not {say(client_id)}"
    if not 0 < report["delta"] < 1 or not 0 < report["sample_rate"] <= 1 or report["target_epsilon"] <= 0:
        return None, "epsilon report: delta, sample_rate or target_epsilon out of range"
    history = report["history"]
    if len(history) > MAX_HISTORY:
        return None, f"epsilon report history has over {MAX_HISTORY} entries"
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or not set(ENTRY_FIELDS) <= set(entry) <= set(ENTRY_FIELDS) | set(ENTRY_OPTIONAL):
            return None, f"epsilon report history[{i}]: not an entry with fields {sorted(ENTRY_FIELDS)}"
        bad = [n for n, spec in {**ENTRY_FIELDS, **ENTRY_OPTIONAL}.items() if n in entry and not _field_ok(entry[n], spec)]
        if bad:
            return None, f"epsilon report history[{i}]: bad {bad[:3]}"
    if not all(isinstance(v, str) and isinstance(k, str) and len(v) < 200 for k, v in report["versions"].items()):
        return None, "epsilon report versions: expected names and version strings"
    broken = chain.problems(report)
    if broken:
        return None, f"epsilon report fails its hash chain ({broken[0][0]}: {broken[0][1][:80]})"
    return report, ""
