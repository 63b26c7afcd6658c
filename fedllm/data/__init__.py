"""Corpora, clients and records."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fedllm.data.corpus import ClientData, clients_from_folder, clients_from_plays, embedded_split, select_clients


@lru_cache(maxsize=4)
def _eligible(path: str, min_records: int, holdout_fraction: float, public_fraction: float,
              split_seed: int) -> tuple[ClientData, ...]:
    if path:
        return tuple(clients_from_folder(Path(path), min_records, holdout_fraction))
    _, private = embedded_split(public_fraction, split_seed)
    return tuple(clients_from_plays(private, min_records, holdout_fraction))


def load_clients(config) -> list[ClientData]:
    """The run's clients, partition i = entry i; cached per process (workers reuse it)."""
    d = config.data
    eligible = _eligible(d.path, d.min_records, d.holdout_fraction, d.public_fraction, d.split_seed)
    return select_clients(list(eligible), config.num_clients, config.seed, d.min_records)


def forget_clients() -> None:
    """Drop the cached clients (a cold worker reads its data again)."""
    _eligible.cache_clear()


__all__ = ["ClientData", "forget_clients", "load_clients"]
