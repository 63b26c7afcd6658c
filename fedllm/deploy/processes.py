"""Flower's own deployment processes, started with the settings fedllm needs.

Nothing here speaks Flower's protocols itself: the SuperLink, SuperNodes and the `flwr`
CLI do, as separate processes. They find each other's helpers (`flower-superexec`,
`flwr-serverapp`, `flwr-clientapp`) on PATH, so the environment's bin directory goes first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedllm.errors import FedllmError

CONNECTION = "fedllm"  # the name of the SuperLink connection in FLWR_HOME/config.toml


def environment(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # the app runs in this environment
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline: no usage events to Flower
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def require_file(path: Path | None, what: str, flag: str) -> Path:
    if path is None or not Path(path).is_file():
        raise FedllmError(f"{what} {path} not found; give it with {flag}")
    return Path(path)


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None, name: str = CONNECTION) -> None:
    """The `flwr` CLI's connection `name` to this SuperLink: TLS verified with `ca_cert`, or,
    without one, plain (a simulation's SuperLink, on loopback only)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{Path(ca_cert).resolve()}"\n' if ca_cert is not None else "insecure = true\n"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n' + security)


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None,
                  log: Path | None = None, what: str = "the SuperLink") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise FedllmError(f"{what} exited with status {process.returncode} before listening on "
                              f"{host}:{port}:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise FedllmError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def start_superlink(*, host: str, port: int, ca_cert: Path, cert: Path, key: Path, database: Path, log: Path,
                    flwr_home: Path) -> subprocess.Popen:
    """A SuperLink with TLS and SuperNode authentication on; state in `database`."""
    command = ["flower-superlink", "--host", host, "--port", str(port), "--ssl-ca-certfile", str(ca_cert),
               "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
               "--database", str(database), "--disable-runtime-dependency-installation"]
    handle = open(log, "ab")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment(flwr_home),
                            start_new_session=True)


def register_node(public_key: Path, flwr_home: Path) -> str:
    """Register a node's public key with the SuperLink; its node id, or "" if it was
    registered before (the SuperLink's database keeps registrations across restarts)."""
    done = subprocess.run(["flwr", "supernode", "register", str(public_key), CONNECTION, "--format", "json"],
                          env=environment(flwr_home), capture_output=True, text=True, timeout=60)
    try:
        answer = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        answer = {"error-message": (done.stdout + done.stderr).strip()[-500:]}
    if answer.get("success"):
        return str(answer["node-id"])
    error = str(answer.get("error-message", ""))
    if "already in use" in error:
        return ""
    raise FedllmError(f"could not register node key {public_key}: {error}")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def toml_table(values: dict) -> str:
    """Flat `"key" = value` lines, as `flwr run --run-config FILE` and `[tool.flwr.app.config]` take them."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in values.items())


def stop(process: subprocess.Popen | None, timeout: float = 30) -> None:
    """Stop a process started in its own session, and everything it started."""
    stop_all([process], timeout)


def stop_all(started: list[subprocess.Popen | None], timeout: float = 30) -> None:
    """Stop processes started in their own sessions, and everything they started: all are
    asked at once (SIGTERM), then each gets `timeout` seconds before SIGKILL."""
    running = [p for p in started if p is not None and p.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
