"""Replies as they arrive: Flower's push and pull, polled every `PULL_INTERVAL`.

Flower 1.42's deployed grid (`http_grid.send_and_receive`) sleeps 3 s between pulls, so
every exchange, and every SecAgg+ stage, would cost at least 3 s on the server alone;
pulling every 0.1 s costs a few small requests on loopback instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flwr.app import Message
from flwr.serverapp import Grid

PULL_INTERVAL = 0.1  # seconds between pulls while replies are outstanding


def arrivals(grid: Grid, messages: list[Message], timeout: float) -> Iterator[Message]:
    """The replies to `messages` as they arrive (Flower's push and pull), until all came or
    `timeout` passed; a grid without push and pull answers all at once."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        yield from grid.send_and_receive(messages, timeout=timeout)
        return
    waiting = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    while waiting and time.monotonic() < end:
        replies = list(grid.pull_messages(waiting))
        waiting.difference_update(msg.metadata.reply_to_message_id for msg in replies)
        yield from replies
        if waiting and not replies:
            time.sleep(PULL_INTERVAL)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """`grid.send_and_receive`, without its 3 s between pulls."""
    return list(arrivals(grid, list(messages), timeout if timeout is not None else float("inf")))
