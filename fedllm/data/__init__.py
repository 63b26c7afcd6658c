"""Corpora, clients and records."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fedllm.data.corpus import (ClientData, clients_from_code, clients_from_folder, clients_from_plays, embedded_split,
                                select_clients)
from fedllm.errors import ConfigError, DataError, FedllmError
from fedllm.state import check_client_ids


@lru_cache(maxsize=4)
def _eligible(d, num_clients: int) -> tuple[ClientData, ...]:
    """Every client `d` (a frozen `DataConfig`) yields with at least `data.min-records` records."""
    clients = _found(d, num_clients)
    try:
        check_client_ids(c.client_id for c in clients)
    except FedllmError as e:
        raise DataError(f"{d.path or 'the embedded corpus'}: {e}") from None
    return clients


def _found(d, num_clients: int) -> tuple[ClientData, ...]:
    from fedllm.data import partitioned

    if d.path and partitioned.is_dataset_file(d.path):
        return tuple(partitioned.clients_from_dataset(Path(d.path), d, num_clients))
    if d.path:
        if d.partitioner != "natural":
            raise ConfigError(f"data.partitioner={d.partitioner} needs a dataset file (.jsonl, .csv, .parquet) or the "
                              "embedded plays; a folder holds one file per client")
        return tuple(clients_from_folder(Path(d.path), d.min_records, d.holdout_fraction))
    if d.corpus == "code":
        return tuple(clients_from_code(d.min_records, d.holdout_fraction))
    _, private = embedded_split(d.public_fraction, d.split_seed)
    if d.corpus == "mixed":
        return (*clients_from_plays(private, d.min_records, d.holdout_fraction),
                *clients_from_code(d.min_records, d.holdout_fraction))
    if d.partitioner != "natural":  # a scale test: the private speeches dealt into synthetic clients
        return tuple(partitioned.synthetic_clients_from_plays(private, d, num_clients))
    return tuple(clients_from_plays(private, d.min_records, d.holdout_fraction))


def load_clients(config) -> list[ClientData]:
    """The run's clients, partition i = entry i; cached per process (workers reuse it, and a
    node answers every message of a run without choosing the clients again)."""
    return list(_selected(config.data, config.num_clients, config.seed))


@lru_cache(maxsize=4)
def _selected(d, num_clients: int, seed: int) -> tuple[ClientData, ...]:
    return tuple(select_clients(list(_eligible(d, num_clients)), num_clients, seed, d.min_records))


def synthetic(config) -> bool:
    """Whether the run's clients are synthetic (the embedded plays dealt by a partitioner)."""
    return not config.data.path and config.data.partitioner != "natural"


def forget_clients() -> None:
    """Drop the cached clients (a cold worker reads its data again)."""
    _eligible.cache_clear()
    _selected.cache_clear()


__all__ = ["ClientData", "forget_clients", "load_clients", "synthetic"]
