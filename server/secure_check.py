"""What an unmasked SecAgg+ sum may hold, given who contributed to it.

The protocol hides each device's vector, so nothing stops one device from adding any
offset under its mask (or forging the weight Flower divides by). What the server can check
is the sum: honest devices each quantise into [-c, c] per coordinate (c: the clipping
range), so a sum of T trained deltas lies within T * c of zero, plus one quantisation step
per contributor; a hive slot's only within its choosers' count * c; the training metrics
are bounded per field and the hive's one-hot counts are integers that add up to T; under
user-level DP every delta is clipped in L2, so the sum's norm is at most T * clip plus
the quantisation bound. A sum outside these is not one honest devices can produce, and
the round is refused. Inside them a hostile device still moves each coordinate of the mean
by up to c (docs/security.md): only proofs about each masked input would remove that.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from fedllm import secure_metrics
from fedllm.hive import SLOT


def aggregate_problem(sums: Mapping[str, np.ndarray], metric_sum: np.ndarray, *, clip_range: float, bits: int,
                      results: int, trained: int, k: int = 1, user_clip: float | None = None) -> str:
    """Why the decoded sums (`sums`: per adapter key; `metric_sum`: the metrics tensor, both
    the protocol's mean times the honest weight) are impossible from `results` contributors
    of which `trained` trained; "" when they are possible."""
    c, step = clip_range, 2 * clip_range / 2**bits
    slack = results * step + 1e-6 * max(1.0, results * c)
    metrics, why = _metrics_problem(metric_sum, c, bits, results, trained, k)
    if why:
        return why
    counts = [round(metrics[secure_metrics.chose(j)]) for j in range(k)] if k > 1 else None
    for key, value in sums.items():
        value = np.asarray(value, np.float64)
        if not np.isfinite(value).all():
            return f"{key}: not finite"
        match = SLOT.fullmatch(key) if counts is not None else None
        writers = counts[int(match.group(1))] if match else trained
        bound = writers * c + slack
        peak = float(np.abs(value).max()) if value.size else 0.0
        if peak > bound:
            return (f"{key}: a coordinate of the sum is {peak:.4g}, beyond what {writers} honest device(s) can add "
                    f"({writers} x clipping range {c:g} + quantisation {slack:.3g})")
    if user_clip is not None:
        total = math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in sums.values()))
        d = sum(int(np.asarray(v).size) for v in sums.values())
        bound = trained * user_clip + slack * math.sqrt(d)
        if total > bound:
            return (f"the sum's L2 norm is {total:.4g}, above {trained} x user-dp.clip {user_clip:g} + quantisation "
                    f"{slack * math.sqrt(d):.3g}")
    return ""


def _metrics_problem(metric_sum: np.ndarray, c: float, bits: int, results: int, trained: int,
                     k: int) -> tuple[dict[str, float], str]:
    spec = secure_metrics.fields(k)
    metric_sum = np.asarray(metric_sum, np.float64).reshape(-1)
    if metric_sum.shape != (len(spec),) or not np.isfinite(metric_sum).all():
        return {}, f"the metrics sum has shape {metric_sum.shape}, expected ({len(spec)},) finite values"
    raw = {name: float(v) / c * scale for v, (name, scale) in zip(metric_sum, spec)}
    scales = dict(spec)
    tolerance = {name: err + 1e-6 * max(1.0, scales[name] * results)
                 for name, err in secure_metrics.max_errors(results, bits, k).items()}
    for name, scale in spec:
        top = (1.0 if name == secure_metrics.TRAINED else scale) * trained
        if not -tolerance[name] <= raw[name] <= top + tolerance[name]:
            return raw, f"metric {name} sums to {raw[name]:.4g}, outside [0, {top:g}] for {trained} trained device(s)"
    if abs(raw[secure_metrics.TRAINED] - trained) > tolerance[secure_metrics.TRAINED]:
        return raw, (f"{raw[secure_metrics.TRAINED]:.4g} devices trained by the sum, {trained} by their replies")
    if k > 1:
        counts = [raw[secure_metrics.chose(j)] for j in range(k)]
        for j, v in enumerate(counts):
            name = secure_metrics.chose(j)
            if abs(v - round(v)) > max(tolerance[name], 1e-3):
                return raw, f"specialist {j}'s count is {v:.4g}, not a whole number of devices"
        if sum(round(v) for v in counts) != trained:
            return raw, (f"the specialist counts {[round(v) for v in counts]} add up to {sum(round(v) for v in counts)}, "
                         f"not the {trained} devices that trained")
    return raw, ""
