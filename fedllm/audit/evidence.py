"""The evidence an audit weighs, and how a finding is recorded: read the files, recompute
epsilon with Google's dp-accounting (never with Opacus, which the training used), and
collect what the server recorded of each client. Shared by the record-level and the
user-level checks; imports nothing of the code it audits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedllm.rundir import RunDir

@dataclass
class Finding:
    client: str  # a client id, or "run" for checks of the run as a whole
    check: str
    status: str  # "pass", "fail" or "skip"
    field: str = ""
    message: str = ""


@dataclass
class ClientEpsilon:
    """What the plots and the table need about one client."""

    claimed: float | None
    pld: float | None
    rdp: float | None
    target: float | None
    by_round: list[tuple[int, float]] = field(default_factory=list)  # PLD epsilon after each round it spent in


@dataclass
class Audit:
    source: Path
    kind: str  # "run" or "state store"
    tolerance: float
    findings: list[Finding] = field(default_factory=list)
    epsilons: dict[str, ClientEpsilon] = field(default_factory=dict)
    user_level: ClientEpsilon | None = None  # privacy/user_level.json, when the run has user-level DP

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "fail"]

    @property
    def clients(self) -> list[str]:
        return sorted({f.client for f in self.findings if f.client not in ("run", "user-level")})

    def status(self, client: str, check: str) -> str:
        got = [f.status for f in self.findings if f.client == client and f.check == check]
        return "fail" if "fail" in got else ("pass" if "pass" in got else "skip")


# -- independent recomputation -----------------------------------------------------------
def mechanisms(history: list[Mapping[str, Any]]) -> tuple[tuple[float, float, int], ...]:
    """(noise multiplier, sample rate, steps) per distinct mechanism, order-free."""
    merged: dict[tuple[float, float], int] = {}
    for e in history:
        key = (float(e["noise_multiplier"]), float(e["sample_rate"]))
        merged[key] = merged.get(key, 0) + int(e["steps"])
    return tuple(sorted((s, q, n) for (s, q), n in merged.items() if n > 0))


@lru_cache(maxsize=4096)
def recompute(mechanisms: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    if not mechanisms:
        return 0.0
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP notes orders it drops; not a finding
    # PLD's discretisation is pessimistic (never below the true epsilon); 1e-3 agrees with
    # the default 1e-4 to 1e-5 here and is ten times faster.
    acc = PLDAccountant(value_discretization_interval=1e-3) if accountant == "pld" else RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in mechanisms
    ]))
    return float(acc.get_epsilon(delta))


def recompute_epsilon(history: list[Mapping[str, Any]], delta: float, accountant: str = "pld") -> float:
    """Epsilon of a report's `history` with dp-accounting ("pld" or "rdp")."""
    return recompute(mechanisms(history), float(delta), accountant)


# -- reading the evidence ------------------------------------------------------------------
def read_json(path: Path) -> tuple[Any, str]:
    import json

    try:
        return json.loads(path.read_text()), ""
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable: {exc}"


@dataclass
class ServerRecord:
    """What the server saw of one client, from metrics.jsonl and config.json."""

    sampled: set[int] = field(default_factory=set)
    accepted: dict[int, int | None] = field(default_factory=dict)  # round -> steps it reported
    dropped: set[int] = field(default_factory=set)
    declined: set[int] = field(default_factory=set)
    personalised: dict[int, bool] = field(default_factory=dict)  # round -> charged personal steps
    declared: int | None = None  # the record count it declared at discovery (round 0's record)
    hive_differed: dict[int, bool] = field(default_factory=dict)  # round -> the specialists sent differed
    # round -> (the specialist it was evaluated with, whether it was the final round), where the
    # specialists evaluated differed: a choice among them read its records
    hive_evaluated: dict[int, tuple[int, bool]] = field(default_factory=dict)


def server_records(run: RunDir) -> tuple[str, dict[str, ServerRecord]]:
    """(run id, client -> ServerRecord) from the run's metrics.jsonl."""
    records: dict[str, ServerRecord] = {}
    run_id = ""
    discovery: dict[str, int] = {}
    differed: dict[int, bool] = {}
    for m in run.metrics():
        r = int(m["round"])
        run_id = m.get("run_id", run_id)
        if isinstance(m.get("discovery"), dict):
            discovery.update({str(c): n for c, n in m["discovery"].items() if type(n) is int})
        train = m.get("train", {})
        if isinstance(train.get("hive"), dict) and "identical" in train["hive"]:
            differed[r] = train["hive"]["identical"] is False
        for c in train.get("sampled", []):
            records.setdefault(c, ServerRecord()).sampled.add(r)
        steps = train.get("steps", [None] * len(train.get("clients", [])))
        for c, s in zip(train.get("clients", []), steps):
            records.setdefault(c, ServerRecord()).accepted[r] = s
        for d in train.get("dropped", []):
            records.setdefault(d["client_id"], ServerRecord()).dropped.add(r)
        for d in train.get("declined", []):
            records.setdefault(d["client_id"], ServerRecord()).declined.add(r)
        evaluated = m.get("evaluate", {})
        hive_eval = evaluated.get("hive") if isinstance(evaluated.get("hive"), dict) else {}
        for c, metrics in evaluated.get("clients", {}).items():
            if "personal-declined" in metrics:
                records.setdefault(c, ServerRecord()).personalised[r] = not metrics["personal-declined"]
            if hive_eval.get("identical") is False and isinstance(metrics.get("specialist"), (int, float)):
                records.setdefault(c, ServerRecord()).hive_evaluated[r] = (int(metrics["specialist"]),
                                                                           hive_eval.get("final") is True)
    for c in discovery:
        records.setdefault(c, ServerRecord())
    for c, record in records.items():
        record.declared, record.hive_differed = discovery.get(c), differed
    return run_id, records


# -- the checks ----------------------------------------------------------------------------
class Checker:
    def __init__(self, audit: Audit, client: str):
        self.audit, self.client = audit, client

    def __call__(self, check: str, ok: bool | None, field: str = "", message: str = "") -> bool:
        status = "skip" if ok is None else ("pass" if ok else "fail")
        self.audit.findings.append(Finding(self.client, check, status, field, message if status != "pass" else ""))
        return bool(ok)


def type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


