"""Epsilon reports: what a client claims, with everything needed to recompute it."""

from __future__ import annotations

import statistics
from typing import Any

from fedllm.privacy.ledger import Ledger

MECHANISM = "DP-SGD: Poisson-subsampled Gaussian mechanism on clipped per-record gradients of LoRA parameters"
COVERS = ("the adapter updates sent to the server and everything computed from them (global adapters, "
          "checkpoints); not the plain metrics a client also sends: its record count, mean training loss and "
          "held-out metrics")


def client_report(ledger: Ledger, declined: str = "", requested_target: float | None = None) -> dict[str, Any]:
    """The ledger as a report. `requested_target`: the server's target for this request; a
    stricter one than the ledger's is applied, and recorded as `target_epsilon_applied`."""
    report = ledger.to_dict()
    applied = ledger.target_epsilon if requested_target is None else min(requested_target, ledger.target_epsilon)
    report.update({
        "mechanism": MECHANISM,
        "covers": COVERS,
        "epsilon": ledger.epsilon(),
        "declined": declined,
        "target_epsilon_applied": applied,
    })
    return report


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
