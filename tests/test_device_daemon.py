"""The device daemon's own side: when it trains (window, power, cap, threads), training
stopped cleanly when its conditions fail, and the resident worker the ClientApp talks to."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TINY
from fedllm import schedule
from fedllm.errors import FedllmError


def test_train_window_parses_and_crosses_midnight():
    window = schedule.parse_window("22:00-06:00")
    at = lambda h, m=0: dt.datetime(2026, 11, 29, h, m)  # noqa: E731
    assert schedule.in_window(window, at(23)) and schedule.in_window(window, at(5, 59))
    assert not schedule.in_window(window, at(6)) and not schedule.in_window(window, at(12))
    assert schedule.in_window(schedule.parse_window("09:30-17:00"), at(9, 30))
    for bad in ("22-06", "25:00-06:00", "10:00-10:00", "9:60-10:00"):
        with pytest.raises(FedllmError, match="--train-window"):
            schedule.parse_window(bad)


def _supply(root, name, kind, online=None):
    (root / name).mkdir(parents=True)
    (root / name / "type").write_text(kind + "\n")
    if online is not None:
        (root / name / "online").write_text(f"{online}\n")


def test_ac_power_is_read_from_the_os_and_an_os_that_does_not_say_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(schedule.POWER_SUPPLY_ENV, str(tmp_path / "ps"))
    (tmp_path / "ps").mkdir()
    assert schedule.on_ac_power() is None  # a desktop or container: no supply reported
    with pytest.raises(FedllmError, match="drop the flag"):
        schedule.check_node_schedule({schedule.NODE_AC_POWER: True})
    _supply(tmp_path / "ps", "BAT0", "Battery")
    _supply(tmp_path / "ps", "AC", "Mains", online=0)
    assert schedule.on_ac_power() is False
    assert schedule.conditions({schedule.NODE_AC_POWER: True}).startswith("not available: on battery")
    (tmp_path / "ps" / "AC" / "online").write_text("1\n")
    assert schedule.on_ac_power() is True and schedule.conditions({schedule.NODE_AC_POWER: True}) == ""
    schedule.check_node_schedule({schedule.NODE_AC_POWER: True, schedule.NODE_MAX_PER_DAY: 2})
    with pytest.raises(FedllmError, match="--max-threads"):
        schedule.check_node_schedule({schedule.NODE_MAX_THREADS: -1})


@pytest.fixture()
def device(tmp_path, cache_dir):
    """A real device's node config over a data file of 60 records, and the tiny config."""
    from fedllm import worker as workers
    from fedllm.data import load_clients
    from fedllm.model import resolve_base
    from fedllm.simulate import load_experiment

    config = load_experiment(TINY, {"privacy.state-dir": str(tmp_path / "state")})
    resolve_base(config, progress=False)
    workers.reset()
    lines = [r.replace("\n", " ") for c in load_clients(config) for r in c.train][:60]
    (tmp_path / "device.txt").write_text("\n".join(lines) + "\n")
    node = {"data-path": str(tmp_path / "device.txt"), "state-dir": str(tmp_path / "state"), "require-dp": True,
            "max-epsilon": 8.0, "max-delta": 1e-5, "model": "builtin", "device": "cpu", "dtype": "auto"}
    return config, node, workers.worker_for(config)


def _request(config, initial, node, server_round):
    from fedllm.device_requests import DeviceRequest

    values = {k: v for k, v in config.to_flat().items()}
    values.update({"server-round": server_round, "run-id": "run1"})
    return DeviceRequest(config=values, arrays={k: v.numpy() for k, v in initial.items()}, node=node)


