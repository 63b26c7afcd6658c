"""The device's own privacy policy, and the check every server request passes first.

A server's message says what it would like a device to do; the device decides. Its
policy comes from its own side: the flags its operator started it with on a fleet
(`fedllm client --require-dp --max-epsilon E --max-delta D ...`), or the run's config in
a simulation. A request may tighten the policy, never loosen it, and never change the
mechanism an existing ledger was calibrated for: such a request is refused *before*
anything is charged or trained, with a reason the server logs and counts like a decline.

Keys that name places or resources on the device (paths, model location, threads, which
records it holds) never come from the server: `device_config` replaces them with the
device's own values before anything reads the request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedllm.config import KEYS, Config, planned_steps
from fedllm.errors import ConfigError

# Never taken from a server message: where things are on the device, what it runs on, and
# which of its records it trains on (that decides the record count, and so the sample rate).
LOCAL_PREFIXES = ("run-dir", "model.name", "model.cache-dir", "model.dtype", "device", "privacy.state-dir", "data.",
                  "simulation.")
# In a simulation the run's config pins these: each changes the DP-SGD mechanism (sample
# rate, clip, accountant, or the steps the noise multiplier is calibrated for).
MECHANISM_KEYS = ("train.batch-size", "privacy.max-grad-norm", "privacy.accountant", "local-steps",
                  "hive.select-noise", "hive.score-records")
MAX_TARGET_EPSILON = 100.0  # beyond this a "guarantee" means nothing; calibration also slows without bound


def is_local(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in LOCAL_PREFIXES)


@dataclass(frozen=True)
class DevicePolicy:
    """What this device allows, whatever a server asks."""

    require_dp: bool = True
    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    require_secagg: bool = False
    require_user_dp: bool = False
    pinned: Mapping[str, Any] = field(default_factory=dict)  # key -> the only value accepted
    planned_steps: int | None = None  # a simulation pins the calibration too

    def __post_init__(self) -> None:
        if not 0 < self.max_epsilon <= MAX_TARGET_EPSILON:
            raise ConfigError(f"max epsilon {self.max_epsilon}: give a number in (0, {MAX_TARGET_EPSILON:g}]")
        if not 0 < self.max_delta < 1:
            raise ConfigError(f"max delta {self.max_delta}: give a number strictly between 0 and 1")

    @classmethod
    def from_config(cls, config: Config) -> "DevicePolicy":
        """A simulated device's policy: the run's own config, as its researcher set it."""
        flat = config.to_flat()
        return cls(require_dp=config.privacy.enabled, max_epsilon=config.privacy.target_epsilon,
                   max_delta=config.privacy.delta, require_secagg=config.secagg.enabled,
                   require_user_dp=config.user_dp.enabled, pinned={k: flat[k] for k in MECHANISM_KEYS},
                   planned_steps=planned_steps(config) if config.privacy.enabled else None)

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> "DevicePolicy":
        """A real device's policy: its operator's flags (`fedllm client`), via its node config."""
        def number(key: str, default: float) -> float:
            value = node.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"node config {key}={value!r}: expected a number")
            return float(value)

        return cls(require_dp=bool(node.get("require-dp", True)), max_epsilon=number("max-epsilon", 8.0),
                   max_delta=number("max-delta", 1e-5), require_secagg=bool(node.get("require-secagg", False)),
                   require_user_dp=bool(node.get("require-user-dp", False)))


def device_config(request: Mapping[str, Any], local: Mapping[str, Any]) -> Config:
    """The config a device acts on: the server's request over the defaults, with every
    local key (paths, model location, threads, data selection) taken from `local` only.

    Raises ConfigError (naming the key) when the request holds a bad value.
    """
    values = {k: v for k, v in request.items() if k in KEYS and not is_local(k)}
    values.update({k: v for k, v in local.items() if is_local(k)})
    return Config.from_flat(values)


def refusal(policy: DevicePolicy, request: Config, ledger=None, num_records: int | None = None) -> str:
    """Why this device refuses `request` ("" when it accepts). Checked before any charge.

    `ledger` is the device's existing ledger (None before its first private round): its
    mechanism is fixed, so a request that would run another one is refused.
    """
    from fedllm.privacy.engine import poisson_sample_rate

    p, why = request.privacy, []
    if policy.require_dp and not p.enabled:
        why.append("privacy.enabled=false: this device trains only with DP-SGD")
    if policy.require_secagg and not request.secagg.enabled:
        why.append("secagg.enabled=false: this device uploads only under secure aggregation")
    if policy.require_user_dp and not request.user_dp.enabled:
        why.append("user-dp.enabled=false: this device requires user-level DP")
    if p.enabled:
        if p.target_epsilon > policy.max_epsilon:
            why.append(f"privacy.target-epsilon={p.target_epsilon:g} exceeds this device's maximum "
                       f"{policy.max_epsilon:g}")
        if p.delta > policy.max_delta:
            why.append(f"privacy.delta={p.delta:g} exceeds this device's maximum {policy.max_delta:g}")
        flat = request.to_flat()
        for key, value in policy.pinned.items():
            if flat[key] != value:
                why.append(f"{key}={flat[key]!r} differs from {value!r}, which this device's noise was "
                           "calibrated for")
        if policy.planned_steps is not None and planned_steps(request) != policy.planned_steps:
            why.append(f"the request plans {planned_steps(request)} DP steps (privacy.planned-rounds, "
                       f"num-server-rounds, personal.*), this device {policy.planned_steps}: that changes the "
                       "noise multiplier")
        if ledger is not None:
            why.extend(_ledger_mismatch(ledger, request, num_records, poisson_sample_rate))
    return "refused: " + "; ".join(why) if why else ""


def _ledger_mismatch(ledger, request: Config, num_records: int | None, sample_rate) -> list[str]:
    """What in `request` differs from the mechanism `ledger` was calibrated for."""
    p, why = request.privacy, []
    if num_records is not None:  # a new record count is accounted (Ledger.note_records); a new batch size is not
        q = sample_rate(ledger.num_records, request.train.batch_size)
        if abs(q - ledger.sample_rate) > 1e-12:
            why.append(f"train.batch-size={request.train.batch_size} gives sample rate {q:.4g} for the ledger's "
                       f"{ledger.num_records} records, the ledger was calibrated for {ledger.sample_rate:.4g}")
        if p.delta >= 1.0 / num_records:
            why.append(f"privacy.delta={p.delta:g} is not below 1/n for the {num_records} records this device "
                       "now holds")
    if p.max_grad_norm != ledger.max_grad_norm:
        why.append(f"privacy.max-grad-norm={p.max_grad_norm:g} differs from the ledger's {ledger.max_grad_norm:g}")
    if p.accountant != ledger.accountant:
        why.append(f"privacy.accountant={p.accountant} differs from the ledger's {ledger.accountant}")
    if p.delta != ledger.delta:
        why.append(f"privacy.delta={p.delta:g} differs from the ledger's {ledger.delta:g}")
    if p.target_epsilon > ledger.target_epsilon:
        why.append(f"privacy.target-epsilon={p.target_epsilon:g} exceeds the ledger's {ledger.target_epsilon:g}")
    if ledger.planned_selections and request.hive.k > 1:  # a hive's choice: its noise and subsample are pinned too
        if request.hive.select_noise != ledger.select_noise:
            why.append(f"hive.select-noise={request.hive.select_noise:g} differs from the ledger's "
                       f"{ledger.select_noise:g}")
        if request.hive.score_records != ledger.score_records:
            why.append(f"hive.score-records={request.hive.score_records} differs from the ledger's "
                       f"{ledger.score_records}")
    return why
