"""A hive of specialists: `hive.k` global adapters, each device training the one that fits
its data best (IFCA, Ghosh et al. 2020), the server averaging each from its choosers.

    request    every specialist, packed in one array record: `hive-j/<adapter key>`
    device     scores each specialist on its own training records, chooses one
               (privately under DP: `choose`), trains it, returns the delta for it
    plain      the delta and the chosen index (metric `specialist`)
    secure     one slot per specialist (the delta in the chosen one, zeros elsewhere) and a
               one-hot count inside the masked metrics: the server learns per-specialist
               sums and counts, never a device's choice
    server     each specialist aggregated from its choosers alone, with the same rule and
               server optimizer as a single adapter; a specialist nobody chose stays as it was

With k = 1 nothing is packed: every message, file and figure is today's.

The choice under record-level DP is a release of the device's records, so it is made
with report-noisy-max on votes: each training record votes for the specialist with the
lowest loss on it, Gaussian noise of std `hive.select-noise` is added to the k counts and
the largest noisy count wins. Adding or removing a record changes one count by one (L2
sensitivity 1), so the noisy counts are a Gaussian mechanism with noise multiplier
`select-noise`, and the choice, its post-processing, costs no more: the ledger charges it
as one unsampled Gaussian step (kind "select", sample rate 1), which every accountant and
the audit compose with the DP-SGD steps. Without DP the device takes the lowest mean loss
(IFCA's rule), ties broken by a per-device seed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedllm.errors import FedllmError

SLOT = re.compile(r"hive-(\d+)/(.+)")
SELECT = "select"  # the ledger kind of a private choice
MAX_K = 64


def slot_key(j: int, key: str) -> str:
    return f"hive-{j}/{key}"


def pack(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """k adapters as one mapping (k = 1: the adapter itself, unprefixed)."""
    if len(states) == 1:
        return dict(states[0])
    return {slot_key(j, k): v for j, state in enumerate(states) for k, v in state.items()}


def unpack(packed: Mapping[str, Any], k: int) -> list[dict[str, Any]]:
    """The k adapters of a packed mapping; refused unless it holds exactly k slots with the
    same keys (what a server sends is checked before a device uses it)."""
    if k == 1:
        return [dict(packed)]
    slots: list[dict[str, Any]] = [{} for _ in range(k)]
    for key, value in packed.items():
        match = SLOT.fullmatch(key)
        if match is None or not 0 <= int(match.group(1)) < k or match.group(1) != str(int(match.group(1))):
            raise FedllmError(f"hive.k={k}: array {key[:80]!r} is not a specialist slot hive-0..{k - 1}/<key>")
        slots[int(match.group(1))][match.group(2)] = value
    if any(set(s) != set(slots[0]) for s in slots) or not slots[0]:
        raise FedllmError(f"hive.k={k}: the specialists' slots do not hold the same adapter keys")
    return slots


def slotted(delta: Mapping[str, np.ndarray] | None, chosen: int | None, keys: Sequence[str],
            like: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """A secure upload in `keys` order: the delta in the chosen slot, zeros in every other
    (and everywhere for a device that did not train, `delta` None); an unpacked key (k = 1)
    is the delta itself."""
    out = []
    for key in keys:
        match = SLOT.fullmatch(key)
        name = match.group(2) if match else key
        mine = delta is not None and (match is None or (chosen is not None and int(match.group(1)) == chosen))
        out.append(np.asarray(delta[name], np.float64) if mine else np.zeros_like(np.asarray(like[key]), np.float64))
    return out


# -- the choice ---------------------------------------------------------------------------
def scored(examples: Sequence[Sequence[int]], cap: int, key: bytes) -> list[Sequence[int]]:
    """The records a device scores the specialists on: all of them (`cap` 0, or no more than
    `cap`), else each one independently with probability cap / n, decided by a keyed hash
    of its own tokens. Adding or removing a record then changes only whether that record
    votes, never which others do: the votes keep the L2 sensitivity 1 the ledger charges
    (a draw of `cap` indices would not: one record more reshuffles them all). Like DP-SGD's
    sample rate, the probability is a function of the record count the device declares."""
    n = len(examples)
    if not cap or n <= cap:
        return list(examples)
    threshold = int(cap / n * 2**64)
    return [e for e in examples if _uniform64(key, e) < threshold]


def _uniform64(key: bytes, record: Sequence[int]) -> int:
    digest = hashlib.blake2b(np.asarray(record, np.int64).tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little")


def votes(losses: np.ndarray) -> np.ndarray:
    """Per-specialist counts of the records (rows of `losses`, k columns) each fits best."""
    losses = np.asarray(losses, np.float64)
    return np.bincount(np.argmin(losses, axis=1), minlength=losses.shape[1]).astype(np.float64)


def choose(losses: np.ndarray, noise: float | None, rng: np.random.Generator) -> int:
    """The specialist a device trains: report-noisy-max on votes (`noise`: the Gaussian
    std, under DP; `rng` then from the OS), else the lowest mean loss, ties at random."""
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 2 or losses.shape[0] == 0 or not np.isfinite(losses).all():
        raise ValueError(f"scores of shape {losses.shape}: need finite losses, one row per record")
    if noise is not None:
        return int(np.argmax(votes(losses) + rng.normal(0.0, noise, size=losses.shape[1])))
    means = losses.mean(axis=0)
    best = np.flatnonzero(means <= means.min() + 1e-9 * max(1.0, abs(means.min())))
    return int(best[0] if len(best) == 1 else rng.choice(best))


# -- the server's side ----------------------------------------------------------------------
def combine(updates: Sequence[dict[str, np.ndarray] | None], shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """One packed update (zeros for a specialist nobody updated)."""
    return pack([u if u is not None else {k: np.zeros(s, np.float64) for k, s in shapes.items()} for u in updates])


def identical(states: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every specialist is the same adapter (a new hive): a choice among them then
    depends on no data, so it is made at random and charged nothing."""
    first = states[0]
    return all(set(s) == set(first) and all(_equal(s[k], first[k]) for k in first) for s in states[1:])