def test_a_device_outside_its_conditions_is_not_available_and_nothing_is_charged(device, tmp_path):
    from fedllm.device_requests import train
    from fedllm.privacy.ledger import Ledger

    config, node, worker = device
    now = dt.datetime.now()
    closed = f"{(now + dt.timedelta(hours=1)):%H:%M}-{(now + dt.timedelta(hours=2)):%H:%M}"
    reply = train(_request(config, worker.initial, {**node, schedule.NODE_WINDOW: closed}, 1))
    assert reply.declined.startswith("not available: outside its train window") and reply.report is None
    assert not list((tmp_path / "state").glob("*/ledger.json"))

    capped = {**node, schedule.NODE_MAX_PER_DAY: 1, schedule.NODE_MAX_THREADS: 1}
    first = train(_request(config, worker.initial, capped, 1))
    assert not first.declined and first.report["max_participations_per_day"] == 1
    assert isinstance(next(iter(first.delta.values())), np.ndarray)  # plain data: the ClientApp needs no torch
    second = train(_request(config, worker.initial, capped, 2))
    assert second.declined.startswith("not available: it trained 1 times today")
    ledger = Ledger.load(next((tmp_path / "state").glob("*/ledger.json")))
    assert [c.round for c in ledger.history if c.kind == "train"] == [1]  # the refused round charged nothing
    from fedllm.privacy.report import check_report

    assert check_report(json.dumps(first.report), first.client_id)[1] == ""  # the server accepts the field


def test_conditions_failing_mid_round_stop_training_cleanly_and_keep_the_charge(device, tmp_path):
    from fedllm.client_round import Request, train_round
    from fedllm.privacy.ledger import Ledger

    config, node, worker = device
    checks = []

    def still_available() -> str:
        checks.append(1)
        return "not available: on battery (it trains on mains power only)" if len(checks) >= 2 else ""

    reply = train_round(config, node, worker.initial, Request(1, "run1"), still_available=still_available)
    assert reply.declined.startswith("stopped after 2 steps: on battery") and reply.delta is None
    ledger = Ledger.load(next((tmp_path / "state").glob("*/ledger.json")))
    assert [(c.round, c.kind, c.steps) for c in ledger.history] == [(1, "train", config.local_steps)]
    assert reply.report["epsilon"] == pytest.approx(ledger.epsilon()) and ledger.epsilon() > 0  # charged stays charged
    from fedllm.model import adapter_state

    assert all(np.array_equal(adapter_state(worker.model)[k], worker.initial[k]) for k in worker.initial)


def test_the_resident_worker_keeps_the_model_and_refuses_strangers(device, tmp_path):
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    from fedllm.deploy.device_worker import KEY, SOCKET, call, worker_dir

    config, node, worker = device
    process = subprocess.Popen([sys.executable, "-m", "fedllm.deploy.device_worker", "--state-dir",
                                str(tmp_path / "state")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert "device worker ready" in process.stdout.readline() + process.stdout.readline()
        folder = worker_dir(tmp_path / "state")
        assert (folder / SOCKET).stat().st_mode & 0o077 == 0 and (folder / KEY).stat().st_mode & 0o077 == 0
        client_id, counts = call(folder, "query", _request(config, worker.initial, node, 0))
        assert client_id == "device" and counts["num-records"] == 48
        seconds = []
        for server_round in (1, 2):
            start = time.perf_counter()
            reply = call(folder, "train", _request(config, worker.initial, node, server_round))
            seconds.append(time.perf_counter() - start)
            assert not reply.declined and set(reply.delta) == set(worker.initial)
        assert seconds[1] < seconds[0]  # the second round found the model loaded
        bad = call(folder, "train", _request(config, worker.initial, node, -1))  # a bad request is answered
        assert bad.declined.startswith("refused: server-round")
        with pytest.raises(AuthenticationError):  # a process without the key gets nothing in
            Client(str(folder / SOCKET), family="AF_UNIX", authkey=b"not the key")
        assert call(folder, "query", _request(config, worker.initial, node, 0))[0] == "device"  # still serving
    finally:
        process.kill()
        process.wait()


def test_state_files_read_back_are_checked(tmp_path):
    """model.json and personal.json come from disk: a bad field is refused with a reason, and
    a damaged version record does not stop a round from writing the next one."""
    from fedllm.state import StateStore

    store = StateStore(tmp_path, "c")
    store.dir.mkdir()
    store.personal_info_path.write_text(json.dumps({"method": "../../etc", "version": "7"}))
    with pytest.raises(FedllmError, match="method, version out of range"):
        store.personal_info()
    assert store.record_personal("ditto", 3, "run1", 40, None, "every-round")["version"] == 1
    assert store.record_personal("ditto", 4, "run1", 40, 1.5, "every-round")["version"] == 2
    store.model_path.write_text(json.dumps({"base": "/m", "config": {}, "global_round": -1}))
    with pytest.raises(FedllmError, match="global_round out of range"):
        store.model_info()
