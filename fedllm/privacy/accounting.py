"""What it costs: epsilon from a list of charges, and noise calibration.

Opacus' accountants are the primary ones (PRV by default: tight, and it agrees with
dp-accounting's PLD to about 0.2%). The independent recomputation with dp-accounting
lives in `fedllm.audit`, which reads only the files.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

from fedllm.privacy.events import Charge

ACCOUNTANTS = ("prv", "rdp")


@lru_cache(maxsize=1)
def rdp_orders() -> list[float]:
    """Opacus' default RDP orders (1.1 .. 63) and larger ones, where much noise per step or
    a small sample rate puts the optimum (Opacus otherwise warns that its bound is loose)."""
    from opacus.accountants import RDPAccountant

    return [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 257, 8), 320, 384, 512, 768, 1024]


def _epsilon_of(acc, accountant: str, delta: float, **kwargs) -> float:
    """Opacus' epsilon. RDP uses the wider orders; PRV, which asks RDP only for the range of
    its grid, keeps Opacus' note on that range out of the user's terminal (and numpy's on
    log(1 - q) of an unsampled release, q = 1, which it handles)."""
    import numpy as np

    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta, alphas=rdp_orders()))
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta, **kwargs))


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


def epsilon(charges: Sequence[Charge], delta: float, accountant: str = "prv",
            relative_error: float | None = None) -> float:
    """Epsilon of all charges composed, with Opacus' `accountant` ("prv" or "rdp").
    `relative_error` refines PRV's error bound to that fraction of epsilon (a small
    epsilon, as user-level claims have, is otherwise a few percent off)."""
    from opacus.accountants import create_accountant

    history = _history(charges)
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = history
    rough = _epsilon_of(acc, accountant, delta)
    if accountant != "prv" or relative_error is None:
        return rough
    return _epsilon_of(acc, accountant, delta, eps_error=max(1e-5, relative_error * rough))


MIN_NOISE_MULTIPLIER = 0.3  # below this, calibration's accountants slow without bound, and no privacy is left
CALIBRATION_SECONDS = 60.0


@lru_cache(maxsize=256)
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
              time_limit: float = CALIBRATION_SECONDS,
              fixed: tuple[tuple[float, float, int], ...] = ()) -> float:
    """The noise multiplier that spends `target_epsilon` over `steps` steps (to within
    0.5%, never above), at least MIN_NOISE_MULTIPLIER (more noise than the target needs
    is still honest). Opacus' bisection, bounded below and in time. Cached: clients of
    similar size share a sample rate. `fixed`: other planned releases, (noise multiplier,
    sample rate, steps) each, composed with the steps (a hive's private choices)."""
    import time

    from opacus.accountants import create_accountant

    from fedllm.privacy.engine import PrivacyError

    acc = create_accountant(accountant)
    deadline = time.monotonic() + time_limit

    def eps(sigma: float) -> float:
        if time.monotonic() > deadline:
            raise PrivacyError(f"noise calibration for epsilon {target_epsilon:g} took over {time_limit:g}s; "
                               "lower privacy.target-epsilon or raise privacy.planned-rounds")
        acc.history = [(sigma, sample_rate, steps), *fixed]
        try:
            return _epsilon_of(acc, accountant, delta)
        except (MemoryError, ValueError, OverflowError) as exc:
            raise PrivacyError(f"noise calibration failed at noise multiplier {sigma:g} ({exc!r}); lower "
                               "privacy.target-epsilon or use privacy.accountant=rdp") from exc

    if fixed and eps(1e6) > target_epsilon:
        raise PrivacyError(f"epsilon {target_epsilon:g} at delta {delta:g} is spent by the planned specialist "
                           "choices alone; raise hive.select-noise or privacy.target-epsilon")
    low, high = 0.0, 20.0  # Opacus' search, step for step: the same multiplier as get_noise_multiplier
    while (eps_high := eps(high)) > target_epsilon:
        high *= 2
        if high > 1e6:
            raise PrivacyError(f"epsilon {target_epsilon:g} at delta {delta:g} is out of reach over {steps} steps")
    while target_epsilon - eps_high > 0.005:
        mid = (low + high) / 2
        if mid < MIN_NOISE_MULTIPLIER:  # never look below the floor: return it if it meets the target
            if eps(MIN_NOISE_MULTIPLIER) <= target_epsilon:
                return MIN_NOISE_MULTIPLIER
            low = mid = MIN_NOISE_MULTIPLIER
            continue
        if (e := eps(mid)) < target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high
