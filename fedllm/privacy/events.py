"""What happened, as plain data: every DP-SGD participation of a client.

Like dp-accounting's `DpEvent`, a charge records exactly what an accountant needs
(noise multiplier, sampling rate, number of steps) and nothing about how it was
implemented. Any accountant recomputes epsilon from a list of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Charge:
    """`steps` Poisson-subsampled Gaussian steps at `sample_rate` with `noise_multiplier`."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    kind: str = "train"  # what the steps were for: "train" (shared), "personal", "local-only", or
    # "user-round": one round of user-level DP (sigma and q of the clipped sum; privacy/user_level.json),
    # or "records": zero steps, the device's record count changed and later charges sample at this rate,
    # or "select": a hive's private choice of specialist, one unsampled Gaussian release (fedllm.hive)
    run: str = ""  # the server's run id: a state store outlives runs, round numbers do not
    num_records: int = 0  # "records" entries: the new record count the rate was computed from

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["num_records"]:  # only a record-count change carries it: every other entry is as before
            del d["num_records"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Charge":
        return cls(round=int(d["round"]), noise_multiplier=float(d["noise_multiplier"]),
                   sample_rate=float(d["sample_rate"]), steps=int(d["steps"]), kind=str(d.get("kind", "train")), run=str(d.get("run", "")),
                   num_records=int(d.get("num_records", 0)))
