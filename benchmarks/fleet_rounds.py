"""Deployed round time against simulated round time, on loopback, with everything real.

One run per arm, on the tiny experiment with 3 clients (all sampled) and record-level DP:

    simulated           `fedllm simulate` (Flower's simulation runtime)
    deployed            `fedllm server` (SuperLink with TLS and node authentication, behind
                        nginx) and 3 `fedllm client` daemons, each with its resident worker
    deployed, no worker the same daemons with --no-resident-worker: Flower's fresh ClientApp
                        process per message loads the model every time (the old behaviour)

each plain and under SecAgg+. A round's time is the server's own `seconds` in
metrics.jsonl; rounds with an evaluation are not counted (only the last round has one).
The devices use one torch thread each, as a simulated client does (`cpus-per-client` 1).

    python benchmarks/fleet_rounds.py [--rounds 5] [--set KEY=VALUE ...]

Prints each arm's mean round time, and as its last line `ratio <deployed / simulated>`
for plain rounds.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedllm.deploy.processes import stop_all

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "simulations" / "tiny.toml"
FEDLLM = [sys.executable, "-m", "fedllm.cli"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _settings(rounds: int, secagg: bool, extra: list[str]) -> list[str]:
    values = [f"num-server-rounds={rounds}", "num-clients=3", "clients-per-round=3", "evaluate.num-clients=3",
              f"evaluate.every={rounds}", f"privacy.planned-rounds={rounds}", "round-timeout=120",
              f"secagg.enabled={str(secagg).lower()}", *extra]
    return [arg for value in values for arg in ("--set", value)]


def _round_seconds(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in records if r["round"] > 0 and "evaluate" not in r]


def simulated(tmp: Path, rounds: int, secagg: bool, extra: list[str]) -> list[float]:
    run_dir = tmp / f"sim-{secagg}"
    subprocess.run([*FEDLLM, "simulate", "--config", str(TINY), "--run-dir", str(run_dir),
                    *_settings(rounds, secagg, extra)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return _round_seconds(run_dir)


def _devices(tmp: Path) -> list[Path]:
    """The simulation's 3 clients, each as a device's own data file."""
    from fedllm.config import Config, load_toml
    from fedllm.data import load_clients

    config = Config.from_flat({**load_toml(TINY), "num-clients": 3})
    paths = []
    for i, c in enumerate(load_clients(config), start=1):
        path = tmp / f"device-{i}" / f"{c.client_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (*c.train, *c.heldout)))
        paths.append(path)
    return paths


def deployed(tmp: Path, rounds: int, secagg: bool, resident: bool, extra: list[str]) -> list[float]:
    arm = tmp / f"fleet-{secagg}-{resident}"
    certs, run_dir = arm / "certs", arm / "run"
    subprocess.run([*FEDLLM, "certs", str(certs), "--nodes", "3"], check=True, stdout=subprocess.DEVNULL)
    port, local = _free_port(), _free_port()
    logs = arm / "logs"
    logs.mkdir(parents=True)
    started = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        process = subprocess.Popen([*FEDLLM, *args], stdout=open(logs / name, "wb"), stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=ROOT)
        started.append(process)
        return process

    try:
        server = start(["server", "--certs", str(certs), "--nodes", str(certs / "nodes"), "--run-dir", str(run_dir),
                        "--config", str(TINY), "--port", str(port), "--local-port", str(local),
                        *_settings(rounds, secagg, extra)], "server.log")
        for i, data in enumerate(_devices(arm), start=1):
            start(["client", "--superlink", f"127.0.0.1:{port}", "--ca-cert", str(certs / "ca.crt"),
                   "--key", str(certs / "nodes" / f"node-{i}"), "--data", str(data),
                   "--state-dir", str(arm / f"state-{i}"), "--port", str(_free_port()), "--max-threads", "1",
                   *([] if resident else ["--no-resident-worker"])], f"client-{i}.log")
        if server.wait(timeout=1800) != 0:
            raise RuntimeError(f"the server failed:\n{(logs / 'server.log').read_text()[-3000:]}")
    finally:
        stop_all(started, 30)
    return _round_seconds(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (the last, evaluated, is not timed)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    means: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for secagg in (False, True):
            kind = "secagg" if secagg else "plain"
            arms = {f"simulated {kind}": lambda: simulated(tmp, args.rounds, secagg, args.assignments),
                    f"deployed {kind}": lambda: deployed(tmp, args.rounds, secagg, True, args.assignments),
                    f"deployed {kind}, no worker": lambda: deployed(tmp, args.rounds, secagg, False,
                                                                    args.assignments)}
            for name, run in arms.items():
                start = time.perf_counter()
                seconds = run()
                means[name] = statistics.fmean(seconds)
                print(f"{name:<28} mean round {means[name]:6.2f}s  rounds {[round(s, 2) for s in seconds]}  "
                      f"(whole run {time.perf_counter() - start:.0f}s)", flush=True)
    for kind in ("plain", "secagg"):
        print(f"{kind}: deployed / simulated {means[f'deployed {kind}'] / means[f'simulated {kind}']:.2f}; "
              f"without the resident worker {means[f'deployed {kind}, no worker'] / means[f'simulated {kind}']:.2f}")
    print(f"ratio {means['deployed plain'] / means['simulated plain']:.2f}")


if __name__ == "__main__":
    main()
