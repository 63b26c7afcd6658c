"""Deployment on loopback, for real: `fedllm certs`, `fedllm server` (a SuperLink with TLS
and node authentication) and three `fedllm client` daemons (SuperNodes), as processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from fedllm.cli import main

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


def _stop(*processes: subprocess.Popen) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_certs_refuses_to_overwrite_a_ca(tmp_path, capsys):
    assert main(["certs", str(tmp_path / "c"), "--nodes", "1"]) == 0
    assert "fedllm server --certs" in capsys.readouterr().out
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


def test_three_devices_with_tls_and_node_authentication(tmp_path, cache_dir):
    certs = tmp_path / "certs"
    assert main(["certs", str(certs), "--nodes", "4"]) == 0
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    shutil.move(certs / "nodes" / "node-4.pub", rogue / "node-4.pub")  # a key the server never registers
    devices = _devices(tmp_path, 3)
    run_dir, port = tmp_path / "run", 19400 + os.getpid() % 500

    server = _start(["server", "--certs", str(certs), "--nodes", str(certs / "nodes"), "--run-dir", str(run_dir),
                     "--config", str(TINY), "--port", str(port), "--set", "num-clients=3", "--set",
                     "clients-per-round=3", "--set", "evaluate.num-clients=3", "--set", "evaluate.every=2",
                     "--set", "round-timeout=120"], tmp_path / "server.log")
    clients: list[subprocess.Popen] = []
    try:
        _wait_for(tmp_path / "server.log", "waiting for 3 devices", 120, server)

        def client(i: int, key: Path, data: Path) -> subprocess.Popen:
            return _start(["client", "--superlink", f"127.0.0.1:{port}", "--ca-cert", str(certs / "ca.crt"),
                           "--key", str(key), "--data", str(data), "--state-dir", str(tmp_path / f"state-{i}"),
                           "--port", str(port + 10 + i)], tmp_path / f"client-{i}.log")

        clients = [client(i, certs / "nodes" / f"node-{i}", devices[i - 1]) for i in (1, 2, 3)]
        refused = client(4, certs / "nodes" / "node-4", devices[0])
        assert refused.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "client-4.log").read_text()

        assert server.wait(timeout=480) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        _stop(server, *clients)

    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.txt", "metrics.png",
                 "checkpoints/round-0", "checkpoints/round-2", "privacy/summary.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["evaluated_clients"]) == 3
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["train"]["clients"]) for r in rounds[1:]] == [sorted(p.stem for p in devices)] * 2
    # The devices' ledgers stayed on the devices, and agree with what the server recorded.
    for i, device in enumerate(devices, start=1):
        assert (tmp_path / f"state-{i}" / device.stem / "ledger.json").exists()
        assert main(["audit", str(run_dir), "--state-dir", str(tmp_path / f"state-{i}"),
                     "--out", str(tmp_path / f"audit-{i}")]) == 0
