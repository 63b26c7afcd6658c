"""`fedllm simulate`: run an experiment on Flower's simulation engine.

The library does not import its apps: like `flwr run`, it loads them from the component
references in pyproject.toml (`[tool.flwr.app.components]`), and hands each its config
through the environment (Flower's `run_simulation` takes no run config): the server's
request in `SERVER_CONFIG_ENV`, each simulated device's own config in `DEVICE_CONFIG_ENV`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from fedllm.config import Config, load_toml
from fedllm.data import load_clients
from fedllm.errors import ConfigError, FedllmError
from fedllm.model import resolve_base
from fedllm.privacy.user_level import check_delta
from fedllm.rundir import RunDir

DEFAULT_EXPERIMENT = "default.toml"
EXPERIMENTS = "simulations"  # the package that holds experiment definitions (data, not code, for the library)
SERVER_CONFIG_ENV = "FEDLLM_SERVER_CONFIG"  # what the server asks for: the run's config, or a test's hostile one
DEVICE_CONFIG_ENV = "FEDLLM_DEVICE_CONFIG"  # a simulated device's own config: its policy, its paths
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
DEFAULT_COMPONENTS = {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def experiment_path(name: str = DEFAULT_EXPERIMENT) -> Path:
    return Path(str(resources.files(EXPERIMENTS) / name))


def component(name: str, pyproject: Path = PYPROJECT) -> Any:
    """The app object a component reference names (`module:attribute`), as `flwr run` loads
    it; pyproject.toml's `[tool.flwr.app.components]` when the source tree is here."""
    refs = dict(DEFAULT_COMPONENTS)
    if pyproject.is_file():
        refs.update(tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
                    .get("components", {}))
    module, _, attribute = refs[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def load_experiment(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Defaults < experiment file (the default one when none given) < --set overrides."""
    values = load_toml(path or experiment_path())
    values.update(overrides)
    return Config.from_flat(values)


def backend_config(config: Config) -> dict[str, Any]:
    """Ray's resources: CPUs per client and, on a GPU machine, each client's share of a GPU
    (0.25: four clients train on one GPU at once, each worker with its own frozen base)."""
    import torch

    from fedllm.devices import gpus_per_client

    s = config.simulation
    if s.ray_address:  # an existing cluster: Ray knows its resources; fedllm only asks per client
        return {"client_resources": {"num_cpus": s.cpus_per_client,
                                     "num_gpus": float(s.gpus_per_client) if s.gpus_per_client != "auto" else 0.0}}
    cpus = config.simulation.num_cpus or os.cpu_count() or 1
    share = gpus_per_client(s.gpus_per_client, cpus, s.cpus_per_client)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if share and not gpus:
        raise ConfigError(f"simulation.gpus-per-client={s.gpus_per_client}: this machine has no CUDA GPU; "
                          "use 0 (or auto)")
    return {
        "client_resources": {"num_cpus": s.cpus_per_client, "num_gpus": share},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False},
    }


def check_before_start(config: Config) -> None:
    """Refuse, before any worker starts, what every client (or the server) would refuse anyway."""
    clients = load_clients(config)
    if config.user_dp.enabled:
        check_delta(config.user_dp.delta, len(clients))
    if config.privacy.enabled:
        largest = max(clients, key=lambda c: c.num_records)
        if config.privacy.delta >= 1.0 / largest.num_records:
            raise ConfigError(
                f"privacy.delta={config.privacy.delta:g} is not below 1/n for client {largest.client_id} "
                f"with n={largest.num_records} records; use privacy.delta < {1.0 / largest.num_records:.3g}"
            )


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (Ray's workers inherit them), then restore."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def cluster(address: str, env: dict[str, str]) -> Iterator[None]:
    """Connect to an existing Ray cluster for the block (nothing when `address` is empty:
    Flower starts a local one). Workers a cluster's nodes start do not inherit this
    process's environment: what they need travels in Ray's runtime environment."""
    if not address:
        yield
        return
    import sys

    import ray

    env = {**env, "PYTHONPATH": os.pathsep.join(sys.path), "RAY_DEDUP_LOGS": "0"}
    if os.environ.get("FEDLLM_CACHE"):
        env["FEDLLM_CACHE"] = os.environ["FEDLLM_CACHE"]
    try:
        ray.init(address=address, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FedllmError(f"simulation.ray-address={address}: cannot connect to a Ray cluster there ({exc}); start "
                          "one with `ray start --head` and give the address it prints") from None
    try:
        yield
    finally:
        ray.shutdown()  # this process's connection only; the cluster keeps running


def simulate(config: Config, run_dir: Path, client_app=None, server_config: Config | None = None) -> dict[str, Any]:
    """Run the whole simulation; returns summary.json's content.

    `client_app` defaults to the `clientapp` component; experiments and tests pass one that
    wraps it. `server_config` (tests) makes the server ask for something other than the
    devices' own config, as a hostile server would.
    """
    from flwr.simulation import run_simulation

    check_before_start(config)
    resolve_base(config)  # build the built-in base once, here, with a progress bar
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    own = config.with_values({"run-dir": str(run_dir)})
    server = (server_config or config).with_values({"run-dir": str(run_dir)})
    run = RunDir(run_dir)
    handed = {SERVER_CONFIG_ENV: json.dumps(server.to_flat()), DEVICE_CONFIG_ENV: json.dumps(own.to_flat())}
    with environment(handed), cluster(config.simulation.ray_address, {DEVICE_CONFIG_ENV: handed[DEVICE_CONFIG_ENV]}):
        try:
            run_simulation(server_app=component("serverapp"), client_app=client_app or component("clientapp"),
                           num_supernodes=config.num_clients, backend_config=backend_config(config))
        except Exception:
            if run.server_error():
                raise FedllmError(run.server_error()) from None
            raise
    if run.server_error():
        raise FedllmError(run.server_error())
    if not run.summary_file.exists():
        raise RuntimeError(f"the simulation ended without writing {run.summary_file}; see the log above")
    return run.summary()
