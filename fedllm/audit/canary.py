"""Empirical privacy auditing in one training run (Steinke, Nasr and Jagielski,
"Privacy auditing with one (1) training run", NeurIPS 2023).

m canary records are each included in training independently with probability 1/2.
After training, the auditor scores every canary (loss before minus loss after: an
included canary was learned, so its loss fell more; `fedllm/audit/canary_run.py` says
before and after what), guesses "in" for the r/2 highest
scores and "out" for the r/2 lowest, and counts correct guesses. Under (eps, delta)-DP
the number of correct guesses is stochastically dominated by Binomial(r, e^eps / (1 +
e^eps)) up to a delta term (their Theorem 3.1 / Proposition 5.2), so a count that would
be too unlikely under eps is evidence against eps: the largest such eps at 95%
confidence is a lower bound on the true epsilon. A correct DP implementation can never
be shown to exceed its claim except with probability 5%.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (eps, delta)-DP with m canaries."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomised response
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, tail = 0.0, 0.0  # tail = P[v > Binomial(r, q) >= v - i]
    for i in range(1, v + 1):
        tail += float(binom.pmf(v - i, r, q))
        alpha = max(alpha, tail / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest eps that v correct guesses out of r reject at `confidence` (0 if none)."""
    p = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < p:
        low, high = high, high * 2
    for _ in range(40):  # bisection to ~1e-12 of the bracket
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class Guesses:
    guess: list[int]  # +1 "in", -1 "out", 0 abstain; one per canary
    made: int
    correct: int


def guess(scores: Sequence[float], included: Sequence[bool], r: int) -> Guesses:
    """"In" for the r/2 highest scores, "out" for the r/2 lowest; ties broken by index,
    which is random (canaries are drawn in random order)."""
    if not 0 < r <= len(scores) or r % 2:
        raise ValueError(f"guesses={r}: give an even number between 2 and the number of canaries ({len(scores)})")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    out = [0] * len(scores)
    for i in order[: r // 2]:
        out[i] = -1
    for i in order[len(order) - r // 2:]:
        out[i] = 1
    correct = sum(1 for g, inc in zip(out, included) if (g == 1 and inc) or (g == -1 and not inc))
    return Guesses(out, r, correct)


def make_canaries(m: int, rng: random.Random, words: int = 8, letters: int = 4) -> list[str]:
    """m distinct strings of random lower-case letter groups: no text teaches them, so
    only training on a canary itself makes its loss fall much; all share one shape, so
    what is learned about canaries in general moves all of them alike."""
    seen: set[str] = set()
    canaries: list[str] = []
    while len(canaries) < m:
        text = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(letters)) for _ in range(words))
        if text not in seen:
            seen.add(text)
            canaries.append(text)
    return canaries


@torch.no_grad()
def record_losses(model, examples: list[list[int]], pad_id: int, batch_size: int = 32) -> list[float]:
    """Mean next-token loss of each record."""
    from fedllm.data.tokens import collate
    from fedllm.train import sequence_losses

    model.eval()
    losses: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start: start + batch_size], pad_id)
        losses.extend(sequence_losses(model, batch["input_ids"], batch["attention_mask"]).tolist())
    return losses
