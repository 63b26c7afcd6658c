"""A restarted server trusts no file: no pickle is ever loaded, a changed config is refused
with its keys, and each corrupted file stops it with one line that names the file."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir
from server.checkpoint import resume, save_server_state
from server.round_loop import Server


class _Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def saved(tiny_llama, tmp_path):
    """A run directory after round 1 of a FedAdam run (so there is optimizer state to save)."""
    import numpy as np

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = Config.from_flat({"model.name": str(tiny_llama), "num-clients": 4, "clients-per-round": 2,
                               "strategy.name": "fedadam", "lora.r": 2})
    rounds = Server(None, config, tmp_path / "run")
    rounds.apply(1, {k: np.full(v.shape, 0.01) for k, v in rounds.arrays.items()})
    rounds.run.write_config(rounds.config)
    rounds.run.append_metrics({"round": 0, "run_id": rounds.run_id, "evaluate": {"clients": {}, "mean": {}}})
    rounds.run.append_metrics({"round": 1, "train": {}})
    save_server_state(rounds, 1)
    return rounds.config, tmp_path / "run", rounds.optimizer


def _resume(config: Config, run_dir):
    rounds = Server(None, config, run_dir)
    return rounds, resume(rounds), rounds.optimizer


def test_resume_restores_strategy_state_without_pickle(saved):
    import numpy as np

    config, run_dir, before = saved
    assert not list(run_dir.rglob("*.pkl"))
    rounds, done, strategy = _resume(config, run_dir)
    assert done == 1
    for name in ("m_t", "v_t"):
        a, b = before.state[name], strategy.state[name]
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), name


def test_a_planted_pickle_is_never_loaded(saved, tmp_path):
    config, run_dir, _ = saved
    marker = tmp_path / "pwned"
    (run_dir / "checkpoints" / "round-1" / "strategy.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    _resume(config, run_dir)
    assert not marker.exists()


def test_a_changed_config_is_refused_with_its_keys(saved):
    config, run_dir, _ = saved
    with pytest.raises(FedllmError, match=r"lora.r: 2 -> 4.*privacy.enabled: True -> False"):
        _resume(config.with_values({"lora.r": 4, "privacy.enabled": False}), run_dir)
    with pytest.raises(FedllmError, match="train.batch-size"):  # privacy-relevant: refused even when accepting
        _resume(config.with_values({"train.batch-size": 4, "resume.accept-changes": True}), run_dir)
    _resume(config.with_values({"round-timeout": 30.0, "resume.accept-changes": True}), run_dir)


CORRUPTIONS = {
    "checkpoints/latest.json": [b"", b"{", b'{"round": "1"}', b'{"round": 99}'],
    "checkpoints/round-1/server-state.json": [b"", b"[]", b'{"round": 1}'],
    "checkpoints/round-1/global.safetensors": [b"", b"\x00" * 64, b"garbage"],
    "checkpoints/round-1/strategy.safetensors": [b"\x08\x00\x00\x00\x00\x00\x00\x00{}junk"],
    "checkpoints/round-1/strategy.json": [b"", b'{"strategy": "Krum", "attributes": {}}',
                                          b'{"strategy": "FedAdam", "attributes": {"__class__": {"kind": "dict"}}}'],
    "config.json": [b"not json"],
}


@pytest.mark.parametrize("name, content", [(n, c) for n, cs in CORRUPTIONS.items() for c in cs])
def test_each_corrupted_file_gives_one_clear_error(saved, name, content, tmp_path):
    config, run_dir, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / name).write_bytes(content)
    with pytest.raises(FedllmError) as info:
        _resume(config.with_values({"run-dir": str(copy)}), copy)
    message = str(info.value)
    assert "\n" not in message and "cannot resume" in message
    assert name.split("/")[-1] in message, message


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.append_metrics({"round": 0})
    run.append_metrics({"round": 1})
    with open(run.metrics_file, "a") as handle:
        handle.write('{"round": 2, "tra')
    assert [m["round"] for m in run.metrics()] == [0, 1]
    assert "torn" in caplog.text
    run.metrics_file.write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(FedllmError, match="line 2"):
        run.metrics()


def test_a_follower_sees_whole_lines_only_and_rereads_a_rewritten_file(tmp_path):
    """What `fedllm simulate` prints while the server writes metrics.jsonl."""
    run = RunDir(tmp_path)
    assert run.new_metrics(0) == ([], 0)
    run.append_metrics({"round": 0})
    with open(run.metrics_file, "a") as handle:
        handle.write('{"round": 1, "tra')  # the server is mid-write
    records, offset = run.new_metrics(0)
    assert [r["round"] for r in records] == [0]
    with open(run.metrics_file, "a") as handle:
        handle.write('in": {}}\n')
    records, offset = run.new_metrics(offset)
    assert [r["round"] for r in records] == [1]
    run.keep_metrics_through(0)  # a resumed run drops the rounds it redoes: the file shrinks
    records, _ = run.new_metrics(offset)
    assert [r["round"] for r in records] == [0]


def test_a_ledger_relabelled_old_is_refused_and_a_genuine_old_one_migrates(tmp_path):
    from fedllm.privacy.ledger import Ledger, LedgerError

    path = tmp_path / "ledger.json"
    ledger = Ledger.open(path, client_id="c", num_records=50, delta=1e-3, target_epsilon=8.0, sample_rate=0.1,
                         max_grad_norm=1.0, planned_steps=10, accountant="rdp")
    ledger.charge([ledger.next_charge(1, 5)])
    data = json.loads(path.read_text())
    data["ledger_version"] = 1
    data["history"][0]["steps"] = 1  # an edited charge, hidden behind the old label
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="labelled ledger_version 1 but holds a hash chain"):
        Ledger.load(path)
    genuine = {k: v for k, v in data.items() if k not in ("genesis", "head")}
    genuine["history"] = [{k: v for k, v in e.items() if k not in ("hash", "prev_hash")} for e in data["history"]]
    path.write_text(json.dumps(genuine))
    Ledger.load(path)
    migrated = json.loads(path.read_text())
    assert migrated["ledger_version"] == 2 and "genesis" in migrated  # written once, chained
    Ledger.load(path)
