"""Check every client reply before any of it is used; nothing a client sends may raise.

A reply is taken apart only after its size, declared dtype and shape were checked, and
decoded arrays are checked again (their header may lie). Metrics are typed and
range-checked, epsilon reports validated against their schema and hash chain, client ids
bounded; anything else is a rejection with a reason the server logs (strings a client
sent are escaped and cut first). `check_train_reply` and `check_evaluate_reply` are
total: an unexpected shape of anything is a rejection, never an exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from fedllm import messages as wire
from fedllm.privacy.report import check_report
from fedllm.untrusted import MAX_TEXT, error_summary, number_in, say
from server.decode import AdapterSpec, decode_array, decode_delta

__all__ = ["AdapterSpec", "Expect", "Verdict", "check_evaluate_reply", "check_secure_metrics", "check_train_reply",
           "decode_array", "decode_delta", "error_summary"]
TRAIN_RECORDS = frozenset(wire.TRAIN_REPLY)
EVAL_RECORDS = frozenset(wire.EVAL_REPLY)
MAX_CLIENT_ID = wire.MAX_CLIENT_ID
MAX_LOSS = 1e4  # a per-token cross-entropy this large is no training result


@dataclass(frozen=True)
class Expect:
    """What the server knows of a node before it replies (from discovery and the config)."""

    client_id: str = ""  # "" when unknown: the reply's own claim is then not checked against it
    num_records: int | None = None
    num_heldout: int | None = None
    local_steps: int | None = None
    privacy: bool = False  # record-level DP: an update must come with a valid report
    specialists: int = 1  # hive.k: above 1, a plain update names the specialist it is for


@dataclass
class Verdict:
    """What a reply amounts to: accepted (with its delta), declined, or rejected (`reason`)."""

    reason: str = ""
    declined: str = ""
    delta: dict[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    @property
    def accepted(self) -> bool:
        return not self.reason and not self.declined


TRAIN_RANGES: dict[str, tuple[float, float, bool]] = {  # metric: (low, high, integer)
    wire.TRAIN_LOSS: (0.0, MAX_LOSS, False), wire.STEPS: (0, 10**7, True), wire.EPSILON: (0.0, 1e4, False),
    wire.NUM_EXAMPLES: (1, 2**31, True)}
assert set(TRAIN_RANGES) == wire.TRAIN_METRICS


def check_metrics(metrics: Mapping, ranges: Mapping[str, tuple[float, float, bool]]) -> str:
    """"" when `metrics` has exactly `ranges`' keys, each a number in its range."""
    keys = set(metrics.keys())
    if keys != set(ranges):
        return f"metric keys {[say(k, 40) for k in sorted(keys)][:12]}, expected {sorted(ranges)}"
    for key, (lo, hi, integer) in ranges.items():
        if not number_in(metrics[key], lo, hi, integer):
            return f"metric {key}: {say(repr(metrics[key]), 40)} is not {'an integer' if integer else 'a number'} " \
                   f"in [{lo:g}, {hi:g}]"
    return ""


def _declared_metrics(metrics: Mapping, ranges, declared: int | None, what: str) -> tuple[dict[str, float], str]:
    """(the metrics as floats, "") when typed, in range, and `num-examples` is what the node
    declared at discovery; else ({}, why)."""
    why = check_metrics(metrics, ranges)
    if why:
        return {}, why
    values = {k: float(v) for k, v in metrics.items()}
    if declared is not None and values[wire.NUM_EXAMPLES] != declared:
        return {}, f"num-examples {values['num-examples']:.0f}, but the node declared {declared} {what} at discovery"
    return values, ""


