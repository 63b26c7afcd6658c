"""Reproducible client sampling.

Flower's node ids are random per run, so sampling node ids with a seed does not pick
the same clients twice. fedllm first asks every node who it is (a `query` message),
then samples *client ids* with a seeded RNG and maps them back to nodes.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm import messages as wire
from fedllm.untrusted import say
from server.transport import send_and_receive
from server.validation import MAX_CLIENT_ID, check_metrics

log = logging.getLogger("fedllm.server")


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(nodes)} of the {minimum} required nodes connected within {timeout:.0f}s")
        time.sleep(0.5)
    return nodes


@dataclass(frozen=True)
class NodeInfo:
    """What a node declared at discovery; its later replies must agree."""

    client_id: str
    num_records: int
    num_heldout: int


def _declared(reply: Message) -> NodeInfo | str:
    """The node's declaration, or why it is unusable (checked as any client input)."""
    try:
        if set(reply.content.config_records) != {wire.CLIENT} or set(reply.content.metric_records) != {wire.METRICS}:
            return "expected exactly a client record and a metrics record"
        client_id = reply.content[wire.CLIENT].get(wire.CLIENT_ID)
        if set(reply.content[wire.CLIENT].keys()) != {wire.CLIENT_ID} or not isinstance(client_id, str) \
                or not 0 < len(client_id) <= MAX_CLIENT_ID or not client_id.isprintable():
            return f"client id {say(client_id)} is not a printable string of 1..{MAX_CLIENT_ID} characters"
        metrics = reply.content[wire.METRICS]
        why = check_metrics(metrics, {wire.NUM_RECORDS: (1, 2**31, True), wire.NUM_HELDOUT: (1, 2**31, True)})
        if why:
            return why
        return NodeInfo(client_id, int(metrics[wire.NUM_RECORDS]), int(metrics[wire.NUM_HELDOUT]))
    except Exception as exc:  # noqa: BLE001 - a malformed declaration is a refusal, never a crash
        return f"malformed declaration ({type(exc).__name__})"


def discover(grid: Grid, config: ConfigRecord, minimum: int, timeout: float,
             infos: dict[int, NodeInfo] | None = None) -> dict[str, int]:
    """client id -> node id for every connected node that answers (and, into `infos`,
    node id -> what it declared).

    Nodes the SuperLink knows but cannot reach yet (a device reconnecting after a
    restart of either side) are asked again until `minimum` clients answered or
    `timeout` passed; then the run goes on with those that did.
    """
    deadline = time.time() + timeout
    nodes = wait_for_nodes(grid, minimum, timeout)
    content = RecordDict({wire.CONFIG: config})
    found: dict[str, int] = {}
    answered: set[int] = set()
    while True:
        pending = [n for n in nodes if n not in answered]
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in pending]
        unreachable = []
        for reply in send_and_receive(grid, messages, max(1.0, deadline - time.time())):
            node = reply.metadata.src_node_id
            if reply.has_error():
                unreachable.append(node)
                log.warning("node %d did not say who it is: %s", node, ascii(str(reply.error.reason)[:200]))
                continue
            if node not in pending or node in answered:
                log.warning("node %d answered a question it was not asked; ignored", node)
                continue
            answered.add(node)
            info = _declared(reply)
            if isinstance(info, str):
                log.warning("node %d will not be sampled: %s", node, info)
                continue
            if info.client_id in found:
                log.warning("node %d claims client id %s already held by node %d; ignored", node,
                            ascii(info.client_id), found[info.client_id])
                continue
            found[info.client_id] = node
            if infos is not None:
                infos[node] = info
        if len(found) >= minimum or not unreachable or time.time() > deadline - 2:
            return dict(sorted(found.items()))
        time.sleep(2.0)
        nodes = sorted(set(nodes) | set(grid.get_node_ids()))


class ClientSampler:
    """Seeded client sampling: `sample` draws `k` distinct clients uniformly (no privacy
    amplification is claimed from it); `poisson` includes each client independently with
    probability `q` (user-level DP's amplification assumes exactly this)."""

    def __init__(self, clients: dict[str, int], seed: int):
        self.clients = clients
        self.rng = random.Random(seed)

    def sample(self, k: int) -> list[int]:
        chosen = self.rng.sample(sorted(self.clients), min(k, len(self.clients)))
        return [self.clients[c] for c in sorted(chosen)]

    def poisson(self, q: float) -> list[int]:
        return [self.clients[c] for c in sorted(self.clients) if self.rng.random() < q]

    def fixed_subset(self, k: int, seed: int) -> list[int]:
        chosen = random.Random(seed).sample(sorted(self.clients), min(k, len(self.clients)))
        return [self.clients[c] for c in sorted(chosen)]
