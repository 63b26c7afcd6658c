"""Check every client reply before it can touch the global adapter.

A reply is accepted only if it carries exactly the adapter's keys, with the right
shapes, float32, all finite, and the metrics the server expects. Anything else is
dropped with a reason the server logs; the round goes on with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

TRAIN_METRICS = frozenset({"num-examples", "train-loss", "steps", "epsilon"})


@dataclass(frozen=True)
class AdapterSpec:
    """What a valid delta looks like: key -> shape, all float32."""

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def from_state(cls, state) -> "AdapterSpec":
        return cls({k: tuple(v.shape) for k, v in state.items()})

    @property
    def num_values(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def client_id_of(msg: Message) -> str:
    try:
        return str(msg.content["client"]["client-id"])
    except Exception:  # noqa: BLE001 - an error reply or a malformed one has none
        return "?"


def check_train_reply(msg: Message, spec: AdapterSpec, metric_keys: frozenset[str] = TRAIN_METRICS) -> str | None:
    """None when the reply is acceptable, else why it is not."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    arrays = next(iter(content.array_records.values()))
    keys = set(arrays.keys())
    if keys != set(spec.shapes):
        unknown, missing = sorted(keys - set(spec.shapes)), sorted(set(spec.shapes) - keys)
        return f"adapter keys differ: unknown {unknown[:3]}, missing {missing[:3]}"
    for key, array in arrays.items():
        if array.dtype != "float32":
            return f"{key}: dtype {array.dtype}, expected float32"
        if tuple(array.shape) != spec.shapes[key]:
            return f"{key}: shape {tuple(array.shape)}, expected {spec.shapes[key]}"
        if not np.isfinite(array.numpy()).all():
            return f"{key}: non-finite values"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    if set(metrics.keys()) != metric_keys:
        return f"metric keys {sorted(metrics.keys())}, expected {sorted(metric_keys)}"
    for key, value in metrics.items():
        if isinstance(value, list) or not math.isfinite(float(value)):
            return f"metric {key}: {value!r} is not a finite number"
    if float(metrics["num-examples"]) <= 0:
        return f"metric num-examples: {metrics['num-examples']!r}, expected > 0"
    return None


def check_evaluate_reply(msg: Message, metric_keys: frozenset[str]) -> str | None:
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    if len(msg.content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(msg.content.metric_records)}"
    metrics = next(iter(msg.content.metric_records.values()))
    if set(metrics.keys()) != metric_keys:
        return f"metric keys {sorted(metrics.keys())}, expected {sorted(metric_keys)}"
    if any(isinstance(v, list) or not math.isfinite(float(v)) for v in metrics.values()):
        return "non-finite metric values"
    return None


def declined_reason(msg: Message) -> str:
    """The reason a client gave for declining a round, or "" if it did not decline."""
    if msg.has_error() or "client" not in msg.content.config_records:
        return ""
    return str(msg.content["client"].get("declined", "") or "")


def privacy_report(msg: Message) -> dict | None:
    """The client's epsilon report, if it sent a well-formed one."""
    if msg.has_error() or "privacy" not in msg.content.config_records:
        return None
    return parse_report(msg.content["privacy"].get("report"))


def parse_report(text) -> dict | None:
    import json

    try:
        report = json.loads(str(text))
    except (TypeError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("epsilon"), (int, float)):
        return None
    return report


def check_secure_metrics(metrics: dict) -> str | None:
    """The plain fields of a secure round's FitRes (its tensors are masked: the protocol,
    not the server, vouches for their shape)."""
    if not str(metrics.get("declined", "")):
        for key in ("train-loss", "steps"):
            value = metrics.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                return f"metric {key}: {value!r} is not a finite number"
    return None
