"""User-level DP (DP-FedAvg): the privacy unit is a device, all of its records at once.

Each client clips its whole adapter delta to L2 norm `clip`; the server adds Gaussian
noise of std `noise_multiplier * clip` to the *sum* (after secure aggregation, when it
is on: the server never holds a single update) and divides by a fixed denominator, the
expected number of sampled clients (McMahan et al. 2018, "fixed-denominator
estimator"): dividing by the number that actually took part would publish it.

One round is one Gaussian mechanism of sensitivity `clip` on the sum. With Poisson
participation (each client joins independently with probability q, the draw kept
secret by the server) rounds are Poisson-subsampled Gaussians and amplification is
claimed; with a fixed number of clients per round it is not: every round counts as if
every client took part. `privacy/user_level.json` holds everything needed to recompute
the epsilon; `fedllm.audit` does so with dp-accounting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch

from fedllm.config import Config
from fedllm.privacy import accounting
from fedllm.privacy.events import Charge

MECHANISM = ("DP-FedAvg: per-client L2 clipping of the whole adapter delta, Gaussian noise "
             "N(0, (noise_multiplier * clip)^2) added once per round to the sum of clipped deltas")
PRIVACY_UNIT = "user: a client (device) with all of its records, added or removed"
COVERS = ("every global adapter the server releases (checkpoints, what clients receive) and everything computed "
          "from them; not the server's own view of the un-noised sum, not which clients the server sampled, and "
          "not the plain metrics clients send (record counts, losses)")
NOISE_BY = {True: "server, once per round, on the sum after secure aggregation (no single update is ever "
                  "seen by the server)",
            False: "server, once per round, on the sum of the clipped updates it received"}


def delta_norm(delta: dict[str, torch.Tensor]) -> float:
    """L2 norm across all adapter tensors, as one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_delta(delta: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """The delta scaled to L2 norm at most `clip` (unchanged when already inside), and its norm before."""
    norm = delta_norm(delta)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (t * scale).to(torch.float32) for k, t in delta.items()}, norm


def check_delta(delta: float, population: int) -> None:
    """User-level delta must be below 1/(number of clients), or one device may be exposed outright."""
    from fedllm.errors import ConfigError

    if delta >= 1.0 / population:
        raise ConfigError(f"user-dp.delta={delta:g} is not below 1/{population} for {population} clients; "
                          f"use user-dp.delta < {1.0 / population:.3g}")


def rounds_as_charges(noise_multiplier: float, sample_rate: float, rounds: int, run: str = "") -> list[Charge]:
    """User-level rounds in the record-level event schema: each round is one
    Poisson-subsampled Gaussian step on the sum (sensitivity `clip`), kind "user-round"."""
    return [Charge(r, noise_multiplier, sample_rate, 1, "user-round", run) for r in range(1, rounds + 1)]


@lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "prv") -> float:
    """Epsilon of `rounds` Gaussian rounds, Poisson-subsampled at `sample_rate` (1.0: none):
    the same accounting as a ledger's, over the same events."""
    if rounds and noise_multiplier == 0:
        return math.inf
    # PRV's default error (0.01 absolute) is several percent of a small user-level epsilon:
    # refine to 0.1% of it, so the claim is as tight as an auditor's recomputation.
    return accounting.epsilon(rounds_as_charges(noise_multiplier, sample_rate, rounds), delta, accountant,
                              relative_error=1e-3)


