"""Does the hive work? One global adapter against a hive of k = 2 and 4 specialists, with
and without personalisation, DP off and at epsilon 8, on the same evaluated devices of
the mixed corpus (`simulations/hive.toml`: half verse, half Python source).

    python -m simulations.hive OUT [--set KEY=VALUE ...] [--k 1 2 4] [--privacy off 8]

Each configuration is one `fedllm simulate` run under OUT/<privacy>-k<k> (a finished run
is reused, so a cut-short comparison continues where it stopped). The table goes to
standard output and OUT/summary.txt, the figures to OUT/hive.json:

    method               per corpus and overall: mean held-out perplexity of the devices
                         evaluated in every run, and the share of them it improves on the base
    base                 the built-in base (round 0)
    local only           each device's own records alone (personal.steps, from scratch)
    global               one global adapter (hive.k = 1) after the last round
    global + personal    that adapter fine-tuned on the device (personal.method = finetune)
    hive k               the specialist each device chose (on its training records)
    hive k + personal    that specialist fine-tuned on the device
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
EXPERIMENT = HERE / "hive.toml"


def run(out: Path, k: int, privacy: str, extra: list[str]) -> Path:
    run_dir = out / f"{'dp' + privacy if privacy != 'off' else 'nodp'}-k{k}"
    if (run_dir / "summary.json").exists():
        return run_dir
    sets = [f"hive.k={k}", f"privacy.enabled={'false' if privacy == 'off' else 'true'}"]
    if privacy != "off":
        sets.append(f"privacy.target-epsilon={privacy}")
    command = [sys.executable, "-m", "fedllm.cli", "simulate", "--config", str(EXPERIMENT), "--run-dir", str(run_dir)]
    for value in sets + extra:
        command += ["--set", value]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)
    return run_dir


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _kinds(run_dir: Path) -> dict[str, str]:
    from fedllm.config import Config
    from fedllm.data import load_clients

    config = Config.from_flat(json.loads((run_dir / "config.json").read_text()))
    return {c.client_id: c.kind for c in load_clients(config)}


def table(runs: dict[tuple[str, int], Path]) -> tuple[str, dict[str, Any]]:
    """The comparison, per privacy setting, on the devices evaluated in every run."""
    lines, figures = [], {}
    kinds = _kinds(next(iter(runs.values())))
    for privacy in sorted({p for p, _ in runs}, key=lambda p: (p != "off", p)):
        mine = {k: _rounds(path) for (p, k), path in sorted(runs.items()) if p == privacy}
        last = {k: rounds[-1]["evaluate"]["clients"] for k, rounds in mine.items()}
        first = next(iter(mine.values()))[0]["evaluate"]["clients"]
        common = sorted(set(first).intersection(*[set(v) for v in last.values()]))
        rows: dict[str, dict[str, float]] = {"base": {c: first[c]["perplexity"] for c in common}}
        if 1 in last:
            rows["local only"] = {c: last[1][c]["local-perplexity"] for c in common if "local-perplexity" in last[1][c]}
            rows["global"] = {c: last[1][c]["perplexity"] for c in common}
            rows["global + personal"] = {c: last[1][c]["personal-perplexity"] for c in common
                                         if "personal-perplexity" in last[1][c]}
        for k in sorted(last):
            if k > 1:
                rows[f"hive k={k}"] = {c: last[k][c]["perplexity"] for c in common}
                rows[f"hive k={k} + personal"] = {c: last[k][c]["personal-perplexity"] for c in common
                                                  if "personal-perplexity" in last[k][c]}
        groups = {"verse": [c for c in common if kinds.get(c) == "verse"],
                  "code": [c for c in common if kinds.get(c) == "code"], "all": common}
        title = "DP off" if privacy == "off" else f"record-level DP, epsilon {privacy}"
        head = f"{'method':<22}" + "".join(f"{g + ' (' + str(len(m)) + ')':>14}" for g, m in groups.items()) + \
            f"{'improves':>10}"
        lines += [f"mean held-out perplexity, {title}, same {len(common)} devices", head, "-" * len(head)]
        figures[privacy] = {"devices": groups, "methods": {}}
        for name, values in rows.items():
            if not values:
                continue
            means = {g: statistics.fmean(values[c] for c in members if c in values) if members else float("nan")
                     for g, members in groups.items()}
            better = [values[c] < rows["base"][c] for c in values]
            share = sum(better) / len(better)
            lines.append(f"{name:<22}" + "".join(f"{means[g]:>14.2f}" for g in groups) + f"{share:>10.0%}")
            figures[privacy]["methods"][name] = {"mean": means, "improves_share": share, "per_device": values}
        curve = {k: [r["evaluate"]["mean"]["perplexity"] for r in rounds if r.get("evaluate")] for k, rounds in mine.items()}
        lines.append("")
        lines.append("over rounds (mean held-out perplexity of the evaluated devices): " + "; ".join(
            f"k={k}: " + " ".join(f"{v:.1f}" for v in values) for k, values in sorted(curve.items())))
        purity = {k: json.loads((runs[(privacy, k)] / "summary.json").read_text()).get("hive", {}).get("specialists")
                  for k in mine if k > 1}
        for k, specialists in sorted(purity.items()):
            lines.append(f"k={k} specialists: " + ", ".join(
                f"#{s['specialist']} {s['devices']} devices {s['kinds']} purity {s['purity']}" for s in specialists or []))
        figures[privacy]["curve"], figures[privacy]["purity"] = curve, purity
        lines.append("")
    return "\n".join(lines), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--privacy", nargs="+", default=["off", "8"], help="'off' and/or target epsilons")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {(p, k): run(args.out, k, p, args.sets) for p in args.privacy for k in args.k}
    text, figures = table(runs)
    print(text)
    (args.out / "summary.txt").write_text(text + "\n")
    (args.out / "hive.json").write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
