"""The `fedllm` command.

    fedllm simulate [--config FILE] [--set KEY=VALUE ...] [--run-dir DIR]
    fedllm base build [--config FILE] [--set KEY=VALUE ...]
    fedllm keys
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from fedllm.config import Config, describe_keys, load_toml, parse_assignment
from fedllm.errors import FedllmError


def _overrides(assignments: list[str]) -> dict[str, str]:
    return dict(parse_assignment(a) for a in assignments)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment TOML file (default: simulations/default.toml)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable")


def cmd_simulate(args: argparse.Namespace) -> int:
    # `simulations/` wires Flower's engine to `server/` and `client/`; import it only here.
    runner = importlib.import_module("simulations.runner")
    from fedllm.rundir import default_run_dir

    overrides = _overrides(args.assignments)
    if args.run_dir:
        overrides["run-dir"] = str(args.run_dir)
    config = runner.load_experiment(args.config, overrides)
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir()
    config = config.with_values({"run-dir": str(run_dir)})
    print(f"fedllm simulate: {config.num_clients} clients, {config.clients_per_round} per round, "
          f"{config.num_server_rounds} rounds -> {run_dir}", flush=True)
    summary = runner.simulate(config, run_dir)
    print()
    print(runner.format_summary(summary))
    print(f"\nrun directory: {run_dir}")
    return 0


def cmd_base_build(args: argparse.Namespace) -> int:
    from fedllm.model import resolve_base

    values = load_toml(args.config) if args.config else {}
    values.update(_overrides(args.assignments))
    config = Config.from_flat(values)
    if config.model.name != "builtin":
        raise FedllmError(f"model.name={config.model.name}: `fedllm base build` builds only the built-in base")
    print(resolve_base(config))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    for key, default, note in describe_keys():
        print(f"{key:<28} {default!r:<12} {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description="Federated LoRA personalisation of small LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated simulation on Flower's simulation engine")
    _add_config_args(sim)
    sim.add_argument("--run-dir", type=Path, help="where the run writes its files (default: runs/<time>)")
    sim.set_defaults(func=cmd_simulate)

    base = sub.add_parser("base", help="the built-in base model")
    base_sub = base.add_subparsers(dest="base_command", required=True)
    build = base_sub.add_parser("build", help="build (or find cached) the built-in base and print its path")
    _add_config_args(build)
    build.set_defaults(func=cmd_base_build)

    keys = sub.add_parser("keys", help="list every config key with its default")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedllmError as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