@dataclass(frozen=True)
class UserLevel:
    """The mechanism, fixed for a run once the server knows how many clients there are."""

    noise_multiplier: float
    clip: float
    sampling: str  # "poisson" | "fixed"
    sample_rate: float  # what the accountant uses: q for Poisson, 1.0 (no amplification) for fixed
    population: int  # clients the server sampled from
    denominator: float  # expected clients per round: the sum is divided by this
    delta: float
    accountant: str
    secure_aggregation: bool
    target_epsilon: float = 0.0
    noise_cohort_size: int = 0  # > 0: the noise of a cohort this large (a simulation of a larger deployment)

    @classmethod
    def for_run(cls, config: Config, population: int) -> "UserLevel":
        u = config.user_dp
        check_delta(u.delta, population)
        k = min(config.clients_per_round, population)
        q = k / population if u.sampling == "poisson" else 1.0
        sigma = u.noise_multiplier
        if u.target_epsilon > 0:
            sigma = accounting.calibrate(u.target_epsilon, u.delta, q, config.num_server_rounds, config.privacy.accountant)
        return cls(noise_multiplier=sigma, clip=u.clip, sampling=u.sampling, sample_rate=q, population=population,
                   denominator=float(k), delta=u.delta, accountant=config.privacy.accountant,
                   secure_aggregation=config.secagg.enabled, target_epsilon=u.target_epsilon,
                   noise_cohort_size=u.noise_cohort_size)

    @property
    def noise_std(self) -> float:
        """The std of the noise on the sum. Divided by the cohort, the mean's noise is
        noise_multiplier * clip / cohort; with `noise_cohort_size` C it is that of a
        C-client cohort: the sum's noise shrinks by denominator / C."""
        return self.noise_multiplier * self.clip * self.cohort_scale

    @property
    def cohort_scale(self) -> float:
        return self.denominator / self.noise_cohort_size if self.noise_cohort_size else 1.0

    def epsilon(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta, self.accountant)

    def report(self, rounds: int, rounds_planned: int, secagg: dict[str, Any] | None = None,
               run: str = "") -> dict[str, Any]:
        """user_level.json: what an auditor needs to recompute the epsilon, and what it covers."""
        from importlib.metadata import version

        eps = self.epsilon(rounds)
        return {
            "version": 1,
            "privacy_unit": PRIVACY_UNIT,
            "mechanism": MECHANISM,
            "noise_added_by": NOISE_BY[self.secure_aggregation],
            "covers": COVERS,
            **asdict(self),
            "noise_std": self.noise_std,
            "sampling_note": ("Poisson: each client joins each round independently with probability sample_rate, "
                              "drawn by the server from OS entropy and kept secret" if self.sampling == "poisson" else
                              "fixed: a fixed number of clients per round; no amplification by sampling claimed "
                              "(sample_rate 1.0: each round counts as if every client took part)"),
            "rounds": rounds,
            "history": [c.to_dict() for c in rounds_as_charges(self.noise_multiplier, self.sample_rate, rounds, run)],
            "rounds_planned": rounds_planned,
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_planned": self.epsilon(rounds_planned) if self.noise_multiplier else None,
            "secure_aggregation_detail": secagg,
            "library_versions": {"opacus": version("opacus"), "dp-accounting": version("dp-accounting")},
            **(self._simulated(rounds) if self.noise_cohort_size else {}),
        }

    def _simulated(self, rounds: int) -> dict[str, Any]:
        """What a run with `noise_cohort_size` must say plainly about its claim."""
        real = math.inf
        for accountant in dict.fromkeys((self.accountant, "rdp")):  # PRV fails outright on very little noise
            try:
                real = epsilon(self.noise_multiplier * self.cohort_scale, self.sample_rate, rounds, self.delta,
                               accountant)
                break
            except (RuntimeError, ValueError, OverflowError):
                continue
        return {
            "simulated_cohort": (
                f"SIMULATION OF A LARGER COHORT: this run trained about {self.denominator:g} clients per round "
                f"and added the noise of a {self.noise_cohort_size}-client cohort (noise std on the sum "
                f"{self.noise_std:g} = noise_multiplier * clip * {self.denominator:g}/{self.noise_cohort_size}). "
                f"`epsilon` is the one a deployment with {self.noise_cohort_size} clients per round at the same "
                "sampling rate would have; it is not a guarantee of this run"),
            "epsilon_of_this_run": real if math.isfinite(real) else None,
        }
