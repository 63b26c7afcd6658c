"""A secure round's training metrics, inside the masked vector: the server learns their
sums over the devices that contributed, never one device's loss, steps or record count.

The device appends one more tensor to the adapter tensors it masks (`encode`): each
metric scaled into the quantiser's range [0, c] (c = `clipping_range`). SecAgg+ sums the
contributors' vectors, the server decodes the sum (`decode`). Flower's stochastic
rounding is unbiased and off by less than one grid step 2c/2**bits per contributor, so a
decoded sum is off by less than contributors * 2 * scale / 2**bits (`max_errors`), and the
integer ones (devices, steps, records) are rounded. A value above its scale is clipped
to it (stated, not hidden: a loss of 64 nats or a device with 100,000 records).

What the server still learns per device in a secure round: its client id, whether it
declined (and why), and its epsilon report (the auditor needs it per device).
"""

from __future__ import annotations

import numpy as np

from fedllm import messages as wire

TRAINED = "trained"  # 1 for a device that trained: the sums' denominator
# (name, scale): the largest value each field carries
FIELDS = ((TRAINED, 1.0), (wire.TRAIN_LOSS, 64.0), (wire.STEPS, 10_000.0), (wire.NUM_EXAMPLES, 100_000.0))
INTEGER = frozenset({TRAINED, wire.STEPS, wire.NUM_EXAMPLES})
KEY = "fedllm.metrics"  # the appended tensor's name in the reply's order of tensors


def clipping_range(config) -> float:
    """Per-coordinate range of the quantiser. Under user-level DP the L2 clip bounds every
    coordinate, so quantisation clips nothing; otherwise Flower's default, 8."""
    if config.secagg.clipping_range:
        return config.secagg.clipping_range
    return config.user_dp.clip if config.user_dp.enabled else 8.0


def chose(j: int) -> str:
    """A hive's count of the devices that chose specialist j (a one-hot entry per device)."""
    return f"chose-{j}"


def fields(k: int = 1) -> tuple[tuple[str, float], ...]:
    """FIELDS, and with a hive of k > 1 specialists the one-hot of the device's choice."""
    return FIELDS + (tuple((chose(j), 1.0) for j in range(k)) if k > 1 else ())


def encode(metrics: dict[str, float] | None, c: float, k: int = 1) -> np.ndarray:
    """The metrics tensor a device masks; zeros for a device that did not train."""
    spec = fields(k)
    if not metrics:
        return np.zeros(len(spec), dtype=np.float64)
    chosen = int(metrics.get(wire.SPECIALIST, -1))
    values = [1.0 if name == TRAINED else float(name == chose(chosen)) if name.startswith("chose-")
              else float(metrics[name]) for name, _ in spec]
    return np.asarray([min(max(v / scale, 0.0), 1.0) * c for v, (_, scale) in zip(values, spec)], np.float64)


def decode(total: np.ndarray, c: float, k: int = 1) -> dict[str, float]:
    """Sums over the contributors from the unmasked sum of their metrics tensors (a hive's
    counts unrounded: they divide its specialists' sums)."""
    spec = fields(k)
    total = np.asarray(total, np.float64).reshape(-1)
    if total.shape != (len(spec),) or not np.isfinite(total).all():
        raise ValueError(f"the metrics sum has shape {total.shape}, expected ({len(spec)},)")
    sums = {name: float(v) / c * scale for v, (name, scale) in zip(total, spec)}
    return {name: float(round(v)) if name in INTEGER else v for name, v in sums.items()}


def max_errors(contributors: int, bits: int, k: int = 1) -> dict[str, float]:
    """The largest quantisation error of each decoded sum (before rounding)."""
    return {name: contributors * 2 * scale / 2**bits for name, scale in fields(k)}
