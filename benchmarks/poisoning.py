"""One hostile client in six sends 1e30 deltas: held-out loss of the tiny experiment under
each defence, side by side with the clean run (ratios, one process).

    python benchmarks/poisoning.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from simulations.poisoning import run


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            run("clean, fedavg", {}, Path(tmp) / "clean", poisoned=False),
            run("poisoned, fedavg, no defence", {"validation.max-delta-norm": "none"}, Path(tmp) / "none",
                poisoned=True),
            run("poisoned, fedavg + max-delta-norm=auto", {"validation.max-delta-norm": "auto"},
                Path(tmp) / "auto", poisoned=True),
            run("poisoned, fedmedian (no norm bound)", {"strategy.name": "fedmedian",
                                                        "validation.max-delta-norm": "none"},
                Path(tmp) / "median", poisoned=True),
            run("poisoned, fedtrimmedavg (no norm bound)", {"strategy.name": "fedtrimmedavg",
                                                            "validation.max-delta-norm": "none"},
                Path(tmp) / "trimmed", poisoned=True),
        ]
    clean = runs[0]["loss"]
    print(f"{'run':<44} {'held-out loss':>13} {'vs clean':>9} {'rejected':>9}")
    for r in runs:
        print(f"{r['name']:<44} {r['loss']:>13.4f} {r['loss'] / clean:>9.4f} {r['rejected']:>9}")


if __name__ == "__main__":
    main()
