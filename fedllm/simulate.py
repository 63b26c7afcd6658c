"""`fedllm simulate`: run an experiment on Flower's simulation runtime, the supported way.

A SuperLink in simulation mode on a free loopback port, and `flwr run` of a generated
Flower app: its pyproject.toml names the components (`[tool.flwr.app.components]` of the
project, or an experiment's own client app) and declares this run's config (the keys
that differ from the defaults), so the ServerApp reads it as Flower's run config. Each
simulated device's own config (its policy, its paths) travels separately, in
`DEVICE_CONFIG_ENV`: a test's server can then ask for something the devices refuse.

Everything Flower, Ray, transformers and Opacus print goes to `simulation.log` in the
run directory; the terminal shows fedllm's progress (followed from metrics.jsonl) and table.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from fedllm import atomic
from fedllm.config import Config, load_toml
from fedllm.device_requests import DEVICE_CONFIG_ENV  # a simulated device's own config: its policy, its paths
from fedllm.deploy.processes import environment, stop, toml_table, toml_value, wait_for_port, write_connection
from fedllm.data import load_clients
from fedllm.errors import ConfigError, FedllmError
from fedllm.model import resolve_base
from fedllm.privacy.user_level import check_delta
from fedllm.rundir import RunDir, in_use_refused

DEFAULT_EXPERIMENT = "default.toml"
EXPERIMENTS = "simulations"  # the package that holds experiment definitions (data, not code, for the library)
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
DEFAULT_COMPONENTS = {"serverapp": "server.app:app", "clientapp": "client.app:app"}
CONNECTION = "fedllm-simulation"  # the SuperLink connection's name in the run's FLWR_HOME
STARTUP_SECONDS = 60.0


def experiment_path(name: str = DEFAULT_EXPERIMENT) -> Path:
    return Path(str(resources.files(EXPERIMENTS) / name))


def references(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """The component references (`module:attribute`) of pyproject.toml's
    `[tool.flwr.app.components]` when the source tree is here, else the defaults."""
    refs = dict(DEFAULT_COMPONENTS)
    if pyproject.is_file():
        refs.update(tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
                    .get("components", {}))
    return refs


def component(name: str, pyproject: Path = PYPROJECT) -> Any:
    """The app object a component reference names, loaded as `flwr run` loads it."""
    module, _, attribute = references(pyproject)[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def load_experiment(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Defaults < experiment file (the default one when none given) < --set overrides."""
    values = load_toml(path or experiment_path())
    values.update(overrides)
    return Config.from_flat(values)


def federation_config(config: Config) -> dict[str, Any]:
    """Flower's simulation settings (its `SimulationConfig` fields): the population, CPUs per
    client and, on a GPU machine, each client's share of a GPU (0.25: four clients train on
    one GPU at once, each worker with its own frozen base)."""
    import torch

    from fedllm.devices import gpus_per_client

    s = config.simulation
    settings: dict[str, Any] = {"num_supernodes": config.num_clients, "client_resources_num_cpus": int(s.cpus_per_client)}
    if s.ray_address:  # an existing cluster: Ray knows its resources; fedllm only asks per client
        return {**settings, "client_resources_num_gpus": float(s.gpus_per_client) if s.gpus_per_client != "auto" else 0.0}
    cpus = s.num_cpus or os.cpu_count() or 1
    share = gpus_per_client(s.gpus_per_client, cpus, s.cpus_per_client)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if share and not gpus:
        raise ConfigError(f"simulation.gpus-per-client={s.gpus_per_client}: this machine has no CUDA GPU; "
                          "use 0 (or auto)")
    return {**settings, "client_resources_num_gpus": float(share), "init_args_num_cpus": int(cpus),
            "init_args_num_gpus": gpus}


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


