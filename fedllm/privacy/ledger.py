"""The on-device privacy ledger: every DP-SGD participation of one client, charged
*before* it trains, written atomically.

A crash after charging over-reports what was spent, never under-reports it. Entries
form a hash chain (`fedllm.privacy.chain`): a ledger that was edited, truncated or
reordered is refused, not continued. The noise
multiplier is calibrated once, when the ledger is created, for the planned number of
steps, and kept for the client's whole life (recalibrating later would assume nothing
had been spent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm import atomic
from fedllm.errors import FedllmError
from fedllm.privacy import chain
from fedllm.privacy.accounting import calibrate, epsilon
from fedllm.privacy.events import Charge

LEDGER_VERSION = 2  # 2: hash chain (version 1 ledgers are chained when first loaded)
RECORDS = "records"  # the kind of a zero-step entry: the record count, and so the sample rate, changed here
PRIVACY_UNIT = "record: one speech of a role, or one line of a client's data file; one training example each"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("fedllm", "opacus", "torch", "peft", "transformers", "dp-accounting", "flwr"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class LedgerError(FedllmError):
    """The ledger on disk cannot be used (corrupt, or for another client)."""


@dataclass
class Ledger:
    path: Path
    client_id: str
    num_records: int
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    planned_steps: int
    accountant: str
    history: list[Charge] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=library_versions)
    planned_selections: int = 0  # a hive's private choices the noise was calibrated beside (fedllm.hive)
    select_noise: float = 0.0  # their noise multiplier
    score_records: int = 0  # hive.score-records: each record scored with probability min(1, this / n); 0: all

    # -- lifecycle -------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, client_id: str, num_records: int, delta: float, target_epsilon: float,
             sample_rate: float, max_grad_norm: float, planned_steps: int, accountant: str,
             planned_selections: int = 0, select_noise: float = 0.0, score_records: int = 0) -> "Ledger":
        """Load the client's ledger, or create it (calibrating the noise) on first use.
        `planned_selections` private choices at `select_noise` are planned beside the steps."""
        path = Path(path)
        ledger = cls.existing(path, client_id)
        if ledger is not None:
            return ledger
        if delta >= 1.0 / num_records:
            raise LedgerError(f"privacy.delta={delta} is not below 1/n = {1.0 / num_records:.3g} for client "
                              f"{client_id} with {num_records} records; lower privacy.delta")
        fixed = ((select_noise, 1.0, planned_selections),) if planned_selections else ()
        sigma = calibrate(target_epsilon, delta, sample_rate, planned_steps, accountant, fixed=fixed)
        ledger = cls(path, client_id, num_records, delta, target_epsilon, sigma, sample_rate, max_grad_norm,
                     planned_steps, accountant, planned_selections=planned_selections,
                     select_noise=select_noise if planned_selections else 0.0,
                     score_records=score_records if planned_selections else 0)
        ledger.save()
        return ledger

    @classmethod
    def existing(cls, path: Path, client_id: str) -> "Ledger | None":
        """The client's ledger at `path`, or None when it has none yet; never creates one."""
        path = Path(path)
        if not path.exists():
            return None
        ledger = cls.load(path)
        if ledger.client_id != client_id:
            raise LedgerError(f"{path} belongs to client {ledger.client_id}, not {client_id}")
        return ledger

    @classmethod
    def load(cls, path: Path) -> "Ledger":
        advice = "it is never rewritten automatically: restore it from a backup or move it aside to start anew"
        try:
            d = json.loads(Path(path).read_text())
            ledger = cls(
                Path(path), d["client_id"], int(d["num_records"]), float(d["delta"]), float(d["target_epsilon"]),
                float(d["noise_multiplier"]), float(d["sample_rate"]), float(d["max_grad_norm"]),
                int(d["planned_steps"]), d["accountant"], [Charge.from_dict(c) for c in d["history"]],
                dict(d["versions"]), int(d.get("planned_selections", 0)), float(d.get("select_noise", 0.0)),
                int(d.get("score_records", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"privacy ledger {path} is unreadable ({exc}); {advice}") from exc
        version = d.get("ledger_version", 1)
        if isinstance(version, bool) or version not in (1, LEDGER_VERSION):
            raise LedgerError(f"privacy ledger {path} has ledger_version {version!r}, which this fedllm does not "
                              f"know; {advice}")
        if version < 2:
            chained = "genesis" in d or "head" in d or any(
                isinstance(c, dict) and ("hash" in c or "prev_hash" in c) for c in d["history"])
            if chained:  # a chained ledger relabelled old would skip the chain check: refuse it
                raise LedgerError(f"privacy ledger {path} is labelled ledger_version 1 but holds a hash chain "
                                  f"(version 2 content); it was edited, so this client will not train on it; {advice}")
            ledger.save()  # a genuine version-1 ledger migrates once: from now on it is chained on disk
            return ledger
        broken = chain.problems(d)
        if broken:
            where = "; ".join(f"{field} {why}" for field, why in broken)
            raise LedgerError(f"privacy ledger {path} fails its hash chain ({where}); the budget it records "
                              f"cannot be trusted, so this client will not train on it; {advice}")
        return ledger

    def to_dict(self) -> dict[str, Any]:
        header = {
            "ledger_version": LEDGER_VERSION, "client_id": self.client_id, "privacy_unit": PRIVACY_UNIT,
            "num_records": self.num_records, "delta": self.delta, "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm, "planned_steps": self.planned_steps,
            "accountant": self.accountant, "sampling": "poisson", "secure_rng": False,
            "versions": self.versions,
        }
        if self.planned_selections:  # only a hive's ledger: every other ledger's bytes (and chain) stay as they were
            header.update(planned_selections=self.planned_selections, select_noise=self.select_noise,
                          score_records=self.score_records)
        genesis, history = chain.link(header, [c.to_dict() for c in self.history])
        return {**header, "genesis": genesis, "history": history, "head": history[-1]["hash"] if history else genesis}

    def save(self) -> None:
        atomic.write_json(self.path, self.to_dict())

    # -- spending --------------------------------------------------------------------
    def epsilon(self, extra: list[Charge] | None = None) -> float:
        charges = self.history + (extra or [])
        eps = epsilon(charges, self.delta, self.accountant)
        if self.accountant == "prv" and 0 < eps < 1.0:  # PRV's default error bound, 0.01, is over 1% of it
            eps = epsilon(charges, self.delta, self.accountant, relative_error=1e-3)
        return eps

    @property
    def current_sample_rate(self) -> float:
        """The rate charged now: the header's, or that of the last record-count change."""
        changes = [c for c in self.history if c.kind == RECORDS]
        return changes[-1].sample_rate if changes else self.sample_rate

    def note_records(self, num_records: int, sample_rate: float, server_round: int, run: str = "") -> bool:
        """The device's record count changed: from now on its steps sample at `sample_rate`.

        Poisson sampling protects each record at its own inclusion probability, whatever the
        others are, so each later charge carries the new rate and the accountant composes
        every charge at the rate it ran with: records present before the change are charged
        both rates, and new records are charged for steps they were never in (over-reported,
        never under). The change is a zero-step entry in the chain (kind "records"), so an
        auditor sees where the rate changed. True when an entry was written."""
        if num_records < 1 or not 0 < sample_rate <= 1:
            raise LedgerError(f"{num_records} records at sample rate {sample_rate}: nothing to account")
        if self.delta >= 1.0 / num_records:
            raise LedgerError(f"privacy.delta={self.delta} is not below 1/n for {num_records} records")
        if abs(sample_rate - self.current_sample_rate) <= 1e-12:
            return False
        self.charge([Charge(server_round, self.noise_multiplier, sample_rate, 0, RECORDS, run, num_records)])
        return True

    def selection_charge(self, server_round: int, noise: float, run: str = "") -> Charge:
        """A hive's private choice: one Gaussian release of noise multiplier `noise` on the
        records' votes, unsampled (fedllm.hive)."""
        return Charge(server_round, noise, 1.0, 1, "select", run)

    def next_charge(self, server_round: int, steps: int, kind: str = "train", run: str = "") -> Charge:
        return Charge(server_round, self.noise_multiplier, self.current_sample_rate, steps, kind, run)

    def affordable(self, charges: list[Charge], target: float | None = None) -> tuple[bool, float]:
        """(whether `charges` stay within the target, or a stricter `target`, epsilon after them)."""
        after = self.epsilon(charges)
        cap = self.target_epsilon if target is None else min(target, self.target_epsilon)
        return after <= cap * (1 + 1e-9), after

    def charge(self, charges: list[Charge]) -> None:
        """Record `charges` durably; call *before* the steps they pay for."""
        self.history.extend(charges)
        self.save()
