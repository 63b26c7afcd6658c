"""`fedllm simulate`: run an experiment on Flower's simulation engine, then print the
base-vs-global table from the run directory.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from fedllm.config import Config, load_toml
from fedllm.errors import ConfigError, FedllmError
from fedllm.data import load_clients
from fedllm.model import resolve_base
from fedllm.rundir import RunDir

DEFAULT_EXPERIMENT = "default.toml"


def experiment_path(name: str = DEFAULT_EXPERIMENT) -> Path:
    return Path(str(resources.files("simulations") / name))


def load_experiment(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Defaults < experiment file (the default one when none given) < --set overrides."""
    values = load_toml(path or experiment_path())
    values.update(overrides)
    return Config.from_flat(values)


def backend_config(config: Config) -> dict[str, Any]:
    cpus = config.simulation.num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": config.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
    }


def check_before_start(config: Config) -> None:
    """Refuse, before any worker starts, what every client (or the server) would refuse anyway."""
    clients = load_clients(config)
    if config.user_dp.enabled:
        from fedllm.privacy.user_level import check_delta

        check_delta(config.user_dp.delta, len(clients))
    if config.privacy.enabled:
        largest = max(clients, key=lambda c: c.num_records)
        if config.privacy.delta >= 1.0 / largest.num_records:
            raise ConfigError(
                f"privacy.delta={config.privacy.delta:g} is not below 1/n for client {largest.client_id} "
                f"with n={largest.num_records} records; use privacy.delta < {1.0 / largest.num_records:.3g}"
            )


def simulate(config: Config, run_dir: Path, client_app=None, server_config: Config | None = None) -> dict[str, Any]:
    """Run the whole simulation; returns summary.json's content.

    `client_app` defaults to fedllm's ClientApp; tests pass a misbehaving one.
    `server_config` (tests) makes the server ask for something other than the devices'
    own config, as a hostile server would.
    """
    from flwr.simulation import run_simulation

    from client.app import LOCAL_CONFIG_ENV
    from server.app import make_server_app

    if client_app is None:
        from client.app import app as client_app

    check_before_start(config)
    resolve_base(config)  # build the built-in base once, here, with a progress bar
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Each simulated device's own config (its policy, paths): Ray's workers inherit the environment.
    previous = os.environ.get(LOCAL_CONFIG_ENV)
    os.environ[LOCAL_CONFIG_ENV] = json.dumps(config.with_values({"run-dir": str(run_dir)}).to_flat())
    run = RunDir(run_dir)
    try:
        run_simulation(
            server_app=make_server_app(server_config or config, run_dir),
            client_app=client_app,
            num_supernodes=config.num_clients,
            backend_config=backend_config(config),
        )
    except Exception:
        if run.server_error():
            raise FedllmError(run.server_error()) from None
        raise
    finally:
        if previous is None:
            os.environ.pop(LOCAL_CONFIG_ENV, None)
        else:
            os.environ[LOCAL_CONFIG_ENV] = previous
    if run.server_error():
        raise FedllmError(run.server_error())
    if not run.summary_file.exists():
        raise RuntimeError(f"the simulation ended without writing {run.summary_file}; see the log above")
    return run.summary()
