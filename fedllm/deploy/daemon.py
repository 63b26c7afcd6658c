"""`fedllm client`: the device daemon, a Flower SuperNode running the fedllm ClientApp
on this device's own data, with its state store, key and the server's CA certificate.

The daemon *becomes* the SuperNode (exec): signals reach it directly, and a restart is
a new daemon on the same state store. Everything that must survive (ledger, personal
adapters) is written atomically to `--state-dir` by the ClientApp, which Flower runs in
a fresh process per message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedllm.deploy import processes
from fedllm.errors import FedllmError


def supernode_command(*, superlink: str, ca_cert: Path, key: Path, data: Path, state_dir: Path,
                      client_id: str = "", port: int = 9094, require_secagg: bool = False, require_dp: bool = True,
                      max_epsilon: float = 8.0, max_delta: float = 1e-5, require_user_dp: bool = False,
                      model: str = "builtin", device: str = "auto", dtype: str = "auto",
                      personalise_on_new_data: bool = False) -> list[str]:
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
    state_dir.mkdir(parents=True, exist_ok=True)
    node_config = {"data-path": str(data), "state-dir": str(state_dir), "require-dp": require_dp,
                   "max-epsilon": float(max_epsilon), "max-delta": float(max_delta), "model": model,
                   "device": device, "dtype": dtype}
    if client_id:
        node_config["client-id"] = client_id
    if require_secagg:  # client.secure.REQUIRE
        node_config["require-secagg"] = True
    if require_user_dp:
        node_config["require-user-dp"] = True
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


def run_daemon(**kwargs) -> None:
    command = supernode_command(**kwargs)
    os.execvpe(command[0], command, processes.environment())
