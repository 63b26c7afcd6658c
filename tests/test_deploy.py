"""Deployment on loopback, for real: `fedllm certs`, `fedllm server` (a SuperLink with TLS
and node authentication) and three `fedllm client` daemons (SuperNodes), as processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from fedllm.cli import main
from fedllm.config import parse_assignment
from fedllm.deploy.processes import stop_all
from fedllm.privacy.ledger import Ledger

FEDLLM = [sys.executable, "-m", "fedllm.cli"]


def _wait_for(path: Path, text: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(errors="ignore"):
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s:\n{path.read_text(errors='ignore')[-3000:]}")


def _devices(tmp_path: Path, n: int) -> list[Path]:
    """n devices, each with one role's records in its own file."""
    from fedllm.config import Config, load_toml
    from fedllm.data import load_clients

    paths = []
    for i, c in enumerate(load_clients(Config.from_flat(load_toml(TINY)))[:n], start=1):
        path = tmp_path / f"device-{i}" / f"{c.client_id}.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (*c.train, *c.heldout)))
        paths.append(path)
    return paths


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*FEDLLM, *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ))


def test_certs_refuses_to_overwrite_a_ca(tmp_path, capsys):
    assert main(["certs", str(tmp_path / "c"), "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "fedllm server --certs" in out
    # The walk-through it prints is a configuration the server accepts.
    from fedllm.config import Config, load_toml

    values = load_toml(TINY)
    values.update(parse_assignment(a) for a in re.findall(r"--set (\S+)", out))
    assert Config.from_flat(values).num_clients == 2
    assert (tmp_path / "c" / "nodes" / "node-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert main(["certs", str(tmp_path / "c")]) == 2
    assert "already holds a CA" in capsys.readouterr().err


def test_client_refuses_bad_input_before_starting(tmp_path, capsys):
    main(["certs", str(tmp_path / "c"), "--nodes", "1"])
    c = tmp_path / "c"

    def client(ca: Path, data: Path) -> int:
        return main(["client", "--superlink", "127.0.0.1:1", "--ca-cert", str(ca), "--key", str(c / "nodes" / "node-1"),
                     "--state-dir", str(tmp_path / "s"), "--data", str(data)])

    assert client(c / "ca.crt", tmp_path / "missing.jsonl") == 2
    assert "not a .txt or .jsonl file" in capsys.readouterr().err
    assert client(tmp_path / "nope.crt", tmp_path) == 2
    assert "not found; give it with --ca-cert" in capsys.readouterr().err


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (a crash, not a shutdown)."""
    import psutil

    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=20)


def _ledger_rounds(path: Path) -> list[int]:
    try:
        return [e["round"] for e in json.loads(path.read_text())["history"] if e["kind"] == "train"]
    except (OSError, ValueError, KeyError):
        return []


def _outsider_is_refused(tmp_path: Path, port: int, certs: Path, rogue_key: Path) -> None:
    """What an outsider holding ca.crt can do on the devices' address: nothing but the Fleet API."""
    import ssl
    import urllib.error
    import urllib.request

    from fedllm.deploy.processes import environment, write_connection

    home = tmp_path / "outsider"
    write_connection(home, f"127.0.0.1:{port}", certs / "ca.crt")
    for command in (["flwr", "ls", "fedllm"], ["flwr", "supernode", "register", str(rogue_key), "fedllm"],
                    ["flwr", "supernode", "list", "fedllm"]):
        done = subprocess.run(command, env=environment(home), capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, (command, done.stdout[-500:])
        assert "success\": true" not in done.stdout and "registered" not in done.stdout.lower(), done.stdout
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/control/register-node", "/docs",
                 "/health", "/v1/fleet/../control/list-runs"):
        request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=30)
        assert refused.value.code in (403, 404), (path, refused.value.code)


def test_operator_registers_a_key_late_and_a_device_refuses_a_looser_budget(tmp_path, cache_dir, capsys):
    """`fedllm server register` adds a key through the loopback Control API while the
    server runs (the devices' address refuses the same request); the device with that key
    joins, and, started with --max-epsilon 2 against a server asking for 8, refuses every
    round over the wire: the server counts the refusals with the device's reason, and the
    device never creates a ledger."""
    certs = tmp_path / "certs"
    assert main(["certs", str(certs), "--nodes", "2"]) == 0
    late = tmp_path / "late"
    late.mkdir()
    shutil.move(certs / "nodes" / "node-2.pub", late / "node-2.pub")
    shutil.move(certs / "nodes" / "node-1.pub", late / "node-1.pub")  # no device is known at start
    (certs / "nodes" / "placeholder.pub").write_bytes((late / "node-1.pub").read_bytes())
    data = _devices(tmp_path, 1)[0]
    run_dir, port = tmp_path / "run", 18400 + os.getpid() % 500
    server = _start(["server", "--certs", str(certs), "--nodes", str(certs / "nodes"), "--run-dir", str(run_dir),
                     "--config", str(TINY), "--port", str(port), "--local-port", str(port + 5), "--host", "0.0.0.0",
                     "--set", "num-clients=1", "--set", "clients-per-round=1", "--set", "evaluate.num-clients=1",
                     "--set", "round-timeout=60"], tmp_path / "server.log")
    device = None
    try:
        _wait_for(tmp_path / "server.log", "waiting for 1 devices", 120, server)
        log = (tmp_path / "server.log").read_text()
        assert "network-facing: 0.0.0.0:" in log and "the Fleet API only" in log
        _outsider_is_refused(tmp_path, port, certs, late / "node-2.pub")
        capsys.readouterr()
        assert main(["server", "register", str(late / "node-2.pub"), "--run-dir", str(run_dir)]) == 0
        assert "registered as node" in capsys.readouterr().out
        device = _start(["client", "--superlink", f"127.0.0.1:{port}", "--ca-cert", str(certs / "ca.crt"),
                         "--key", str(certs / "nodes" / "node-2"), "--data", str(data), "--state-dir",
                         str(tmp_path / "state"), "--port", str(port + 11), "--max-epsilon", "2"],
                        tmp_path / "client.log")
        assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop_all([server, device], 20)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in rounds[1:]:
        assert not record["train"]["clients"]
        [declined] = record["train"]["declined"]
        assert "refused: privacy.target-epsilon=8 exceeds this device's maximum 2" in declined["reason"]
    assert json.loads((run_dir / "privacy" / "summary.json").read_text())["declines"] == 2
    assert not list((tmp_path / "state").glob("*/ledger.json"))  # nothing was charged


def test_fleet_on_loopback_survives_crashes(tmp_path, cache_dir, capsys):
    """Three devices with TLS and node authentication, secure aggregation (SecAgg+) and
    user-level DP on; an unregistered node is refused; the server is killed after round 1
    and restarted, and finishes from its checkpoint; a device killed with SIGKILL while
    training in round 2 drops out of that secure round without stalling it, and its
    ledger holds the round it was killed in."""
    certs = tmp_path / "certs"
    assert main(["certs", str(certs), "--nodes", "4"]) == 0
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    shutil.move(certs / "nodes" / "node-4.pub", rogue / "node-4.pub")  # a key the server never registers
    devices = _devices(tmp_path, 3)
    run_dir, port = tmp_path / "run", 19400 + os.getpid() % 500
    server_args = ["server", "--certs", str(certs), "--nodes", str(certs / "nodes"), "--run-dir", str(run_dir),
                   "--config", str(TINY), "--port", str(port), "--local-port", str(port + 5), "--set", "num-clients=3",
                   "--set",
                   "clients-per-round=3", "--set", "evaluate.num-clients=3", "--set", "evaluate.every=2",
                   "--set", "round-timeout=60", "--set", "secagg.enabled=true", "--set", "user-dp.enabled=true",
                   "--set", "user-dp.sampling=fixed",
                   "--set", "num-server-rounds=4",
                   # noise for 5 participations: a round 2 cut short by the crash is charged again when redone
                   "--set", "privacy.planned-rounds=5"]

    def client(i: int, key: Path, data: Path, log: str, *extra: str) -> subprocess.Popen:
        return _start(["client", "--superlink", f"127.0.0.1:{port}", "--ca-cert", str(certs / "ca.crt"),
                       "--key", str(key), "--data", str(data), "--state-dir", str(tmp_path / f"state-{i}"),
                       "--port", str(port + 10 + i), "--require-dp", "--max-epsilon", "8", "--max-delta", "1e-5",
                       "--backoff-max", "8", *extra], tmp_path / log)

    server = _start(server_args, tmp_path / "server.log")
    clients: dict[int, subprocess.Popen] = {}
    try:
        _wait_for(tmp_path / "server.log", "waiting for 3 devices", 120, server)
        assert "loopback only: 127.0.0.1:" in (tmp_path / "server.log").read_text()
        _outsider_is_refused(tmp_path, port, certs, rogue / "node-4.pub")
        clients = {i: client(i, certs / "nodes" / f"node-{i}", devices[i - 1], f"client-{i}.log") for i in (1, 2, 3)}
        refused = client(4, certs / "nodes" / "node-4", devices[0], "client-4.log", "--max-restarts", "1")
        assert refused.wait(timeout=300) != 0
        refusal = (tmp_path / "client-4.log").read_text()
        assert "Failed to activate SuperNode" in refusal and "restarting in 1s" in refusal
        assert "its key is not registered" in refusal and "not restarting (--max-restarts 1)" in refusal

        _wait_for(run_dir / "checkpoints" / "latest.json", '"round": 1', 300, server)
        _kill_tree(server)  # the server machine crashes after round 1
        server = _start(server_args, tmp_path / "server-2.log")

        # Round 2 of the resumed run: device 3 charges its ledger, starts training, and is killed.
        _wait_for(tmp_path / "server-2.log", "resuming run", 120, server)
        ledger = tmp_path / "state-3" / devices[2].stem / "ledger.json"
        before = len(_ledger_rounds(ledger))
        deadline = time.time() + 300
        while len(_ledger_rounds(ledger)) == before and time.time() < deadline:
            time.sleep(0.1)
        assert _ledger_rounds(ledger)[-1] == 2, "device 3 never started round 2 of the resumed run"
        import psutil

        daemon = psutil.Process(clients[3].pid)
        for supernode in daemon.children():  # the SuperNode crashes; its daemon stays and restarts it
            if "flower-supernode" in " ".join(supernode.cmdline()):
                _kill_tree(supernode)

        assert server.wait(timeout=480) == 0, (tmp_path / "server-2.log").read_text()[-3000:]
    finally:
        stop_all([server, *clients.values()], 20)

    assert "resuming run" in (tmp_path / "server-2.log").read_text()
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.txt", "metrics.png",
                 "checkpoints/round-0", "checkpoints/round-2", "privacy/summary.json"):
        assert (run_dir / name).exists(), name
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert sorted(rounds[1]["train"]["clients"]) == sorted(p.stem for p in devices)
    assert sorted(rounds[2]["train"]["clients"]) == sorted(p.stem for p in devices[:2])  # the round went on
    # device 3 rejoined by itself once its old connection expired (about a minute): a secure round it
    # re-enters midway halts (Flower's SecAgg+ state is per process), and the round after has all three
    assert sorted(rounds[4]["train"]["clients"]) == sorted(p.stem for p in devices), rounds[3]["train"]
    assert "restarting in 1s" in (tmp_path / "client-3.log").read_text()
    assert rounds[1]["train"]["secagg"]["contributed"] == 3 and rounds[2]["train"]["secagg"]["dropped_out"] == 1
    assert json.loads((run_dir / "privacy" / "user_level.json").read_text())["rounds"] in (3, 4)
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 4
    # The killed device's ledger kept the round it died in (it over-reports, never under-reports), and its
    # restarted SuperNode opened it as it is (the hash chain is intact) and charged the last round after it.
    assert 2 in _ledger_rounds(ledger) and _ledger_rounds(ledger)[-1] == 4
    assert [c.round for c in Ledger.load(ledger).history if c.kind == "train"] == _ledger_rounds(ledger)
    # the operator collects each device's report key (`fedllm client key`, run on the device)
    keys = {}
    for i in (1, 2, 3):
        capsys.readouterr()
        assert main(["client", "key", "--state-dir", str(tmp_path / f"state-{i}")]) == 0
        keys.update(json.loads(capsys.readouterr().out))
    assert len(keys) == 3
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    for i in (1, 2, 3):  # the ledgers on the devices agree with the server's records; every report is signed
        assert main(["audit", str(run_dir), "--state-dir", str(tmp_path / f"state-{i}"), "--keys",
                     str(tmp_path / "keys.json"), "--out", str(tmp_path / f"audit-{i}")]) == 0
