"""Aggregation as small steps over adapter deltas, composed per round.

    contributions (checked deltas)  --combine-->  update  --server optimizer-->  new global
    secure sum (SecAgg+)            --/ count-->  update
    user-level DP: sum  --noise, / denominator-->  update          (the clip is checked upstream)

Every step is a pure function of numpy arrays (float64 inside) and holds no Flower type;
`round_update` composes them as the config says (`Plan`), and the server applies the
result with its `ServerOptimizer` (`server/round_loop.py`); tests call each alone. The
server optimizers are Flower's (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad in
`flwr.serverapp.strategy`) restated in delta space, term by term with Flower's code, so
that an update that arrives as a sum (secure or noised) is applied without fabricating a
client reply; `tests/test_aggregate.py` checks each against Flower's strategy. The robust
rules call Flower's own functions (`flwr.server.strategy.aggregate`): every one of them
commutes with a shift, so on deltas they pick what they pick on `global + delta`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedllm.config import ROBUST_STRATEGIES as ROBUST

Delta = dict[str, np.ndarray]


@dataclass(frozen=True)
class Contribution:
    """One accepted delta and its weight (1 under DP: a record count is not private)."""

    client: str
    delta: Delta
    weight: float = 1.0
    specialist: int = 0  # a hive's specialist it is for (fedllm.hive)


def norm(delta: Delta) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))


def zeros(shapes: dict[str, tuple[int, ...]]) -> Delta:
    return {k: np.zeros(shape, np.float64) for k, shape in shapes.items()}


class RunningSum:
    """Deltas added as they arrive and then dropped: the server's memory in a round is two
    sums (weighted and plain), whatever the size of the cohort."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.weighted, self.plain = zeros(shapes), zeros(shapes)
        self.weight, self.count = 0.0, 0

    def add(self, c: Contribution) -> None:
        for k in self.plain:
            value = np.asarray(c.delta[k], np.float64)
            self.weighted[k] += c.weight * value
            self.plain[k] += value
        self.weight += c.weight
        self.count += 1

    @classmethod
    def of(cls, contributions: Sequence[Contribution], shapes: dict[str, tuple[int, ...]]) -> "RunningSum":
        running = cls(shapes)
        for c in contributions:
            running.add(c)
        return running

    def mean(self) -> Delta | None:
        """Sum of weight * delta over the sum of weights; None without contributions."""
        if not self.count or self.weight <= 0:
            return None
        return {k: v / self.weight for k, v in self.weighted.items()}


def total(contributions: Sequence[Contribution], shapes: dict[str, tuple[int, ...]]) -> Delta:
    """The unweighted sum (zeros when nobody contributed), in the given order."""
    return RunningSum.of(contributions, shapes).plain


def weighted_mean(contributions: Sequence[Contribution]) -> Delta | None:
    """Sum of weight * delta over the sum of weights; None without contributions."""
    if not contributions:
        return None
    return RunningSum.of(contributions, {k: np.shape(v) for k, v in contributions[0].delta.items()}).mean()


def secure_mean(secure_sum: Delta, contributors: int) -> Delta | None:
    """The mean of a secure round's sum (every client weighs 1); None when nobody contributed."""
    return {k: v / contributors for k, v in secure_sum.items()} if contributors else None


def over_clip(contributions: Sequence[Contribution], clip: float) -> tuple[list[Contribution], list[tuple[str, float]]]:
    """(the contributions within the user-level clip, [(client, norm)] of those above it).

    Devices clip before sending; a larger delta is a broken or hostile device, and one
    such delta in the sum would void the sensitivity the noise is calibrated to."""
    kept, dropped = [], []
    for c in contributions:
        n = norm(c.delta)
        (dropped.append((c.client, n)) if over_clip_norm(n, clip) else kept.append(c))
    return kept, dropped


def over_clip_norm(size: float, clip: float) -> bool:
    """A delta of L2 norm `size` is above the user-level clip (beyond the float32 rounding
    of a delta clipped exactly to `clip`)."""
    return size > clip * (1 + 1e-4)


