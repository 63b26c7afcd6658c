"""Round time with Flower's SecAgg+ on against off, on the first default experiment
(simulations/plays.toml: 100 roles, 10 a round), where its recorded figures come from.

Both arms are full simulations of the default config (its model, 10 clients per round,
record-level DP as configured) run in this one process, alternating off/on so drift on
the machine hits both. A round's time is the server's own `seconds` in metrics.jsonl;
only rounds without evaluation count (evaluation runs only after the last round here).

    python benchmarks/secagg_overhead.py [--rounds 4] [--repeats 2] [--set KEY=VALUE ...]

Prints per-arm round times, upload bytes per client, and as its last line
`ratio <secagg on / off mean round time>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fedllm.config import parse_assignment
from fedllm.simulate import experiment_path, load_experiment, simulate


def run_arm(overrides: dict, secagg: bool, rounds: int) -> tuple[list[float], list[int]]:
    config = load_experiment(experiment_path("plays.toml"), {**overrides, "num-server-rounds": rounds, "evaluate.every": rounds,
                                    "evaluate.num-clients": 2, "secagg.enabled": secagg})
    with tempfile.TemporaryDirectory() as tmp:
        simulate(config, Path(tmp) / "run")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["round"] > 0 and "evaluate" not in r]
    return [r["seconds"] for r in timed], [b for r in timed for b in r["train"]["upload_bytes"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per simulation (the last, evaluated, is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="off/on pairs")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = dict(parse_assignment(a) for a in args.assignments)
    times: dict[bool, list[float]] = {False: [], True: []}
    upload: dict[bool, list[int]] = {False: [], True: []}
    for _ in range(args.repeats):
        for secagg in (False, True):
            t, b = run_arm(overrides, secagg, args.rounds)
            times[secagg] += t
            upload[secagg] += b
            print(f"secagg {'on ' if secagg else 'off'}: round seconds {t}", flush=True)
    off, on = statistics.fmean(times[False]), statistics.fmean(times[True])
    print(f"mean round time: secagg off {off:.2f}s, on {on:.2f}s over {len(times[True])} rounds each")
    print(f"upload per client per round: off {statistics.fmean(upload[False]) / 1024:.1f} KiB (float32 delta), "
          f"on {statistics.fmean(upload[True]) / 1024:.1f} KiB (keys, shares, masked vector)")
    print(f"ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
