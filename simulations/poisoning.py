"""A poisoning experiment: one client in six sends a delta of 1e30 in every coordinate,
the rest are fedllm's own clients. `python benchmarks/poisoning.py` compares a clean run
with poisoned runs under each defence; tests/test_simulation.py checks the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as real

POISON = 1e30
HOSTILE_PARTITION = 0
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    if int(context.node_config["partition-id"]) == HOSTILE_PARTITION and "arrays" in reply.content.array_records:
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({k: Array(np.full(v.shape, POISON, np.float32))
                                               for k, v in arrays.items()})
    return reply


app.evaluate()(real.evaluate)
app.query()(real.query)


def held_out_loss(run_dir: Path) -> float:
    import json

    return float(json.loads((run_dir / "summary.json").read_text())["global"].get("loss", float("nan")))


def run(name: str, overrides: dict[str, Any], run_dir: Path, poisoned: bool) -> dict[str, Any]:
    """One tiny run (every client every round, no DP noise so that runs compare exactly)."""
    from fedllm.simulate import experiment_path, load_experiment, simulate

    values = {"clients-per-round": 6, "privacy.enabled": False, **overrides}
    summary = simulate(load_experiment(experiment_path("tiny.toml"), values), run_dir,
                       client_app="simulations.poisoning:app" if poisoned else None)
    return {"name": name, "loss": held_out_loss(run_dir), "rejected": summary["rejected_replies"]}
