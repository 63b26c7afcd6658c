"""How fedllm scales in the population and the cohort, on this machine.

For each population (100, 1,000, 10,000 synthetic clients, each dealt 6 speeches of the
embedded private plays, as a JSONL dataset with a client-id column) and cohort (10, 100,
1,000 clients per round; none larger than the population), one `fedllm simulate` run:
the tiny base, one local step, record-level DP on, three rounds (evaluation only at
round 0 and the last). Measured from outside the run:

    discovery s     round 0: the server asks every node who it is, then evaluates the base
    s/round         wall time of a training round (rounds 1 and 2, no evaluation in them)
    updates/s       client updates the server added per second of those rounds
    server MiB      peak RSS (VmHWM) of the process that runs the ServerApp (flwr-simulation)
    worker MiB      peak RSS of the largest Ray worker (a ClientApp actor)
    efficiency      client work (the whole ClientApp train call, timed inside the worker)
                    over wall time x workers, in the training rounds

    python benchmarks/scale.py [--populations 100,1000,10000] [--cohorts 10,100,1000]

Last line: `ratio <peak worker RSS at the largest population / at the smallest>` (cohort 10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as real

RECORDS_PER_CLIENT = 6
ROUNDS = 3
TIMINGS = "client-seconds.jsonl"

app = ClientApp()  # fedllm's ClientApp; each train call's seconds go to <run-dir>/client-seconds.jsonl


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    reply = real.train(msg, context)
    seconds = time.perf_counter() - started
    request = msg.content["config"]
    with open(Path(str(request["run-dir"])) / TIMINGS, "a") as handle:  # one short O_APPEND write per call
        handle.write(json.dumps({"round": int(request["server-round"]), "seconds": seconds}) + "\n")
    return reply


app.evaluate()(real.evaluate)
app.query()(real.query)


def write_dataset(path: Path, population: int) -> Path:
    """`population` clients of RECORDS_PER_CLIENT private speeches each (dealt cyclically)."""
    from fedllm.data.corpus import embedded_split

    _, private = embedded_split(0.5, 0)
    speeches = [s.text for play in private for s in play.speeches if len(s.text) > 20]
    with open(path, "w") as handle:
        for i in range(population * RECORDS_PER_CLIENT):
            handle.write(json.dumps({"client_id": f"u{i // RECORDS_PER_CLIENT:05d}",
                                     "text": speeches[i % len(speeches)]}) + "\n")
    return path


class PeakMemory:
    """Peak RSS (the kernel's VmHWM) of this process's descendants, sampled as they run:
    the flwr-simulation process (the ServerApp and Ray's driver) and Ray's workers."""

    def __init__(self, every: float = 0.25):
        self.server = self.worker = 0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _peak_bytes(pid: int) -> int:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _watch(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for process in me.children(recursive=True):
                try:
                    command = " ".join(process.cmdline())
                    if "flwr-simulation" in command:
                        self.server = max(self.server, self._peak_bytes(process.pid))
                    elif command.startswith("ray::"):  # Ray's workers name themselves (ray::ClientAppActor...)
                        self.worker = max(self.worker, self._peak_bytes(process.pid))
                except (OSError, psutil.Error):
                    continue  # it exited between the listing and the read
            self._stop.wait(self.every)


def one_run(population: int, cohort: int, dataset: Path, folder: Path) -> dict:
    from fedllm.simulate import experiment_path, load_experiment, simulate

    run_dir = folder / f"p{population}-c{cohort}"
    config = load_experiment(experiment_path("tiny.toml"), {
        "num-clients": population, "clients-per-round": cohort, "num-server-rounds": ROUNDS, "local-steps": 1,
        "data.path": str(dataset), "data.min-records": 2, "data.holdout-fraction": 0.34,
        "evaluate.num-clients": 10, "evaluate.every": 1000, "round-timeout": 3600.0, "privacy.enabled": True,
        "privacy.delta": 1e-3,  # below 1/n for a client of 4 training records
    })
    with PeakMemory() as peak:
        simulate(config, run_dir, client_app=f"{Path(__file__).stem}:app")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in rounds if 0 < r["round"] < ROUNDS]
    wall = [r["seconds"] for r in training]
    updates = sum(len(r["train"]["clients"]) for r in training)
    timings = [json.loads(line) for line in (run_dir / TIMINGS).read_text().splitlines()]
    work = sum(t["seconds"] for t in timings if 0 < t["round"] < ROUNDS)
    workers = (config.simulation.num_cpus or os.cpu_count() or 1) // config.simulation.cpus_per_client
    return {"population": population, "cohort": cohort, "discovery_s": rounds[0]["seconds"],
            "seconds_per_round": statistics.fmean(wall), "updates_per_s": updates / sum(wall),
            "server_mib": peak.server / 2**20, "worker_mib": peak.worker / 2**20,
            "efficiency": work / (sum(wall) * workers), "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", default="100,1000,10000")
    parser.add_argument("--cohorts", default="10,100,1000")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    populations = [int(p) for p in args.populations.split(",")]
    cohorts = [int(c) for c in args.cohorts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'population':>10} {'cohort':>6} {'discovery s':>11} {'s/round':>8} {'updates/s':>9} "
              f"{'server MiB':>10} {'worker MiB':>10} {'efficiency':>10}", flush=True)
        for population in populations:
            dataset = write_dataset(folder / f"clients-{population}.jsonl", population)
            for cohort in (c for c in cohorts if c <= population):
                row = one_run(population, cohort, dataset, folder)
                rows.append(row)
                print(f"{population:>10} {cohort:>6} {row['discovery_s']:>11.1f} {row['seconds_per_round']:>8.2f} "
                      f"{row['updates_per_s']:>9.1f} {row['server_mib']:>10.0f} {row['worker_mib']:>10.0f} "
                      f"{row['efficiency']:>10.0%}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    by = {(r["population"], r["cohort"]): r for r in rows}
    largest = max(populations)
    if (largest, max(cohorts)) in by and (largest, min(cohorts)) in by:
        print(f"server peak RSS at cohort {max(cohorts)} / cohort {min(cohorts)} (population {largest}): "
              f"{by[largest, max(cohorts)]['server_mib'] / by[largest, min(cohorts)]['server_mib']:.2f}")
    if (min(populations), min(cohorts)) in by and (largest, min(cohorts)) in by:
        print(f"ratio {by[largest, min(cohorts)]['worker_mib'] / by[min(populations), min(cohorts)]['worker_mib']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