def _client_record(content, expect: Expect) -> tuple[str, str, str]:
    """(claimed client id, declined reason, why the record is bad)."""
    if wire.CLIENT not in content.config_records:
        return "", "", "no client record"
    record = content.config_records[wire.CLIENT]
    extra = set(record.keys()) - wire.CLIENT_FIELDS
    if extra:
        return "", "", f"client record has unknown fields {[say(k, 40) for k in sorted(extra)][:3]}"
    return _client_fields(record.get(wire.CLIENT_ID, ""), record.get(wire.DECLINED, ""), expect)


def _client_fields(claimed: Any, declined: Any, expect: Expect) -> tuple[str, str, str]:
    """(claimed client id, declined reason, why they are bad): bounded strings, the id the node's."""
    if not isinstance(claimed, str) or not 0 < len(claimed) <= MAX_CLIENT_ID:
        return "", "", f"client id {say(claimed)} is not a string of 1..{MAX_CLIENT_ID} characters"
    if expect.client_id and claimed != expect.client_id:
        return claimed, "", f"reply claims client id {say(claimed)}, but node holds {say(expect.client_id)}"
    if not isinstance(declined, str) or len(declined) > MAX_TEXT:
        return claimed, "", f"declined reason is not a string of at most {MAX_TEXT} characters"
    return claimed, declined, ""


def _privacy_record(content) -> tuple[Any, str]:
    """(the report text or None, why the record is bad)."""
    if wire.PRIVACY not in content.config_records:
        return None, ""
    record = content.config_records[wire.PRIVACY]
    if set(record.keys()) != {wire.REPORT}:
        return None, "privacy record must hold exactly one field, report"
    return record[wire.REPORT], ""


def _records_ok(content, allowed: frozenset[str]) -> str:
    names = [*content.array_records, *content.metric_records, *content.config_records]
    unknown = set(names) - allowed
    if unknown:
        return f"unexpected records {[say(n, 40) for n in sorted(unknown)][:3]}"
    if len(names) != len(set(names)):
        return "duplicate record names"
    for name, kind in ((wire.ARRAYS, content.array_records), (wire.METRICS, content.metric_records)):
        if name in names and name not in kind:
            return f"record {name} has the wrong type"
    for name in (wire.CLIENT, wire.PRIVACY):
        if name in names and name not in content.config_records:
            return f"record {name} has the wrong type"
    return ""


def check_train_reply(msg: Message, spec: AdapterSpec, expect: Expect | None = None) -> Verdict:
    """The verdict on one train reply; never raises."""
    try:
        return _check_train(msg, spec, expect or Expect())
    except Exception as exc:  # noqa: BLE001 - belt and braces: a reply must never stop a round
        return Verdict(reason=f"malformed reply ({type(exc).__name__})")


def _envelope(msg: Message, records: frozenset[str], expect: Expect) -> tuple[Any, str, dict | None, str]:
    """What every reply carries around its payload: (content, declined reason, epsilon
    report or None, why the reply is bad)."""
    if msg.has_error():
        return None, "", None, f"client error: {error_summary(msg.error.reason)}"
    content = msg.content
    why = _records_ok(content, records)
    if why:
        return None, "", None, why
    claimed, declined, why = _client_record(content, expect)
    if not why:
        text, why = _privacy_record(content)
        if not why and text is not None:
            report, why = check_report(text, expect.client_id or claimed)
            return content, declined, report, why
    return content, declined, None, why