def write_app(folder: Path, config: Config, client_app: str | None = None) -> Path:
    """A Flower app for this run: the project's components (or `client_app`, a
    `module:attribute` reference) and the config keys whose value is not the default.

    Only those: Flower keeps two copies of the run config per simulated node and ships one
    with every message, so a run of 10,000 nodes pays for each key declared here. The
    ServerApp fills in the defaults, as `Config.from_flat` always does."""
    refs = references()
    if client_app:
        refs["clientapp"] = client_app
    defaults = Config().to_flat()
    declared = {k: v for k, v in config.to_flat().items() if k == "run-dir" or defaults.get(k) != v}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "fedllm-run"\nversion = "0.1.0"\ndescription = "A fedllm simulation"\n'
        'license = "MIT"\ndependencies = []  # the app runs in this environment, where fedllm is installed\n\n'
        '[tool.flwr.app]\npublisher = "fedllm"\n\n[tool.flwr.app.components]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in refs.items())
        + "\n[tool.flwr.app.config]\n" + toml_table(declared))
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(flwr_home: Path, config: Config, device_config: Config) -> dict[str, str]:
    """What Flower's processes, and the Ray workers they start, inherit: this process's
    import path (an experiment's or a test's own client app), the devices' config, and the
    Ray cluster to join, if any (Ray reads RAY_ADDRESS; Flower's config has no field for it)."""
    env = environment(flwr_home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env[DEVICE_CONFIG_ENV] = json.dumps(device_config.to_flat())
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("TQDM_DISABLE", "1")  # no progress bars in the log; the terminal has fedllm's own
    if config.simulation.ray_address:
        env["RAY_ADDRESS"] = config.simulation.ray_address
    return env


def _check_cluster(address: str) -> None:
    """Refuse an unreachable simulation.ray-address here, with what to do, rather than deep in the run."""
    if not address or address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")  # host:port, or a Ray Client's ray://host:port
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError):
        raise FedllmError(f"simulation.ray-address={address}: no Ray cluster answers there; start one with "
                          "`ray start --head` and give the address it prints (host:port)") from None


def simulate(config: Config, run_dir: Path, client_app: str | None = None, server_config: Config | None = None,
             on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the whole simulation; returns summary.json's content.

    `client_app` (a `module:attribute` reference) replaces the project's client app
    (experiments and tests wrap it); `server_config` (tests) makes the server ask for
    something other than the devices' own config, as a hostile server would. `on_round`
    sees each line of metrics.jsonl as the server appends it.
    """
    check_before_start(config)
    _check_cluster(config.simulation.ray_address)
    resolve_base(config)  # build the built-in base once, here, with a progress bar
    run_dir = Path(run_dir).resolve()
    with in_use_refused(run_dir, "simulation", "--run-dir"):
        return _simulate(config, run_dir, client_app, server_config, on_round)


def _simulate(config: Config, run_dir: Path, client_app: str | None, server_config: Config | None,
              on_round: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    run = RunDir(run_dir)
    own = config.with_values({"run-dir": str(run_dir)})
    server = (server_config or config).with_values({"run-dir": str(run_dir)})
    flwr_home = run_dir / ".flwr"
    app = write_app(flwr_home / "app", server, client_app)
    port = _free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}", None, CONNECTION)
    env = _environment(flwr_home, config, own)
    federation = [f"{k}={toml_value(v)}" for k, v in federation_config(config).items()]
    log = run.log_file
    superlink = launched = None
    with atomic.open_private(log, "ab") as handle:
        try:
            superlink = subprocess.Popen(
                ["flower-superlink", "--simulation", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                 "--disable-runtime-dependency-installation"],
                stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            wait_for_port("127.0.0.1", port, STARTUP_SECONDS, superlink, log, "the simulation's SuperLink")
            launched = subprocess.Popen(
                ["flwr", "run", str(app), CONNECTION, "--stream", "--federation-config", " ".join(federation)],
                stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            _follow(run, launched, superlink, on_round)
        finally:
            stop(launched)
            stop(superlink)
    if run.server_error():
        raise FedllmError(run.server_error())
    if not run.summary_file.exists():
        raise FedllmError(f"the simulation ended (flwr run exit status {launched.returncode if launched else '?'}) "
                          f"without writing {run.summary_file}; see {log}")
    return run.summary()


def _follow(run: RunDir, launched: subprocess.Popen, superlink: subprocess.Popen,
            on_round: Callable[[dict[str, Any]], None] | None) -> None:
    """Wait for `flwr run` (it streams until the run ends), handing each new metrics line on."""
    offset = 0
    while True:
        finished = launched.poll() is not None
        if superlink.poll() is not None and not finished:
            raise FedllmError(f"the simulation's SuperLink exited with status {superlink.returncode}; "
                              f"see {run.log_file}")
        records, offset = run.new_metrics(offset)
        for record in records:
            if on_round is not None:
                on_round(record)
        if finished:
            return
        time.sleep(0.5)
