"""`fedllm server`: a SuperLink with TLS and SuperNode authentication, the devices' keys
registered, and the fedllm ServerApp run on it with `flwr run`.

The run directory has the same shape as a simulation's; the SuperLink's own state
(`superlink.db`), log and the `flwr` CLI's connection (`.flwr/`) live beside it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

from fedllm.config import Config
from fedllm.deploy import processes
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir, in_use_refused


def app_dir() -> Path:
    """The project holding the Flower app (`[tool.flwr.app]` in its pyproject.toml)."""
    spec = importlib.util.find_spec("server")
    root = Path(spec.origin).resolve().parents[1] if spec and spec.origin else None
    if root is None or "[tool.flwr.app]" not in (root / "pyproject.toml").read_text(errors="ignore"):
        raise FedllmError("cannot find fedllm's Flower app (pyproject.toml with [tool.flwr.app]); run `fedllm server` "
                          "from an installation of the repository (`pip install -e .`)")
    return root


def write_run_config(config: Config, path: Path) -> Path:
    """Every key, flat, as `flwr run --run-config FILE` takes them."""
    path.write_text(processes.toml_table(config.to_flat()))
    return path


def node_keys(nodes: Path) -> list[Path]:
    keys = sorted(Path(nodes).glob("*.pub")) if Path(nodes).is_dir() else []
    if not keys:
        raise FedllmError(f"--nodes {nodes}: no *.pub node public keys found (make some with `fedllm certs DIR`)")
    return keys


def register(public_key: Path, run_dir: Path) -> str:
    """`fedllm server register KEY`: the operator registers a device's key with a running
    server, over the loopback Control API (devices cannot reach it)."""
    key = processes.require_file(public_key, "node public key", "KEY")
    flwr_home = Path(run_dir).resolve() / ".flwr"
    if not (flwr_home / "config.toml").exists():
        raise FedllmError(f"{run_dir} is not the run directory of a `fedllm server` on this machine "
                          "(no .flwr/config.toml)")
    return processes.register_node(key, flwr_home)


def serve(config: Config, run_dir: Path, *, ca_cert: Path, cert: Path, key: Path, nodes: Path,
          host: str = "127.0.0.1", port: int = 9093, local_port: int = 9091) -> dict:
    """Start the SuperLink on loopback and nginx on the device-facing address (Fleet API
    only), register `nodes`/*.pub, run the ServerApp to the end; the summary."""
    if local_port == port:
        raise FedllmError(f"--local-port {local_port} must differ from --port {port}")
    ca_cert = processes.require_file(ca_cert, "CA certificate", "--ca-cert")
    cert = processes.require_file(cert, "server certificate", "--cert")
    key = processes.require_file(key, "server private key", "--key")
    keys = node_keys(nodes)
    run_dir = Path(run_dir).resolve()
    with in_use_refused(run_dir, "server", "--run-dir"):
        return _serve(config, run_dir, ca_cert, cert, key, keys, host, port, local_port)


def _serve(config: Config, run_dir: Path, ca_cert: Path, cert: Path, key: Path, keys: list[Path], host: str,
           port: int, local_port: int) -> dict:
    from fedllm.deploy.proxy import exposure, start_proxy

    flwr_home = run_dir / ".flwr"
    processes.write_connection(flwr_home, f"127.0.0.1:{local_port}", ca_cert)
    log = run_dir / "superlink.log"
    superlink = processes.start_superlink(host="127.0.0.1", port=local_port, ca_cert=ca_cert, cert=cert, key=key,
                                          database=run_dir / "superlink.db", log=log, flwr_home=flwr_home)
    proxy = None
    try:
        processes.wait_for_port("127.0.0.1", local_port, 60, superlink, log)
        proxy = start_proxy(host=host, port=port, upstream_port=local_port, cert=cert, key=key, ca_cert=ca_cert,
                            work=run_dir / "proxy")
        processes.wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, 30, proxy,
                                run_dir / "proxy" / "nginx.log", "nginx")
        print(exposure(host, port, local_port), flush=True)
        for public in keys:
            node_id = processes.register_node(public, flwr_home)
            print(f"node key {public.name}: " + (f"registered as node {node_id}" if node_id else "already registered"),
                  flush=True)
        run_config = write_run_config(config.with_values({"run-dir": str(run_dir)}), run_dir / "run-config.toml")
        print(f"SuperLink on {host}:{port} (TLS, node authentication); waiting for {config.num_clients} devices",
              flush=True)
        done = subprocess.run(["flwr", "run", str(app_dir()), processes.CONNECTION, "--run-config", str(run_config),
                               "--stream"], env=processes.environment(flwr_home))
        summary = RunDir(run_dir).summary_file
        error = RunDir(run_dir).server_error()  # written by the ServerApp when it stops on a FedllmError
        if error:
            raise FedllmError(error)
        if not summary.exists():
            raise FedllmError(f"the run ended (flwr run exit status {done.returncode}) without {summary}; "
                              f"see {log} and the output above")
        return json.loads(summary.read_text())
    finally:
        processes.stop(proxy, 20)
        processes.stop(superlink, 20)
