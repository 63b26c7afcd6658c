"""What it costs: epsilon from a list of charges, and noise calibration.

Opacus' accountants are the primary ones (PRV by default: tight, and it agrees with
dp-accounting's PLD to about 0.2%). The independent recomputation with dp-accounting
lives in `fedllm.privacy.audit`, which reads only the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from fedllm.privacy.events import Charge

ACCOUNTANTS = ("prv", "rdp")


def _history(charges: Sequence[Charge]) -> list[tuple[float, float, int]]:
    """(noise multiplier, sample rate, steps), identical mechanisms merged.

    Composition is commutative, so merging changes no epsilon; it keeps PRV and PLD
    fast (one entry per distinct mechanism instead of one per round).
    """
    merged: dict[tuple[float, float], int] = {}
    for c in charges:
        if c.steps > 0:
            merged[(c.noise_multiplier, c.sample_rate)] = merged.get((c.noise_multiplier, c.sample_rate), 0) + c.steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


def epsilon(charges: Sequence[Charge], delta: float, accountant: str = "prv") -> float:
    """Epsilon of all charges composed, with Opacus' `accountant` ("prv" or "rdp")."""
    from opacus.accountants import create_accountant

    history = _history(charges)
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """The noise multiplier that spends `target_epsilon` over `steps` steps (to within
    0.5%, never above). Cached: clients of similar size share a sample rate."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.005))
