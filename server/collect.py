"""Ask the sampled nodes to train and keep what passes the checks: a round's contributions
(plain) or its secure sum (SecAgg+), with the round's metrics.jsonl record.

Nothing is aggregated here; `fedllm.aggregate` takes it from there.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm import messages as wire
from fedllm.aggregate import Contribution, Delta, norm, over_clip
from fedllm.config import Config
from fedllm.untrusted import say
from server.books import Books
from server.sampling import NodeInfo
from server.secure import quantization, secure_round
from server.validation import AdapterSpec, Expect, Verdict, check_secure_metrics, check_train_reply

log = logging.getLogger("fedllm.server")


@dataclass
class Cohort:
    """Who the server is talking to this round, and what it knows of them."""

    grid: Grid
    config: Config
    spec: AdapterSpec
    node_client: dict[int, str]
    infos: dict[int, NodeInfo]
    books: Books

    def expect(self, node: int) -> Expect:
        info = self.infos.get(node)
        return Expect(client_id=info.client_id if info else self.node_client.get(node, ""),
                      num_records=info.num_records if info else None,
                      num_heldout=info.num_heldout if info else None,
                      local_steps=self.config.local_steps, privacy=self.config.privacy.enabled)

    def client(self, node: int) -> str:
        return self.node_client.get(node, "?")


@dataclass
class Collected:
    record: dict[str, Any]  # the round's `train` entry in metrics.jsonl
    contributions: list[Contribution] = field(default_factory=list)  # plain rounds
    secure_sum: Delta | None = None  # secure rounds: the sum of the contributed deltas
    contributors: int = 0


def screen(cohort: Cohort, replies, nodes: list[int], check) -> list[tuple[int, str, Verdict]]:
    """(node, client, verdict) per reply: one reply per asked node; any other is rejected."""
    asked, seen, out = set(nodes), set(), []
    for msg in replies:
        try:
            node = int(msg.metadata.src_node_id)
        except Exception:  # noqa: BLE001
            node = -1
        if node not in asked:
            verdict = Verdict(reason="reply from a node that was not asked this round")
        elif node in seen:
            verdict = Verdict(reason="a second reply from the same node in one round")
        else:
            seen.add(node)
            verdict = check(msg, node)
        out.append((node, cohort.client(node), verdict))
    return out


def norm_bound(config: Config, norms: list[float]) -> float:
    """validation.max-delta-norm for this round: a number, `auto` (a multiple of the
    round's lower median norm), or infinity when `none`."""
    setting = config.validation.max_delta_norm
    if setting == "none":
        return math.inf
    if setting == "auto":
        return config.validation.auto_factor * statistics.median_low(norms) if norms else math.inf
    return float(setting)


def train_messages(nodes: list[int], arrays: ArrayRecord, request: ConfigRecord) -> list[Message]:
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: request})
    return [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def collect_plain(cohort: Cohort, server_round: int, nodes: list[int], arrays: ArrayRecord,
                  request: ConfigRecord) -> Collected:
    """A plain round: the accepted deltas, sorted by client id (the sum's order, and so its
    rounding, is reproducible), each weighted 1 under DP and by its record count otherwise."""
    config, books = cohort.config, cohort.books
    messages = train_messages(nodes, arrays, request)
    replies = list(cohort.grid.send_and_receive(messages, timeout=config.round_timeout)) if messages else []
    screened = screen(cohort, replies, nodes, lambda msg, node: check_train_reply(msg, cohort.spec,
                                                                                  cohort.expect(node)))
    candidates, dropped, declined = [], [], []
    for node, client, verdict in screened:
        if not verdict.reason:
            books.book(server_round, client, verdict.declined, verdict.report, declined)
        if verdict.accepted:
            candidates.append((node, client, verdict, norm(verdict.delta)))
        elif verdict.reason:
            dropped.append((node, client, verdict.reason))
    bound = norm_bound(config, [n for *_, n in candidates])
    setting = f"validation.max-delta-norm={config.validation.max_delta_norm}"
    accepted = []
    for node, client, verdict, size in candidates:
        if size > bound:
            dropped.append((node, client, f"delta L2 norm {size:.4g} exceeds the bound {bound:.4g} ({setting})"))
        else:
            accepted.append((node, client, verdict))
    accepted.sort(key=lambda item: item[1])
    contributions = [Contribution(client, v.delta, _weight(cohort, node, v)) for node, client, v in accepted]
    if config.user_dp.enabled:  # the device clipped; a larger delta would void the noise's calibration
        contributions, over = over_clip(contributions, config.user_dp.clip)
        node_of = {client: node for node, client, _ in accepted}
        dropped += [(node_of[c], c, f"delta L2 norm {n:.4g} exceeds user-dp.clip={config.user_dp.clip:g}")
                    for c, n in over]
    kept = {c.client for c in contributions}
    accepted = [a for a in accepted if a[1] in kept]
    for node, client, reason in dropped:
        log.warning("round %d: dropped reply from client %s (node %d): %s", server_round, say(client), node, reason)
    books.rejected += len(dropped)
    upload = [sum(a.nbytes for a in v.delta.values()) for _, _, v in accepted]
    books.upload.extend(upload)
    return Collected({
        "sampled": [cohort.client(n) for n in nodes],
        "clients": [client for _, client, _ in accepted],
        "train_loss": [v.metrics[wire.TRAIN_LOSS] for _, _, v in accepted],
        "steps": [int(v.metrics[wire.STEPS]) for _, _, v in accepted],
        "upload_bytes": upload,
        "dropped": [{"node": n, "client_id": c, "reason": r} for n, c, r in dropped],
        "declined": declined,
    }, contributions=contributions, contributors=len(contributions))


def _weight(cohort: Cohort, node: int, verdict: Verdict) -> float:
    """Under record-level DP every update weighs the same: the record count is not private."""
    if cohort.config.privacy.enabled:
        return 1
    info = cohort.infos.get(node)
    return info.num_records if info else int(verdict.metrics[wire.NUM_EXAMPLES])


def collect_secure(cohort: Cohort, server_round: int, nodes: list[int], arrays: ArrayRecord,
                   request: ConfigRecord) -> Collected:
    """A SecAgg+ round: the sum of the contributed deltas, or None when the protocol failed.

    Masked updates cannot be dropped one by one; a reply's plain fields are still
    checked, and the sum is rejected whole if the protocol fails."""
    config, books = cohort.config, cohort.books
    result = secure_round(cohort.grid, config, server_round, nodes, arrays, request)
    answered, losses, steps, declined, flagged = [], [], [], [], []
    for node, metrics in sorted(result.replies.items()):
        client = cohort.client(node)
        report, why, reason = check_secure_metrics(metrics, cohort.expect(node))
        if reason:  # already inside the sum: say so, it cannot be taken out
            log.warning("round %d: client %s (node %d) sent a bad secure reply: %s", server_round, say(client),
                        node, reason)
            flagged.append({"node": node, "client_id": client, "reason": reason})
            continue
        books.book(server_round, client, why, report, declined)
        if not why:
            answered.append(client)
            losses.append(float(metrics[wire.TRAIN_LOSS]))
            steps.append(int(metrics[wire.STEPS]))
    upload = [result.upload_bytes.get(n, 0) for n in nodes if n in result.replies]
    books.upload.extend(upload)
    done = result.total is not None
    contributors = result.contributors if done else 0
    secagg: dict[str, Any] = {"shares": result.shares, "threshold": result.threshold,
                              "sampled": result.sampled, "contributed": len(result.replies),
                              "dropped_out": result.sampled - len(result.replies),
                              "quantization": quantization(config, contributors, cohort.spec.num_values)}
    if result.error:
        secagg["error"] = result.error
        log.warning("round %d: %s", server_round, result.error)
        if result.sampled < 3 or result.threshold >= result.shares:
            books.small_cohort_rounds.append(server_round)
    return Collected({
        "sampled": [cohort.client(n) for n in nodes],
        "clients": answered if done else [],
        "train_loss": losses if done else [],
        "steps": steps if done else [],
        "upload_bytes": upload,
        "dropped": flagged,
        "declined": declined,
        "secagg": secagg,
    }, secure_sum=result.total, contributors=contributors)


def as_arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    """A float32 ArrayRecord of the global adapter (the form Flower sends)."""
    from flwr.app import Array

    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in values.items()})
