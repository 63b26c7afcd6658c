"""Plots and the summary table written into a run directory after a simulation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedllm.rundir import RunDir


def plot_rounds(run: RunDir) -> Path | None:
    """metrics.png: mean held-out perplexity per evaluated round (round 0 = base) and
    mean client train loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = run.metrics()
    evals = [(r["round"], r["evaluate"]["mean"]["perplexity"]) for r in rounds if r.get("evaluate", {}).get("mean")]
    train = [(r["round"], sum(r["train"]["train_loss"]) / len(r["train"]["train_loss"]))
             for r in rounds if r.get("train", {}).get("train_loss")]
    if not evals:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(*zip(*evals), marker="o")
    left.set(xlabel="round", ylabel="held-out perplexity (mean over clients)", title="global adapter (round 0: base)")
    if train:
        right.plot(*zip(*train), marker="o", color="tab:orange")
    right.set(xlabel="round", ylabel="train loss (mean over clients)", title="local training")
    fig.tight_layout()
    path = run.path / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_personalisation(run: RunDir) -> Path | None:
    """personalisation.png: per-client held-out perplexity, global against personalised."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = run.path / "personalisation.csv"
    if not table.exists():
        return None
    rows = list(csv.DictReader(table.open()))
    glob = [float(r["global_perplexity"]) for r in rows]
    pers = [float(r["personalised_perplexity"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(glob, pers)
    lo, hi = min(glob + pers), max(glob + pers)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", label="personalised = global")
    ax.set(xlabel="global adapter perplexity", ylabel="personalised perplexity",
           title="held-out perplexity per client (below the line: personalisation helps)")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    path = run.path / "personalisation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_table(run: RunDir, text: str) -> Path:
    path = run.path / "summary.txt"
    path.write_text(text + "\n")
    return path


def finish(run_dir: Path, table: str) -> dict[str, Any]:
    run = RunDir(run_dir)
    write_table(run, table)
    plot_rounds(run)
    plot_personalisation(run)
    return run.summary()
