"""Clients from a local dataset file, partitioned by Flower Datasets: natural ids, IID and
Dirichlet (deterministic for a seed), and bad files or columns named."""

from __future__ import annotations

import json

import pytest

from fedllm.config import Config
from fedllm.data import forget_clients, load_clients
from fedllm.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _fresh():
    forget_clients()
    yield
    forget_clients()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(users=3, each=10):
    return [{"client_id": f"user-{u}", "text": f"record {i} of user {u}", "label": i % 3}
            for i in range(each) for u in range(users)]


def _config(path, **values):
    return Config.from_flat({"data.path": str(path), "data.min-records": 2, "num-clients": 3,
                             "clients-per-round": 2, **values})


def test_natural_ids_give_one_client_per_id_with_its_records_in_order(tmp_path):
    clients = load_clients(_config(_jsonl(tmp_path / "d.jsonl", _rows())))
    assert [c.client_id for c in clients] == ["user-0", "user-1", "user-2"]
    for c in clients:
        user = c.client_id.split("-")[1]
        assert list(c.train + c.heldout) == [f"record {i} of user {user}" for i in range(10)]
        assert c.heldout == (f"record 8 of user {user}", f"record 9 of user {user}")  # the last ones


def test_csv_and_parquet_read_the_same(tmp_path):
    import pandas

    frame = pandas.DataFrame(_rows())
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    via_csv = load_clients(_config(tmp_path / "d.csv"))
    forget_clients()
    assert via_csv == load_clients(_config(tmp_path / "d.parquet"))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_iid_and_dirichlet_are_deterministic_for_a_seed(tmp_path, partitioner):
    path = _jsonl(tmp_path / "d.jsonl", _rows(users=5, each=40))
    values = {"data.partitioner": partitioner, "data.num-partitions": 4, "num-clients": 4, "data.alpha": 1.0}
    first = load_clients(_config(path, **values))
    forget_clients()
    again = load_clients(_config(path, **values))
    forget_clients()
    other = load_clients(_config(path, **values, **{"data.split-seed": 7}))
    assert first == again and first != other
    assert sum(c.num_records + len(c.heldout) for c in first) == 200  # every record dealt once
    assert all(c.client_id.startswith(f"d-{partitioner}-") for c in first)


def test_the_plays_dealt_into_synthetic_clients(tmp_path):
    config = Config.from_flat({"data.partitioner": "iid", "data.num-partitions": 500, "num-clients": 500,
                               "data.min-records": 2})
    clients = load_clients(config)
    assert len(clients) == 500 and clients[0].client_id.startswith("plays-iid-")


@pytest.mark.parametrize("content, values, message", [
    ('{"client_id": "a", "text": "x"}\n{not json\n', {}, "not a readable jsonl dataset"),
    (json.dumps({"user": "a", "text": "x"}) + "\n", {}, "no column 'client_id'"),
    (json.dumps({"client_id": "a", "body": "x"}) + "\n", {}, "no column 'text'"),
    (json.dumps({"client_id": "a", "text": "x"}) + "\n", {"data.partitioner": "dirichlet"}, "no column 'label'"),
])
def test_a_malformed_file_or_a_missing_column_is_named(tmp_path, content, values, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_clients(_config(path, **values))


def test_a_folder_cannot_be_dealt(tmp_path):
    (tmp_path / "a.txt").write_text("x\n" * 5)
    with pytest.raises(ConfigError, match="needs a dataset file"):
        load_clients(_config(tmp_path, **{"data.partitioner": "iid"}))


def test_a_client_id_the_server_would_refuse_is_refused_here(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"client_id": "x" * 200, "text": f"r{i}"} for i in range(3)]
                  + [{"client_id": f"u{u}", "text": f"r{i}"} for u in range(3) for i in range(3)])
    with pytest.raises(DataError, match="client id must be 1..128 printable"):
        load_clients(_config(path))