def _equal(a: Any, b: Any) -> bool:
    if hasattr(a, "equal") and hasattr(b, "equal"):  # torch tensors
        return bool(a.equal(b))
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def keep_unchosen(candidate: dict, current: Mapping[str, np.ndarray], state: dict, saved: dict,
                  updates: Sequence[Any]) -> dict:
    """After the server optimizer's step on the packed adapter: a specialist nobody chose
    keeps its values and its optimizer state (momentum must not move it)."""
    idle = {j for j, u in enumerate(updates) if u is None}
    if not idle:
        return candidate
    for key in candidate:
        match = SLOT.fullmatch(key)
        if match and int(match.group(1)) in idle:
            candidate[key] = np.asarray(current[key], np.float64)
            for name, arrays in state.items():
                if key in arrays:
                    if name in saved and key in saved[name]:
                        arrays[key] = saved[name][key]
                    else:
                        arrays[key] = np.zeros_like(arrays[key])
    return candidate


def purity(choices: Mapping[str, int], kinds: Mapping[str, str], k: int) -> list[dict[str, Any]]:
    """Per specialist: how many devices chose it and, where their kind is known (the
    simulation's corpora), the share of the most common kind among them."""
    table = []
    for j in range(k):
        members = [c for c, chosen in choices.items() if chosen == j]
        known = [kinds[c] for c in members if kinds.get(c)]
        counts = {kind: known.count(kind) for kind in sorted(set(known))}
        top = max(counts.items(), key=lambda item: item[1]) if counts else None
        table.append({"specialist": j, "devices": len(members), "kinds": counts,
                      "majority": top[0] if top else None,
                      "purity": round(top[1] / len(known), 4) if top else None})
    return table
