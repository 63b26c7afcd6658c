import json

import pytest

from fedllm.config import Config
from fedllm.data import load_clients
from fedllm.data.corpus import clients_from_folder, embedded_split, holdout_split, select_clients
from fedllm.errors import ConfigError, DataError


def test_split_is_deterministic_and_disjoint():
    pub1, priv1 = embedded_split(0.5, 0)
    pub2, priv2 = embedded_split(0.5, 0)
    assert [p.slug for p in pub1] == [p.slug for p in pub2]
    assert not {p.slug for p in pub1} & {p.slug for p in priv1}
    pub3, _ = embedded_split(0.5, 1)
    assert [p.slug for p in pub3] != [p.slug for p in pub1]


def test_holdout_is_the_last_records():
    train, heldout = holdout_split([f"r{i}" for i in range(10)], 0.2)
    assert heldout == ("r8", "r9") and train[-1] == "r7"


def test_clients_come_from_private_plays_only():
    config = Config.from_flat({"num-clients": 30, "clients-per-round": 5, "evaluate.num-clients": 5})
    clients = load_clients(config)
    assert len(clients) == 30 == len({c.client_id for c in clients})
    _, private = embedded_split(0.5, 0)
    private_slugs = {p.slug for p in private}
    assert all(c.client_id.split(".")[0] in private_slugs for c in clients)
    assert all(c.num_records + len(c.heldout) >= 20 for c in clients)
    assert [c.client_id for c in load_clients(config)] == [c.client_id for c in clients]


def test_too_many_clients_is_refused_with_the_limit():
    with pytest.raises(ConfigError, match=r"num-clients=5000 but only \d+ clients"):
        load_clients(Config.from_flat({"num-clients": 5000}))


def test_folder_of_text_and_jsonl(tmp_path):
    (tmp_path / "alice.txt").write_text("one\ntwo\n\nthree\nfour\nfive\n")
    (tmp_path / "bob.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(5)))
    (tmp_path / "carol.jsonl").write_text('"just a string"\n')
    (tmp_path / "notes.md").write_text("ignored")
    clients = clients_from_folder(tmp_path, min_records=3, holdout_fraction=0.2)
    assert [c.client_id for c in clients] == ["alice", "bob"]
    assert clients[0].train == ("one", "two", "three", "four") and clients[0].heldout == ("five",)
    assert clients[1].heldout == ("line 4",)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ('{"txt": "x"}', r'bad\.jsonl:2: expected a JSON string or an object with a non-empty "text"'),
    ("42", r"bad\.jsonl:2"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        clients_from_folder(tmp_path, 1, 0.2)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        clients_from_folder(tmp_path / "nope", 1, 0.2)
    with pytest.raises(DataError, match="no .txt or .jsonl files"):
        clients_from_folder(tmp_path, 1, 0.2)


def test_non_utf8_file(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        clients_from_folder(tmp_path, 1, 0.2)


def test_select_clients_is_seeded():
    from fedllm.data.corpus import ClientData

    pool = [ClientData(f"c{i:02d}", ("a",), ("b",)) for i in range(20)]
    a = select_clients(pool, 5, seed=1, min_records=1)
    assert a == select_clients(pool, 5, seed=1, min_records=1)
    assert a != select_clients(pool, 5, seed=2, min_records=1)
