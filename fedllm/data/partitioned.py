"""Clients from a local dataset, partitioned the ecosystem's way: Hugging Face `datasets`
reads the file (JSONL, CSV or Parquet; never the hub), Flower Datasets partitions it.

    data.partitioner = natural     one client per value of `data.id-column` (a user, a device)
                     = iid         `data.num-partitions` clients of records dealt uniformly at random
                     = dirichlet   `data.num-partitions` clients whose `data.label-column` mix follows
                                   Dirichlet(`data.alpha`): the usual non-IID benchmark split

The embedded plays can be dealt the same way (`iid` or `dirichlet` with the role as the
label): synthetic clients for scale tests, named as such in the summary; the roles stay
the natural clients. Every partition is deterministic for `data.split-seed`.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedllm.data.corpus import ClientData, holdout_split
from fedllm.messages import MAX_CLIENT_ID
from fedllm.errors import DataError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: `datasets` never asks the hub
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PARTITIONERS = ("natural", "iid", "dirichlet")


def is_dataset_file(path: str) -> bool:
    return Path(path).suffix in FORMATS


def read_dataset(path: Path, columns: list[str]):
    """The file as a `datasets.Dataset`, with `columns` checked (each named when missing)."""
    import datasets

    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (give a .jsonl, .csv or .parquet file)")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a malformed file
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise DataError(f"data.path={path}: not a readable {path.suffix[1:]} dataset ({reason})") from None
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"data.path={path}: no column {column!r} (columns: {', '.join(ds.column_names)}); set "
                            "data.text-column / data.id-column / data.label-column to the right one")
    return ds


def partitioner_for(data: Any, num_clients: int):
    """The Flower Datasets partitioner of `data` (a `fedllm.config.DataConfig`)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if data.partitioner == "natural":
        return NaturalIdPartitioner(partition_by=data.id_column)
    n = data.num_partitions or num_clients
    if data.partitioner == "iid":
        return IidPartitioner(num_partitions=n)
    return DirichletPartitioner(num_partitions=n, partition_by=data.label_column, alpha=data.alpha,
                                min_partition_size=0, self_balancing=True, shuffle=True, seed=data.split_seed)


def partition_clients(ds, data: Any, num_clients: int, prefix: str) -> list[ClientData]:
    """Every partition with at least `data.min-records` records becomes a client; records
    keep their order in the file (the last ones are held out)."""
    partitioner = partitioner_for(data, num_clients)
    if data.partitioner == "iid":  # deal a seeded shuffle, so a seed decides who holds what
        ds = ds.shuffle(seed=data.split_seed)
    partitioner.dataset = ds
    names = _natural_ids(partitioner) if data.partitioner == "natural" else None
    width = len(str(partitioner.num_partitions - 1))
    clients = []
    if data.partitioner == "iid" and partitioner.num_partitions > len(ds):
        raise DataError(f"data.partitioner=iid deals {len(ds)} records into {partitioner.num_partitions} partitions: "
                        "lower data.num-partitions (or num-clients) to at most the record count")
    for i in range(partitioner.num_partitions):
        try:
            partition = partitioner.load_partition(i)
        except (IndexError, ValueError) as e:
            raise DataError(f"data.partitioner={data.partitioner} could not deal partition {i} of "
                            f"{partitioner.num_partitions} from {len(ds)} records ({e}): lower data.num-partitions "
                            "or give more records") from None
        texts = [t.strip() for t in partition[data.text_column] if isinstance(t, str) and t.strip()]
        if len(texts) < data.min_records:
            continue
        train, heldout = holdout_split(texts, data.holdout_fraction)
        name = str(names[i]) if names is not None else f"{prefix}-{data.partitioner}-{i:0{width}d}"
        if not (0 < len(name) <= MAX_CLIENT_ID and name.isprintable()):
            raise DataError(f"{data.id_column} value {name[:40]!r}...: a client id must be 1..{MAX_CLIENT_ID} printable "
                            "characters (it names the client's ledger and is checked by the server)")
        clients.append(ClientData(name, train, heldout))
    return sorted(clients, key=lambda c: c.client_id)


def _natural_ids(partitioner) -> dict[int, Any]:
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar, once per worker: not the user's business
        partitioner.load_partition(0)  # builds the id mapping
    return dict(partitioner.partition_id_to_natural_id)


def clients_from_dataset(path: Path, data: Any, num_clients: int) -> list[ClientData]:
    """A local dataset file, partitioned per `data.partitioner`."""
    columns = [data.text_column] + ([data.id_column] if data.partitioner == "natural" else []) + (
        [data.label_column] if data.partitioner == "dirichlet" else [])
    return partition_clients(read_dataset(path, columns), data, num_clients, path.stem)


def synthetic_clients_from_plays(plays: list, data: Any, num_clients: int) -> list[ClientData]:
    """The private speeches dealt into synthetic clients (`iid`, or `dirichlet` over roles)."""
    import datasets

    rows = {"text": [], "role": []}
    for play in plays:
        for speech in play.speeches:
            rows["text"].append(speech.text)
            rows["role"].append(f"{play.slug}.{speech.role}")
    ds = datasets.Dataset.from_dict(rows)
    return partition_clients(ds, replace(data, text_column="text", label_column="role"), num_clients, "plays")
