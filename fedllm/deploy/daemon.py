"""`fedllm client`: the device daemon, a Flower SuperNode running the fedllm ClientApp
on this device's own data, with its state store, key and the server's CA certificate.

The daemon supervises the SuperNode (`supervise`): when it exits (a crash, a refused
activation, a lost server) the daemon starts it again after a backoff that doubles up
to `--backoff-max` and resets once a SuperNode has stayed up; SIGTERM or SIGINT stop both.
Everything that must survive (ledger, personal adapters) is written atomically to
`--state-dir` by the ClientApp, which Flower runs in a fresh process per message.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedllm import atomic
from fedllm.deploy import processes
from fedllm.errors import FedllmError


def supernode_command(*, superlink: str, ca_cert: Path, key: Path, data: Path, state_dir: Path,
                      client_id: str = "", port: int = 9094, require_secagg: bool = False, require_dp: bool = True,
                      max_epsilon: float = 8.0, max_delta: float = 1e-5, require_user_dp: bool = False,
                      model: str = "builtin", device: str = "auto", dtype: str = "auto",
                      personalise_on_new_data: bool = False, train_window: str = "", require_ac_power: bool = False,
                      max_threads: int = 0, max_participations_per_day: int = 0,
                      resident: bool = True) -> list[str]:
    """The SuperNode command line; the device's policy and its local settings travel in
    its node config (its own side), never in what the server sends."""
    from fedllm.data.corpus import device_client
    from fedllm.privacy.policy import DevicePolicy

    DevicePolicy(require_dp=require_dp, max_epsilon=max_epsilon, max_delta=max_delta)  # refuses bad values now
    from fedllm.config import Config
    from fedllm.devices import resolve_device, resolve_dtype

    Config.from_flat({"device": device, "model.dtype": dtype})  # a bad value is named now, not at the first round
    resolved = resolve_device(device)  # ... and a device that is not here
    precision = str(resolve_dtype(dtype, resolved)).removeprefix("torch.")

    ca_cert = processes.require_file(ca_cert, "server CA certificate", "--ca-cert")
    key = processes.require_file(key, "node private key", "--key")
    if ":" not in superlink:
        raise FedllmError(f"--superlink {superlink}: give host:port, e.g. 127.0.0.1:9093")
    data = Path(data).resolve()
    records = device_client(data, client_id, 1, 0.2)  # readable, here and now, not at the first round
    state_dir = Path(state_dir).resolve()
    atomic.private_dir(state_dir)
    node_config = {"data-path": str(data), "state-dir": str(state_dir), "require-dp": require_dp,
                   "max-epsilon": float(max_epsilon), "max-delta": float(max_delta), "model": model,
                   "device": device, "dtype": dtype}
    if client_id:
        node_config["client-id"] = client_id
    if require_secagg:  # client.secure.REQUIRE
        node_config["require-secagg"] = True
    if require_user_dp:
        node_config["require-user-dp"] = True
    from fedllm import schedule
    from fedllm.deploy.device_worker import worker_dir

    schedule_config = {schedule.NODE_WINDOW: train_window, schedule.NODE_AC_POWER: require_ac_power,
                       schedule.NODE_MAX_THREADS: max_threads, schedule.NODE_MAX_PER_DAY: max_participations_per_day}
    schedule.check_node_schedule(schedule_config)  # a bad window, or a power source this OS does not report: now
    node_config.update({k: v for k, v in schedule_config.items() if v})
    if resident:
        node_config["worker-dir"] = str(worker_dir(state_dir))
    if personalise_on_new_data:
        from fedllm.new_data import personalise_on_new_data as personalise

        print(f"device {records.client_id}: {personalise(node_config)}", flush=True)
    print(f"device {records.client_id}: {records.num_records} training records from {data}; state in {state_dir}; "
          f"policy: {'DP required' if require_dp else 'DP optional'}, epsilon <= {max_epsilon:g}, "
          f"delta <= {max_delta:g}" + (", secure aggregation required" if require_secagg else "")
          + (", user-level DP required" if require_user_dp else "") + f"; runs on {resolved} ({precision} base)",
          flush=True)
    return ["flower-supernode", "--superlink", superlink, "--root-certificates", str(ca_cert),
            "--auth-supernode-private-key", str(key), "--port", str(port),
            "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())]


REFUSED = "Failed to activate SuperNode"  # Flower's message when the SuperLink refuses this node
STABLE_SECONDS = 120.0  # a SuperNode up this long was healthy: the next backoff starts small again


def worker_command(state_dir: Path) -> list[str]:
    """The resident worker (fedllm.deploy.device_worker) for the state store `state_dir`."""
    import sys

    return [sys.executable, "-m", "fedllm.deploy.device_worker", "--state-dir", str(Path(state_dir).resolve())]


def run_daemon(*, max_restarts: int = -1, backoff_max: float = 60.0, resident: bool = True, **kwargs) -> int:
    commands = [supernode_command(resident=resident, **kwargs)]
    if resident:  # the worker first: the SuperNode's first ClientApp finds it listening
        commands.insert(0, worker_command(kwargs["state_dir"]))
    env = processes.environment()
    # Flower's SuperExec looks for a message to run every second by default; a device answers sooner
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    return supervise(commands, env, max_restarts=max_restarts, backoff_max=backoff_max)


def why_it_stopped(status: int, output_tail: str) -> str:
    """What the daemon can tell from the SuperNode's exit: Flower reports a refused
    activation the same way for an unregistered key and for a node whose previous
    connection the SuperLink still holds (until its heartbeat expires), so both are named."""
    if REFUSED in output_tail:
        return ("the server refused this node: either its key is not registered (the operator runs `fedllm "
                "server register KEY`) or its previous connection is still alive on the server (it expires "
                "within about a minute of a crash); retrying covers the second")
    if status < 0:
        return f"the SuperNode was killed by signal {-status}"
    return f"the SuperNode exited with status {status}"


def _relay(process, tail, exited) -> None:
    """A child's output, passed through (the daemon's log is its children's, with its own
    notes); says when the child is gone."""
    for line in process.stdout:
        print(line, end="", flush=True)
        tail.append(line)
    process.wait()
    exited.set()


def _signal_group(process, signum: int) -> None:
    import os

    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def supervise(commands: list[list[str]], env: dict[str, str], *, max_restarts: int = -1,
              backoff_max: float = 60.0, first_backoff: float = 1.0) -> int:
    """Run `commands` (the last one is the SuperNode) side by side; when any exits, stop the
    others and start them all again after a backoff, until a signal asks the daemon to stop
    (exit 0) or `max_restarts` restarts are spent (-1: never; exit 1)."""
    import collections
    import signal
    import subprocess
    import threading
    import time

    stopping, exited = threading.Event(), threading.Event()
    children: list[subprocess.Popen] = []

    def stop(signum, _frame) -> None:
        stopping.set()
        exited.set()
        for child in children:
            if child.poll() is None:
                _signal_group(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    restarts, backoff = 0, first_backoff
    while True:
        started = time.monotonic()
        exited.clear()
        tail: collections.deque[str] = collections.deque(maxlen=50)
        readers = []
        children[:] = []
        for command in commands:
            # its own process group: what it leaves behind (Flower's SuperExec, a ClientApp) goes with it
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       bufsize=1, start_new_session=True)
            children.append(process)
            reader = threading.Thread(target=_relay, args=(process, tail, exited), daemon=True)
            reader.start()
            readers.append(reader)
        while not exited.wait(1.0) and all(c.poll() is None for c in children):
            pass
        statuses = [c.poll() for c in children]
        for child in children:  # the others stop with it; their helpers would outlive them otherwise
            _signal_group(child, signal.SIGKILL)
            child.wait()
        for reader in readers:
            reader.join(timeout=5)
        if stopping.is_set():
            print("fedllm client: stopped", flush=True)
            return 0
        if time.monotonic() - started > STABLE_SECONDS:
            backoff = first_backoff
        which = next((i for i, status in enumerate(statuses) if status is not None), len(commands) - 1)
        name = "the SuperNode" if which == len(commands) - 1 else "the device worker"
        reason = why_it_stopped(statuses[which] or 0, "".join(tail)).replace("the SuperNode", name)
        if 0 <= max_restarts <= restarts:
            print(f"fedllm client: {reason}; not restarting (--max-restarts {max_restarts})", flush=True)
            return 1
        print(f"fedllm client: {reason}; restarting in {backoff:g}s", flush=True)
        if stopping.wait(backoff):
            return 0
        restarts, backoff = restarts + 1, min(backoff * 2, backoff_max)