def noisy_mean(summed: Delta, noise_std: float, denominator: float, rng: np.random.Generator) -> Delta:
    """User-level DP: (sum + N(0, noise_std^2 I)) / denominator. The noise is drawn even
    when nobody contributed: a round always releases it."""
    return {k: (v + rng.normal(0.0, noise_std, size=v.shape)) / denominator for k, v in summed.items()}


def robust_combine(name: str, contributions: Sequence[Contribution], num_malicious: int = 0,
                   trim_beta: float = 0.2, num_selected: int = 0) -> Delta | None:
    """Flower's robust rules on the deltas (their weights as Flower's num_examples)."""
    from flwr.server.strategy import aggregate as flower

    if not contributions:
        return None
    keys = list(contributions[0].delta)
    results = [([np.asarray(c.delta[k], np.float64) for k in keys], int(c.weight)) for c in contributions]
    if name == "fedmedian":
        arrays = flower.aggregate_median(results)
    elif name == "fedtrimmedavg":
        arrays = flower.aggregate_trimmed_avg(results, trim_beta)
    elif name == "krum":
        arrays = flower.aggregate_krum(results, num_malicious, 0)
    elif name == "multikrum":
        arrays = flower.aggregate_krum(results, num_malicious, num_selected)
    elif name == "bulyan":
        if len(results) < 4 * num_malicious + 3:
            return None  # Flower's Bulyan needs 4f + 3 updates; the round keeps the global adapter
        arrays = _bulyan(results, num_malicious)
    else:
        raise ValueError(f"no robust rule {name!r}")
    return {k: np.asarray(a, np.float64) for k, a in zip(keys, arrays)}


def _bulyan(results: list[tuple[list[np.ndarray], int]], f: int) -> list[np.ndarray]:
    """Flower's Message-API Bulyan (its selection differs from the legacy function's):
    MultiKrum selects theta = n - 2f, then the beta = theta - 2f values closest to the
    coordinate-wise median are averaged."""
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
    from flwr.serverapp.strategy.multikrum import select_multikrum

    contents = [RecordDict({"arrays": ArrayRecord({str(i): Array(a) for i, a in enumerate(arrays)})})
                for arrays, _ in results]
    theta = len(results) - 2 * f
    selected = [c["arrays"].to_numpy_ndarrays() for c in select_multikrum(contents, f, theta)]
    median = [np.median(layer, axis=0) for layer in zip(*selected, strict=True)]
    return aggregate_n_closest_weights(median, selected, theta - 2 * f)


@dataclass(frozen=True)
class Plan:
    """Which steps a round composes, from the config (`plan_for`)."""

    strategy: str = "fedavg"
    secure: bool = False  # the round arrives as a secure sum
    noise_std: float | None = None  # user-level DP: std of the noise on the sum; None when off
    denominator: float = 1.0  # user-level DP: the expected cohort the noisy sum is divided by
    num_malicious: int = 0
    trim_beta: float = 0.2
    num_selected: int = 0


def round_update(plan: Plan, shapes: dict[str, tuple[int, ...]], contributions: Sequence[Contribution] = (),
                 secure_sum: Delta | None = None, contributors: int = 0,
                 rng: np.random.Generator | None = None, running: RunningSum | None = None) -> Delta | None:
    """The round's update, or None when the global adapter stays:

        user-level DP   (sum of the contributions, or the secure sum) + noise, / denominator
        secure          secure sum / contributors
        robust          Flower's rule over the contributions
        otherwise       the weighted mean of the contributions

    A plain round's contributions come as a list, or already summed as they arrived
    (`running`: the streaming path, every rule but the robust ones)."""
    if plan.noise_std is not None:  # the round releases the noise even when nobody contributed
        summed = secure_sum if plan.secure else (running.plain if running is not None
                                                 else total(contributions, shapes))
        return noisy_mean(zeros(shapes) if summed is None else summed, plan.noise_std, plan.denominator,
                          rng if rng is not None else np.random.default_rng())
    if plan.secure:
        return secure_mean(secure_sum, contributors) if secure_sum is not None else None
    if plan.strategy in ROBUST:
        return robust_combine(plan.strategy, contributions, plan.num_malicious, plan.trim_beta, plan.num_selected)
    return running.mean() if running is not None else weighted_mean(contributions)