def _check_train(msg: Message, spec: AdapterSpec, expect: Expect) -> Verdict:
    content, declined, report, why = _envelope(msg, TRAIN_RECORDS, expect)
    if why:
        return Verdict(reason=why)
    if declined:
        if wire.ARRAYS in content.array_records:
            return Verdict(reason="a declined reply carries an update")
        return Verdict(declined=declined, report=report)
    if wire.ARRAYS not in content.array_records or wire.METRICS not in content.metric_records:
        return Verdict(reason="no update: arrays and metrics are required unless the client declines")
    if expect.privacy and report is None:
        return Verdict(reason="no epsilon report with a private update")
    delta, why = decode_delta(content.array_records[wire.ARRAYS], spec)
    if delta is None:
        return Verdict(reason=why)
    ranges = TRAIN_RANGES if expect.specialists <= 1 else {**TRAIN_RANGES,
                                                           wire.SPECIALIST: (0, expect.specialists - 1, True)}
    values, why = _declared_metrics(content.metric_records[wire.METRICS], ranges, expect.num_records, "records")
    if why:
        return Verdict(reason=why)
    if expect.local_steps is not None and values[wire.STEPS] != expect.local_steps:
        return Verdict(reason=f"steps {values['steps']:.0f}, expected local-steps={expect.local_steps}")
    if report is not None and abs(values[wire.EPSILON] - report["epsilon"]) > 1e-9 * max(1.0, report["epsilon"]):
        return Verdict(reason="metric epsilon differs from the epsilon report")
    return Verdict(delta=delta, metrics=values, report=report)


def check_evaluate_reply(msg: Message, metric_keys: frozenset[str], expect: Expect | None = None) -> Verdict:
    """The verdict on one evaluate reply (metrics, and a report when personal steps were
    charged); never raises."""
    try:
        return _check_evaluate(msg, metric_keys, expect or Expect())
    except Exception as exc:  # noqa: BLE001
        return Verdict(reason=f"malformed reply ({type(exc).__name__})")


def eval_ranges(metric_keys: frozenset[str]) -> dict[str, tuple[float, float, bool]]:
    ranges = {}
    for key in metric_keys:
        if key == wire.SPECIALIST:
            ranges[key] = (0, 63, True)  # fedllm.hive.MAX_K - 1; the evaluation checks it against hive.k
        elif key == wire.NUM_EXAMPLES:
            ranges[key] = (1, 2**31, True)
        elif key.endswith("perplexity"):
            ranges[key] = (1.0, 1e30, False)
        elif key.endswith("loss"):
            ranges[key] = (0.0, MAX_LOSS, False)
        elif key.endswith("declined"):
            ranges[key] = (0.0, 1.0, True)
        elif key.endswith("tokens"):
            ranges[key] = (0, 2**40, True)
        else:  # accuracies
            ranges[key] = (0.0, 1.0, False)
    return ranges


def _check_evaluate(msg: Message, metric_keys: frozenset[str], expect: Expect) -> Verdict:
    content, declined, report, why = _envelope(msg, EVAL_RECORDS, expect)
    if why or declined:
        return Verdict(reason=why or "an evaluation reply cannot decline")
    if wire.METRICS not in content.metric_records:
        return Verdict(reason="no metrics")
    values, why = _declared_metrics(content.metric_records[wire.METRICS], eval_ranges(metric_keys), expect.num_heldout,
                                    "held-out records")
    if why:
        return Verdict(reason=why)
    return Verdict(metrics=values, report=report)


def check_secure_metrics(metrics: dict, expect: Expect | None = None) -> tuple[dict[str, Any] | None, str, str]:
    """The plain fields of a secure round's FitRes: client id, decline, epsilon report (its
    tensors, training metrics included, are masked: the protocol, not the server, vouches
    for their shape): (report, declined, why they are bad)."""
    try:
        expect = expect or Expect()
        unknown = set(metrics) - wire.SECURE_METRICS
        if unknown:
            return None, "", f"unexpected fields {[say(k, 40) for k in sorted(unknown)][:3]}"
        claimed, declined, why = _client_fields(metrics.get(wire.CLIENT_ID, ""), metrics.get(wire.DECLINED, ""), expect)
        if why:
            return None, "", why
        report = None
        if wire.REPORT in metrics:
            report, why = check_report(metrics[wire.REPORT], expect.client_id or claimed)
            if why:
                return None, declined, why
        return report, declined, ""  # its loss, steps and records are inside the masked sum
    except Exception as exc:  # noqa: BLE001
        return None, "", f"malformed reply ({type(exc).__name__})"

