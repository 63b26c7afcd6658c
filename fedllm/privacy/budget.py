"""The one door to spending a device's privacy budget. Every request that could read a
record passes it first, in this order, and nothing else opens or charges a ledger:

    1. the policy     refuse what the device's own policy forbids (`refusal`): before any
                      record is read, whatever the request kind (train, evaluate's hive
                      choice, personalise, a device's own re-personalisation)
    2. the ledger     read it, or open it (calibrating the noise) on the first private use;
                      a changed record count is accounted (`Ledger.note_records`)
    3. the charge     the charges the caller names, all of them, before any step, or decline
    4. the report     what the server is shown, built by `client_report`

The result is frozen: private training takes its ledger from an admitted `Spent`
(`Spent.ledger`), as Opacus attaches its accountant to the optimizer, so no caller can
train privately without having charged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import Config, planned_selections, planned_steps
from fedllm.privacy.engine import poisson_sample_rate
from fedllm.privacy.events import Charge
from fedllm.privacy.ledger import Ledger
from fedllm.privacy.policy import DevicePolicy, refusal
from fedllm.privacy.report import client_report
from fedllm.state import StateStore, state_root

Charges = Callable[[Ledger], Sequence[Charge]]  # what to charge, given the device's ledger


@dataclass(frozen=True)
class Spent:
    """What the door decided: `declined` says why not ("" when admitted); `ledger` is the
    charged ledger (None: admitted without DP, which the device's policy allows); `report`
    is the epsilon report to send (None without a ledger)."""

    declined: str = ""
    ledger: Ledger | None = None
    report: dict[str, Any] | None = None
    refused: bool = False  # declined by the policy (nothing read), not for the budget

    @property
    def admitted(self) -> bool:
        return not self.declined

    @property
    def private(self) -> bool:
        return self.ledger is not None


def ledger_path(config: Config, client_id: str) -> Path:
    return StateStore(state_root(config), client_id).ledger_path


def admit(config: Config, client_id: str, num_records: int, policy: DevicePolicy) -> Spent:
    """Step 1 alone: whether the device's policy accepts `config` (the request). Nothing is
    read but the existing ledger, nothing is written."""
    ledger = Ledger.existing(ledger_path(config, client_id), client_id) if config.privacy.enabled else None
    why = refusal(policy, config, ledger, num_records)
    if why:
        return Spent(why, ledger, client_report(ledger, declined=why) if ledger is not None else None, refused=True)
    return Spent("", ledger, None)


def spend(config: Config, client_id: str, num_records: int, policy: DevicePolicy, charges: Charges,
          server_round: int = 0, run: str = "") -> Spent:
    """Steps 1-4 for one request: admitted and charged, or declined with the reason and the
    unchanged report. Without DP (and a policy that allows it) it is admitted uncharged."""
    checked = admit(config, client_id, num_records, policy)
    if not checked.admitted or not config.privacy.enabled:
        return checked
    ledger = _open(config, client_id, num_records, checked.ledger, server_round, run)
    return charge(config, ledger, charges(ledger))


def charge(config: Config, ledger: Ledger, charges: Sequence[Charge]) -> Spent:
    """Step 3 on a ledger the door already admitted this request to (a second charge of the
    same request, such as every-round personalisation after its training round)."""
    target = config.privacy.target_epsilon
    if charges:
        cap = min(target, ledger.target_epsilon)
        affordable, after = ledger.affordable(list(charges), cap)
        if not affordable:
            why = (f"declined: this would bring epsilon to {after:.3f}, over the target {cap:g} "
                   f"(spent so far {ledger.epsilon():.3f})")
            return Spent(why, ledger, client_report(ledger, why, target))
        ledger.charge(list(charges))  # before any step: a crash can only over-report
    return Spent("", ledger, client_report(ledger, "", target))


def _open(config: Config, client_id: str, num_records: int, ledger: Ledger | None, server_round: int,
          run: str) -> Ledger:
    """The device's ledger: its existing one, with a changed record count accounted (a new
    sample rate from here on), or a new one, calibrated for the planned steps and choices."""
    rate = poisson_sample_rate(num_records, config.train.batch_size)
    if ledger is not None:
        ledger.note_records(num_records, rate, server_round, run)
        return ledger
    p = config.privacy
    return Ledger.open(
        ledger_path(config, client_id), client_id=client_id, num_records=num_records, delta=p.delta,
        target_epsilon=p.target_epsilon, sample_rate=rate, max_grad_norm=p.max_grad_norm,
        planned_steps=planned_steps(config), accountant=p.accountant,
        planned_selections=planned_selections(config), select_noise=config.hive.select_noise,
        score_records=config.hive.score_records,
    )