class ServerOptimizer:
    """How an update moves the global adapter; FedAvg's and FedProx's rule: global + update.

    `state` holds the optimizer's arrays by name (what a restarted server reloads)."""

    name = "fedavg"

    def __init__(self) -> None:
        self.state: dict[str, Delta] = {}

    def step(self, server_round: int, global_arrays: Delta, update: Delta) -> Delta:
        return {k: np.asarray(global_arrays[k], np.float64) + update[k] for k in global_arrays}


class FedAvgM(ServerOptimizer):
    """Flower's FedAvgM: momentum on the pseudo-gradient -update, server learning rate 1."""

    name = "fedavgm"

    def __init__(self, momentum: float, lr: float = 1.0) -> None:
        super().__init__()
        self.momentum, self.lr = momentum, lr

    def step(self, server_round: int, global_arrays: Delta, update: Delta) -> Delta:
        gradient = {k: -v for k, v in update.items()}
        if self.momentum > 0.0:
            previous = self.state.get("momentum_vector")
            gradient = gradient if previous is None else {k: self.momentum * previous[k] + g
                                                          for k, g in gradient.items()}
            self.state["momentum_vector"] = gradient
        return {k: np.asarray(global_arrays[k], np.float64) - self.lr * gradient[k] for k in global_arrays}


class FedOpt(ServerOptimizer):
    """Flower's FedAdam (`adam`), FedYogi (`yogi`) and FedAdagrad (`adagrad`), with their
    defaults' names: eta (server lr), beta_1, beta_2, tau."""

    def __init__(self, kind: str, eta: float, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-9) -> None:
        super().__init__()
        self.kind, self.name = kind, f"fed{kind}"
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau

    def step(self, server_round: int, global_arrays: Delta, update: Delta) -> Delta:
        m = self.state.get("m_t") or {k: np.zeros_like(v) for k, v in update.items()}
        m = {k: self.beta_1 * v + (1 - self.beta_1) * update[k] for k, v in m.items()}
        v = self.state.get("v_t") or {k: np.zeros_like(x) for k, x in update.items()}
        if self.kind == "adam":
            v = {k: self.beta_2 * x + (1 - self.beta_2) * update[k] ** 2 for k, x in v.items()}
            eta = (self.eta * math.sqrt(1 - self.beta_2 ** (server_round + 1.0))
                   / (1 - self.beta_1 ** (server_round + 1.0)))
        elif self.kind == "yogi":
            v = {k: x - (1.0 - self.beta_2) * update[k] ** 2 * np.sign(x - update[k] ** 2) for k, x in v.items()}
            eta = self.eta
        else:
            v = {k: x + update[k] ** 2 for k, x in v.items()}
            eta = self.eta
        self.state.update(m_t=m, v_t=v)
        return {k: np.asarray(x, np.float64) + eta * m[k] / (np.sqrt(v[k]) + self.tau)
                for k, x in global_arrays.items()}


def make_optimizer(strategy: Any) -> ServerOptimizer:
    """The server optimizer of a `fedllm.config.StrategyConfig`."""
    if strategy.name in ("fedadam", "fedyogi", "fedadagrad"):
        kind = strategy.name[3:]
        # Flower's FedAdagrad fixes beta_1 = beta_2 = 0 (no first-moment averaging)
        betas = {"beta_1": 0.0, "beta_2": 0.0} if kind == "adagrad" else {"beta_1": strategy.beta_1,
                                                                           "beta_2": strategy.beta_2}
        return FedOpt(kind, strategy.server_lr, tau=strategy.tau, **betas)
    if strategy.name == "fedavgm":
        return FedAvgM(strategy.server_momentum)
    return ServerOptimizer()


def plan_for(config: Any, noise_std: float | None = None, denominator: float = 1.0) -> Plan:
    """The plan of a `fedllm.config.Config` (noise from its `UserLevel`, once the population is known)."""
    s = config.strategy
    return Plan(s.name, config.secagg.enabled, noise_std, denominator, s.num_malicious, s.trim_beta,
                s.num_selected or max(1, config.clients_per_round - s.num_malicious))


def finite(arrays: Delta) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values())
