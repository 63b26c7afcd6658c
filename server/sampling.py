"""Reproducible client sampling.

Flower's node ids are random per run, so sampling node ids with a seed does not pick
the same clients twice. fedllm first asks every node who it is (a `query` message),
then samples *client ids* with a seeded RNG and maps them back to nodes.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("fedllm.server")


class SampledGrid:
    """A view of a Grid that offers only the chosen nodes to a strategy's sampler."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]):
        self._grid, self._nodes = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(nodes)} of the {minimum} required nodes connected within {timeout:.0f}s")
        time.sleep(0.5)
    return nodes


def discover(grid: Grid, config: ConfigRecord, minimum: int, timeout: float) -> dict[str, int]:
    """client id -> node id for every connected node that answers.

    Nodes the SuperLink knows but cannot reach yet (a device reconnecting after a
    restart of either side) are asked again until `minimum` clients answered or
    `timeout` passed; then the run goes on with those that did.
    """
    deadline = time.time() + timeout
    nodes = wait_for_nodes(grid, minimum, timeout)
    content = RecordDict({"config": config})
    found: dict[str, int] = {}
    answered: set[int] = set()
    while True:
        pending = [n for n in nodes if n not in answered]
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in pending]
        unreachable = []
        for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.time())):
            node = reply.metadata.src_node_id
            if reply.has_error():
                unreachable.append(node)
                log.warning("node %d did not say who it is: %s", node, reply.error.reason)
                continue
            answered.add(node)
            try:
                client_id = str(reply.content["client"]["client-id"])
            except (KeyError, TypeError):
                log.warning("node %d sent no client id; it will not be sampled", node)
                continue
            if client_id in found:
                log.warning("node %d claims client id %s already held by node %d; ignored", node, client_id,
                            found[client_id])
                continue
            found[client_id] = node
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
