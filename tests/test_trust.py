"""Issue 24's trust holes, each closed where an adversary would reach it: a hostile server
asking a device's real handlers (`client.app`) for an uncharged hive choice, edited state
stores walked through the device's own commands, absurd sizes and ids, and the run
directory's file modes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from conftest import TINY
from fedllm.config import Config, load_toml
from fedllm.errors import ConfigError, DataError, FedllmError
import test_policy
from test_policy import _ask, _declined, _device

setup = test_policy.setup  # the device fixture: one tiny model, one client's records


def _evaluate(config: Config, arrays, context: Context, server_round: int = 1, **changes) -> Message:
    from client.app import evaluate

    flat = {**config.to_flat(), "hive.k": 2, **changes, "server-round": server_round, "run-id": "test-run"}
    msg = Message(RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(flat)}), dst_node_id=1,
                  message_type=MessageType.EVALUATE)
    return evaluate(msg, context)


def _two_specialists(initial) -> dict[str, torch.Tensor]:
    """A hive of two that differ: a choice among them would read the records."""
    from fedllm.hive import pack

    return pack([initial, {k: v + 0.01 for k, v in initial.items()}])


def _no_record_read(monkeypatch):
    import fedllm.client_round as client_round

    def refuse(*args, **kwargs):
        raise AssertionError("a specialist was scored on the device's records")

    monkeypatch.setattr(client_round, "pick", refuse)


def test_a_dp_device_answers_a_non_private_hive_evaluation_without_reading_a_record(setup, monkeypatch):
    config, initial, _, root = setup
    device = _device(setup, "eval-dp")
    assert not _declined(_ask(config, initial, device))  # one private round: the ledger exists
    ledger = next((root / "eval-dp").glob("*/ledger.json"))
    before = ledger.read_bytes()
    _no_record_read(monkeypatch)
    hive = _two_specialists(initial)
    for server_round, changes in ((2, {"privacy.enabled": False}), (config.num_server_rounds, {"privacy.enabled": False}),
                                  (2, {"privacy.enabled": False, "hive.k": 64}), (2, {"privacy.target-epsilon": 50.0})):
        arrays = hive if changes.get("hive.k", 2) == 2 else _two_specialists(initial) | {
            f"hive-{j}/{k}": v for j in range(2, 64) for k, v in initial.items()}
        reply = _evaluate(config, arrays, device, server_round, **changes)
        assert reply.content["metrics"]["specialist"] == 0, changes  # chosen without the records
        assert ledger.read_bytes() == before, f"{changes}: the ledger changed"
        assert not list((root / "eval-dp").glob("*/hive.json")), "a choice was kept"


def test_a_choice_made_in_the_clear_is_never_reused_under_dp(setup):
    config, initial, _, root = setup
    device = _device(setup, "eval-optional", **{"require-dp": False})
    hive = _two_specialists(initial)
    config = config.with_values({"num-server-rounds": 5})
    plain = _evaluate(config, hive, device, 1, **{"privacy.enabled": False})
    assert plain.content["metrics"]["specialist"] in (0, 1)
    kept = json.loads(next((root / "eval-optional").glob("*/hive.json")).read_text())
    assert kept["private"] is False and kept["scored"] is True
    private = _evaluate(config, hive, device, 2)  # under DP, not the last round: a kept choice would be reused
    assert "privacy" in private.content.config_records  # a choice was charged, and its report sent
    history = json.loads(next((root / "eval-optional").glob("*/ledger.json")).read_text())["history"]
    assert [(e["kind"], e["round"]) for e in history] == [("select", 2)]
    assert json.loads(next((root / "eval-optional").glob("*/hive.json")).read_text())["private"] is True
    again = _evaluate(config, hive, device, 3)  # now the kept choice was paid for under DP: reused, not charged
    assert "privacy" not in again.content.config_records
    assert len(json.loads(next((root / "eval-optional").glob("*/ledger.json")).read_text())["history"]) == 1


# -- the device's commands on damaged state files ---------------------------------------------
@pytest.fixture(scope="module")
def store(setup, tmp_path_factory):
    """A device's state store after one private round (its global adapter and model.json),
    with a personal adapter beside it."""
    from fedllm.personal import load_state, save_state
    from fedllm.state import StateStore

    config, initial, data, root = setup
    device = _device(setup, "walk")
    assert not _declined(_ask(config, initial, device))
    folder = next(p for p in (root / "walk").iterdir() if p.is_dir())
    kept = StateStore(root / "walk", folder.name)
    save_state(kept.personal_path("finetune"), load_state(kept.global_path))
    kept.record_personal("finetune", 1, "test-run", 10, 1.0, "test")
    return kept


def _commands(store, out):
    state = ["--state-dir", str(store.dir.parent), "--client-id", store.client_id]
    return {
        "generate": ["generate", *state, "--adapter", "personal", "--prompt", "To be", "--max-new-tokens", "2"],
        "generate-global": ["generate", *state, "--adapter", "global", "--prompt", "To be", "--max-new-tokens", "2"],
        "export": ["export", *state, "--out", str(out), "--adapter", "global"],
        "status": ["client", "status", *state],
    }


def _one_line_error(argv, capsys) -> str:
    from fedllm.cli import main

    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedllm: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _corruptions(path):
    real = path.read_bytes()
    header = int.from_bytes(real[:8], "little")
    return {
        "truncated": real[: len(real) // 2],
        "empty": b"",
        "random": os.urandom(len(real)),
        "huge header": (2**62).to_bytes(8, "little") + real[8:],
        "header only": real[: 8 + header],
        "bad json header": real[:8] + b"{" * header + real[8 + header:],
    }


def test_every_damaged_adapter_file_is_one_line_that_names_it(store, tmp_path, capsys):
    from fedllm.cli import main

    commands = _commands(store, tmp_path / "export")
    assert main(commands["status"]) == 0 and main(commands["generate"]) == 0  # the store is sound first
    for path, uses in ((store.global_path, ("generate", "generate-global", "export")),
                       (store.personal_path("finetune"), ("generate",))):
        real = path.read_bytes()
        try:
            for why, content in _corruptions(path).items():
                path.write_bytes(content)
                for name in uses:
                    err = _one_line_error(commands[name], capsys)
                    assert str(path) in err and "move it aside" in err, (why, name, err)
        finally:
            path.write_bytes(real)
    assert not (tmp_path / "export").exists()  # nothing half-exported


def test_damaged_version_records_and_a_non_finite_adapter_are_refused(store, tmp_path, capsys):
    from fedllm.personal import load_state, save_state

    commands = _commands(store, tmp_path / "export")
    info = json.loads(store.model_path.read_text())
    try:
        for key, value in (("lora.r", 10**9), ("hive.k", "x"), ("model.max-length", -1), ("lora.r", True)):
            store.model_path.write_text(json.dumps({**info, "config": {**info["config"], key: value}}))
            for name in ("generate", "export", "status"):
                err = _one_line_error(commands[name], capsys)
                assert str(store.model_path) in err and key in err, (key, name, err)
        store.model_path.write_text("{not json")
        assert str(store.model_path) in _one_line_error(commands["generate"], capsys)
    finally:
        store.model_path.write_text(json.dumps(info))
    real = store.global_path.read_bytes()
    try:
        state = load_state(store.global_path)
        save_state(store.global_path, {k: torch.full_like(v, float("nan")) for k, v in state.items()})
        for name in ("export", "generate-global"):
            err = _one_line_error(commands[name], capsys)
            assert str(store.global_path) in err and "finite" in err, err
    finally:
        store.global_path.write_bytes(real)
    assert not (tmp_path / "export").exists()


# -- sizes, ids, partitions, file modes ----------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("local-steps", 10**12), ("lora.r", 10**6), ("model.max-length", 10**9), ("num-server-rounds", 10**7),
    ("privacy.planned-rounds", 10**9), ("hive.select-noise", 1e-300), ("seed", 2**64),
    ("hive.score-records", 10**12), ("train.batch-size", 10**9), ("num-clients", 10**9),
])
def test_absurd_sizes_are_refused_before_anything_starts(key, value):
    flat = {**load_toml(TINY), key: value}
    with pytest.raises(ConfigError, match=rf"'{key}'.*expected"):
        Config.from_flat(flat)


def test_ids_that_name_no_folder_or_collide_are_refused_naming_both(tmp_path):
    from fedllm.data import load_clients
    from fedllm.state import safe_name

    for bad in (".", "..", ""):
        with pytest.raises(FedllmError, match="names no folder"):
            safe_name(bad)
    data = tmp_path / "data.jsonl"
    config = Config.from_flat({**load_toml(TINY), "data.path": str(data), "data.min-records": 1, "num-clients": 3,
                               "clients-per-round": 1, "evaluate.num-clients": 1})
    for ids, named in ((["a b", "a*b", "ok"], ("'a b'", "'a*b'")), ([".", "x", "y"], ("'.'",)),
                       (["..", "x", "y"], ("'..'",))):
        data.write_text("".join(json.dumps({"client_id": c, "text": f"{c} says {i}"}) + "\n"
                                for c in ids for i in range(4)))
        with pytest.raises(DataError) as refused:
            load_clients(config)
        assert all(n in str(refused.value) for n in named), str(refused.value)


def test_iid_over_partitioning_is_a_data_error(tmp_path):
    from fedllm.data import load_clients

    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5)))
    config = Config.from_flat({**load_toml(TINY), "data.path": str(data), "data.partitioner": "iid",
                               "data.num-partitions": 50, "data.min-records": 1, "num-clients": 50,
                               "clients-per-round": 1, "evaluate.num-clients": 1})
    with pytest.raises(DataError, match="data.num-partitions"):
        load_clients(config)
