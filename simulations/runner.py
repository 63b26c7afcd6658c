"""`fedllm simulate`: run an experiment on Flower's simulation engine, then print the
base-vs-global table from the run directory.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from fedllm.config import Config, load_toml
from fedllm.errors import ConfigError
from fedllm.data import load_clients
from fedllm.model import resolve_base
from fedllm.rundir import RunDir
from simulations.plots import finish

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
    """Refuse, before any worker starts, what every client would refuse anyway."""
    clients = load_clients(config)
    if config.privacy.enabled:
        largest = max(clients, key=lambda c: c.num_records)
        if config.privacy.delta >= 1.0 / largest.num_records:
            raise ConfigError(
                f"privacy.delta={config.privacy.delta:g} is not below 1/n for client {largest.client_id} "
                f"with n={largest.num_records} records; use privacy.delta < {1.0 / largest.num_records:.3g}"
            )


def simulate(config: Config, run_dir: Path, client_app=None) -> dict[str, Any]:
    """Run the whole simulation; returns summary.json's content.

    `client_app` defaults to fedllm's ClientApp; tests pass a misbehaving one.
    """
    from flwr.simulation import run_simulation

    from server.app import make_server_app

    if client_app is None:
        from client.app import app as client_app

    check_before_start(config)
    resolve_base(config)  # build the built-in base once, here, with a progress bar
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app=make_server_app(config, run_dir),
        client_app=client_app,
        num_supernodes=config.num_clients,
        backend_config=backend_config(config),
    )
    run = RunDir(run_dir)
    if not run.summary_file.exists():
        raise RuntimeError(f"the simulation ended without writing {run.summary_file}; see the log above")
    return finish(run_dir, format_summary(run.summary()))


def privacy_line(privacy: dict[str, Any]) -> str:
    if not privacy.get("enabled"):
        return "privacy                 off (no differential privacy)"
    eps = privacy.get("epsilon")
    if not eps:
        return "privacy                 record-level DP on; no client reported"
    return (f"privacy                 record-level DP, epsilon min/median/max {eps['min']:.2f}/"
            f"{eps['median']:.2f}/{eps['max']:.2f} (target {privacy['target_epsilon']:g}, delta "
            f"{privacy['delta']:g}); {privacy['declines']} declines by {len(privacy['declined'])} clients")


def format_summary(summary: dict[str, Any]) -> str:
    base, glob = summary["base"], summary["global"]
    rows = [
        ("", "base", "global"),
        ("held-out perplexity", f"{base['perplexity']:.2f}", f"{glob['perplexity']:.2f}"),
        ("held-out loss", f"{base['loss']:.4f}", f"{glob['loss']:.4f}"),
        ("next-token top-1", f"{base['top1']:.3f}", f"{glob['top1']:.3f}"),
        ("next-token top-3", f"{base['top3']:.3f}", f"{glob['top3']:.3f}"),
    ]
    if "personalised" in summary:
        pers, loc = summary["personalised"], summary["local_only"]
        rows = [(*r, *extra) for r, extra in zip(rows, [
            ("local-only", "personalised"), (f"{loc['perplexity']:.2f}", f"{pers['perplexity']:.2f}"),
            (f"{loc['loss']:.4f}", f"{pers['loss']:.4f}"), (f"{loc['top1']:.3f}", f"{pers['top1']:.3f}"),
            (f"{loc['top3']:.3f}", f"{pers['top3']:.3f}")])]
    lines = ["".join([f"{r[0]:<22}", *(f"{x:>14}" for x in r[1:])]) for r in rows]
    if "personalised" in summary:
        p = summary["personalisation"]
        lines.append(f"personalisation '{p['method']}' beats global on {100 * p['beats_global_fraction']:.0f}% "
                     f"of {p['clients']} clients ({p['declined']} declined for budget)")
    up, full = summary["upload_bytes_per_client_round"], summary["base_model_bytes"]
    lines += [
        "",
        f"clients evaluated       {len(summary['evaluated_clients'])} (same clients for base and global)",
        f"upload per client/round {up / 1024:.1f} KiB of adapter deltas = {100 * up / full:.2f}% "
        f"of the base model ({full / 2**20:.1f} MiB)",
        f"rejected replies        {summary['rejected_replies']}",
        privacy_line(summary.get("privacy", {})),
        f"rounds                  {summary['rounds']}, {summary['wall_seconds']:.0f}s",
    ]
    return "\n".join(lines)
