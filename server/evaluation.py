"""Held-out evaluation of the global adapter on a fixed set of clients, and after the last
round the personalisation table (personal and local-only adapters, on the devices)."""

from __future__ import annotations

import logging
import statistics
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedllm import messages as wire
from fedllm.rundir import RunDir
from server.collect import Cohort, screen
from server.transport import send_and_receive
from server.validation import check_evaluate_reply

log = logging.getLogger("fedllm.server")


def mean_metrics(per_client: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over clients: each client's held-out set counts once."""
    if not per_client:
        return {}
    return {m: statistics.fmean(c[m] for c in per_client.values()) for m in wire.SUMMARY_VALUES}


def evaluate(cohort: Cohort, server_round: int, nodes: list[int], arrays: ArrayRecord, request: ConfigRecord,
             personalise: bool = False) -> dict[str, Any]:
    """{"clients": client -> metrics, "mean": ...} of the replies that pass the checks."""
    request = ConfigRecord({**request, wire.PERSONALISE: personalise})
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: request})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
    expected = wire.PERSONAL_EVAL_METRICS if personalise else wire.EVAL_METRICS
    if cohort.config.hive.k > 1 and not cohort.config.secagg.enabled:  # which specialist each device took
        expected = expected | {wire.SPECIALIST}
    replies = send_and_receive(cohort.grid, messages, cohort.config.round_timeout)
    per_client: dict[str, dict[str, float]] = {}
    for node, client, verdict in screen(cohort, replies, nodes, lambda msg, node: check_evaluate_reply(
            msg, expected, cohort.expect(node))):
        if not verdict.reason and verdict.metrics.get(wire.SPECIALIST, 0) >= cohort.config.hive.k:
            verdict.reason = f"specialist {verdict.metrics[wire.SPECIALIST]:.0f} is not below hive.k"
        if verdict.reason or client == "?":
            log.warning("round %d: evaluation reply from node %d dropped: %s", server_round, node,
                        verdict.reason or "unknown node")
            continue
        if verdict.report is not None:
            cohort.books.record_privacy(client, verdict.report)
        per_client[client] = verdict.metrics
    return {"clients": dict(sorted(per_client.items())), "mean": mean_metrics(per_client)}


def personalisation(run: RunDir, method: str, base_eval: dict, last_eval: dict, common: list[str]) -> dict[str, Any]:
    """personalisation.csv (per client) and the summary fields, when it ran."""
    rows = [c for c in common if "personal-perplexity" in last_eval["clients"][c]]
    if not rows:
        return {"personalisation": {"method": method, "clients": 0}}

    def pick(client: str, prefix: str) -> dict[str, float]:
        m = last_eval["clients"][client]
        return {k: m[f"{prefix}-{k}"] for k in wire.SUMMARY_VALUES}

    run.write_personalisation([{
        "client_id": c, "base_perplexity": base_eval["clients"][c]["perplexity"],
        "local_only_perplexity": last_eval["clients"][c]["local-perplexity"],
        "global_perplexity": last_eval["clients"][c]["perplexity"],
        "personalised_perplexity": last_eval["clients"][c]["personal-perplexity"],
        "declined": int(last_eval["clients"][c][wire.PERSONAL_DECLINED])} for c in rows])
    beats = [last_eval["clients"][c]["personal-perplexity"] < last_eval["clients"][c]["perplexity"] for c in rows]
    return {
        "personalised": mean_metrics({c: pick(c, "personal") for c in rows}),
        "local_only": mean_metrics({c: pick(c, "local") for c in rows}),
        "personalisation": {
            "method": method, "clients": len(rows),
            "beats_global_fraction": sum(beats) / len(beats),
            "declined": sum(int(last_eval["clients"][c][wire.PERSONAL_DECLINED]) for c in rows),
        },
    }
