"""Ask the sampled nodes to train and keep what passes the checks: a round's contributions
(plain) or its secure sum (SecAgg+), with the round's metrics.jsonl record.

Nothing is aggregated here; `fedllm.aggregate` takes it from there.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm import messages as wire
from fedllm.aggregate import ROBUST, Contribution, Delta, RunningSum, norm, over_clip_norm
from fedllm.config import Config
from fedllm.untrusted import say
from server.books import Books
from server.sampling import NodeInfo
from fedllm import secure_metrics
from server.secure import quantization, secure_round
from server.transport import arrivals
from server.validation import AdapterSpec, Expect, Verdict, check_secure_metrics, check_train_reply

log = logging.getLogger("fedllm.server")
STREAM_AFTER = 16  # acceptable replies held to set an `auto` norm bound; later ones are added as they come


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
                      local_steps=self.config.local_steps, privacy=self.config.privacy.enabled,
                      specialists=self.config.hive.k)

    def client(self, node: int) -> str:
        return self.node_client.get(node, "?")


@dataclass
class Collected:
    record: dict[str, Any]  # the round's `train` entry in metrics.jsonl
    contributions: list[Contribution] = field(default_factory=list)  # plain rounds of a robust rule
    running: RunningSum | None = None  # plain rounds of every other rule: the sum as it arrived
    secure_sum: Delta | None = None  # secure rounds: the sum of the contributed deltas
    contributors: int = 0
    # a hive (hive.k > 1): per specialist, the plain running sums and the contributor counts
    # (secure rounds: decoded from the masked one-hot, fedllm.secure_metrics)
    running_by: list[RunningSum] | None = None
    counts: list[float] | None = None


def screen(cohort: Cohort, replies: Iterable[Message], nodes: list[int], check) -> Iterator[tuple[int, str, Verdict]]:
    """(node, client, verdict) per reply, as they come: one reply per asked node; any other
    is rejected."""
    asked, seen = set(nodes), set()
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
        yield node, cohort.client(node), verdict


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


class _Plain:
    """One plain round's bookkeeping: what is admitted goes into the sum (or, for a robust
    rule, which needs every delta, into a list), the rest into `dropped` with a reason."""

    def __init__(self, cohort: Cohort):
        self.cohort, config = cohort, cohort.config
        self.k = config.hive.k
        self.running = None if config.strategy.name in ROBUST else RunningSum(cohort.spec.shapes)
        self.running_by = [RunningSum(cohort.spec.shapes) for _ in range(self.k)] \
            if self.k > 1 and self.running is not None else None
        self.contributions: list[Contribution] = []
        self.rows: list[tuple[str, float, int, int]] = []  # client, loss, steps, upload bytes
        self.chosen: list[int] = []  # a hive: each admitted row's specialist
        self.dropped: list[tuple[int, str, str]] = []
        self.declined: list[dict] = []
        self.user_clip = config.user_dp.clip if config.user_dp.enabled else None

    def admit(self, node: int, client: str, verdict: Verdict, size: float, bound: float) -> None:
        setting = f"validation.max-delta-norm={self.cohort.config.validation.max_delta_norm}"
        if size > bound:
            self.dropped.append((node, client, f"delta L2 norm {size:.4g} exceeds the bound {bound:.4g} ({setting})"))
            return
        if self.user_clip is not None and over_clip_norm(size, self.user_clip):
            # the device clipped; a larger delta would void the noise's calibration
            self.dropped.append((node, client, f"delta L2 norm {size:.4g} exceeds user-dp.clip={self.user_clip:g}"))
            return
        specialist = int(verdict.metrics.get(wire.SPECIALIST, 0))
        contribution = Contribution(client, verdict.delta, _weight(self.cohort, node, verdict), specialist)
        if self.running_by is not None:
            self.running_by[specialist].add(contribution)
        elif self.running is not None:
            self.running.add(contribution)
        else:
            self.contributions.append(contribution)
        self.chosen.append(specialist)
        self.rows.append((client, verdict.metrics[wire.TRAIN_LOSS], int(verdict.metrics[wire.STEPS]),
                          sum(a.nbytes for a in verdict.delta.values())))


def collect_plain(cohort: Cohort, server_round: int, nodes: list[int], arrays: ArrayRecord,
                  request: ConfigRecord) -> Collected:
    """A plain round, added up as replies arrive: the server holds a running sum and the
    replies in flight, not one delta per client (a robust rule keeps the list it needs).

    Each delta weighs 1 under DP and its record count otherwise. The `auto` norm bound is
    set by the round's first `STREAM_AFTER` acceptable replies (all of them in a smaller
    round), which are held until then and added in client-id order."""
    config, books = cohort.config, cohort.books
    auto = config.validation.max_delta_norm == "auto"
    bound = None if auto else norm_bound(config, [])
    held: list[tuple[int, str, Verdict, float]] = []
    plain = _Plain(cohort)

    def release(bound: float) -> None:
        for node, client, verdict, size in sorted(held, key=lambda item: item[1]):
            plain.admit(node, client, verdict, size, bound)
        held.clear()

    replies = arrivals(cohort.grid, train_messages(nodes, arrays, request), config.round_timeout) if nodes else []
    for node, client, verdict in screen(cohort, replies, nodes,
                                        lambda msg, node: check_train_reply(msg, cohort.spec, cohort.expect(node))):
        if not verdict.reason:
            books.book(server_round, client, verdict.declined, verdict.report, plain.declined)
        if verdict.reason:
            plain.dropped.append((node, client, verdict.reason))
        elif verdict.accepted and bound is None:
            held.append((node, client, verdict, norm(verdict.delta)))
            if len(held) >= STREAM_AFTER:
                bound = norm_bound(config, [n for *_, n in held])
                release(bound)
        elif verdict.accepted:
            plain.admit(node, client, verdict, norm(verdict.delta), bound)
    release(bound if bound is not None else norm_bound(config, [n for *_, n in held]))
    for node, client, reason in plain.dropped:
        log.warning("round %d: dropped reply from client %s (node %d): %s", server_round, say(client), node, reason)
    books.rejected += len(plain.dropped)
    upload = [row[3] for row in plain.rows]
    books.upload.extend(upload)
    hive = {"chosen": plain.chosen, "counts": [plain.chosen.count(j) for j in range(plain.k)]} if plain.k > 1 else {}
    return Collected({
        "sampled": [cohort.client(n) for n in nodes],
        "clients": [row[0] for row in plain.rows],
        "train_loss": [row[1] for row in plain.rows],
        "steps": [row[2] for row in plain.rows],
        "upload_bytes": upload,
        "dropped": [{"node": n, "client_id": c, "reason": r} for n, c, r in plain.dropped],
        "declined": plain.declined,
        **({"hive": hive} if hive else {}),
    }, contributions=plain.contributions, running=None if plain.running_by else plain.running,
        contributors=len(plain.rows), running_by=plain.running_by,
        counts=[float(c) for c in hive["counts"]] if hive else None)


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
    answered, declined, flagged = [], [], []
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
    upload = [result.upload_bytes.get(n, 0) for n in nodes if n in result.replies]
    books.upload.extend(upload)
    done = result.total is not None
    contributors = result.contributors if done else 0
    secagg: dict[str, Any] = {"shares": result.shares, "threshold": result.threshold,
                              "sampled": result.sampled, "contributed": len(result.replies),
                              "dropped_out": result.sampled - len(result.replies),
                              "quantization": quantization(config, contributors, cohort.spec.num_values * config.hive.k)}
    k = config.hive.k
    if done and result.metric_sums:  # the training metrics, as sums over the contributors only
        sums = result.metric_sums
        secagg["metric_sums"] = {**sums, "max_error": secure_metrics.max_errors(
            contributors, config.secagg.quantization_bits, k)}
    counts = [result.metric_sums.get(secure_metrics.chose(j), 0.0) for j in range(k)] \
        if k > 1 and done and result.metric_sums else None
    if result.error:
        secagg["error"] = result.error
        log.warning("round %d: %s", server_round, result.error)
        if result.sampled < 3 or result.threshold >= result.shares:
            books.small_cohort_rounds.append(server_round)
    return Collected({
        "sampled": [cohort.client(n) for n in nodes],
        "clients": answered if done else [],
        "train_loss": [],  # per device: not known to the server in a secure round
        "train_loss_mean": (result.metric_sums[wire.TRAIN_LOSS] / result.metric_sums[secure_metrics.TRAINED]
                            if done and result.metric_sums.get(secure_metrics.TRAINED) else None),
        "steps": [None] * len(answered) if done else [],
        "upload_bytes": upload,
        "dropped": flagged,
        "declined": declined,
        "secagg": secagg,
        **({"hive": {"counts": [round(c) for c in counts]}} if counts is not None else {}),
    }, secure_sum=result.total, contributors=contributors, counts=counts)


def as_arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    """A float32 ArrayRecord of the global adapter (the form Flower sends)."""
    from flwr.app import Array

    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in values.items()})
