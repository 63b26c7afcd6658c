"""The summary table and plots the server writes into a run directory when a run ends
(simulated or deployed alike)."""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from fedllm import atomic
from fedllm.rundir import RunDir


def plot_rounds(run: RunDir) -> Path | None:
    """metrics.png: mean held-out perplexity per evaluated round (round 0 = base) and
    mean client train loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = run.metrics()
    evals = [(r["round"], r["evaluate"]["mean"]["perplexity"]) for r in rounds if r.get("evaluate", {}).get("mean")]
    train = [(r["round"], _mean_loss(r["train"])) for r in rounds if _mean_loss(r.get("train", {})) is not None]
    if not evals:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(*zip(*evals), marker="o")
    left.set(xlabel="round", ylabel="held-out perplexity (mean over clients)", title="global adapter (round 0: base)")
    if train:
        right.plot(*zip(*train), marker="o", color="tab:orange")
    right.set(xlabel="round", ylabel="train loss (mean over clients)", title="local training")
    fig.tight_layout()
    path = run.plot_file("metrics")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_personalisation(run: RunDir) -> Path | None:
    """personalisation.png: per-client held-out perplexity, global against personalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run.personalisation_rows()
    if not rows:
        return None
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
    path = run.plot_file("personalisation")
    _save(fig, path)
    plt.close(fig)
    return path


def finish(run_dir: Path, table: str) -> dict[str, Any]:
    run = RunDir(run_dir)
    run.write_summary_text(table)
    plot_rounds(run)
    plot_personalisation(run)
    return run.summary()


class Progress:
    """One terminal line per round, from its metrics.jsonl record; the held-out perplexity
    is the latest evaluated (rounds between evaluations show the last one). A record that
    is not what the server writes shows nothing: a follower only shows progress."""

    def __init__(self, rounds: int, perplexity: float = float("nan")):
        self.rounds = rounds
        self.perplexity = perplexity

    def line(self, record: dict[str, Any]) -> str | None:
        evaluated, train = record.get("evaluate"), record.get("train")
        if isinstance(evaluated, dict) and isinstance(evaluated.get("mean"), dict):
            self.perplexity = _number(evaluated["mean"].get("perplexity"))
        if not isinstance(train, dict):
            return None  # round 0: the base, evaluated before training
        mean = _mean_loss(train)
        return (f"round {record.get('round')}/{self.rounds}: {_count(train.get('clients'))} clients, "
                f"train loss {float('nan') if mean is None else mean:.3f}, "
                f"held-out ppl {self.perplexity:.2f}, {_count(train.get('dropped'))} dropped, "
                f"{_count(train.get('declined'))} declined, {_number(record.get('seconds')):.1f}s")


def _mean_loss(train: Any) -> float | None:
    """A round's mean training loss: of the per-client losses (plain rounds), or the
    mean a secure round decoded from its masked sums."""
    if not isinstance(train, dict):
        return None
    losses = train.get("train_loss")
    if isinstance(losses, list) and losses:
        return statistics.fmean(_number(x) for x in losses)
    masked = train.get("train_loss_mean")
    return _number(masked) if masked is not None else None


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def user_level_line(user: dict[str, Any]) -> str:
    """The device-level guarantee, next to the record-level one."""
    if not user.get("enabled"):
        return "user-level privacy      off (a device's participation is not protected)"
    eps = user.get("epsilon")
    amplification = (f"Poisson participation q={user['sample_rate']:.3g}" if user["sampling"] == "poisson"
                     else "fixed cohorts, no amplification claimed")
    if user.get("noise_cohort_size"):
        this = user.get("epsilon_of_this_run")
        return (f"user-level privacy      SIMULATED {user['noise_cohort_size']}-client cohort: epsilon "
                f"{'inf' if eps is None else f'{eps:.2f}'} is that deployment's, not this run's (this run: "
                f"{'inf' if this is None else f'{this:.2f}'}; delta {user['delta']:g}, {user['rounds']} rounds)")
    return (f"user-level privacy      DP-FedAvg per device, epsilon {'inf' if eps is None else f'{eps:.2f}'} "
            f"(delta {user['delta']:g}) after {user['rounds']} rounds; noise multiplier "
            f"{user['noise_multiplier']:.3g}, clip {user['clip']:g}, {amplification}")


def privacy_line(privacy: dict[str, Any]) -> str:
    if not privacy.get("enabled"):
        return "privacy                 off (no record-level differential privacy)"
    eps = privacy.get("epsilon")
    if not eps:
        return "privacy                 record-level DP on; no client reported"
    return (f"privacy                 record-level DP, epsilon min/median/max {eps['min']:.2f}/"
            f"{eps['median']:.2f}/{eps['max']:.2f} (target {privacy['target_epsilon']:g}, delta "
            f"{privacy['delta']:g}); {privacy['declines']} declines by {len(privacy['declined'])} clients")


def _filled(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Every summary metric, NaN where none was measured (e.g. every evaluation reply was dropped)."""
    return {k: float((metrics or {}).get(k, float("nan"))) for k in ("perplexity", "loss", "top1", "top3")}


def format_summary(summary: dict[str, Any]) -> str:
    base, glob = _filled(summary.get("base")), _filled(summary.get("global"))
    rows = [
        ("", "base", f"hive k={summary['hive']['k']}" if summary.get("hive") else "global"),  # a device's specialist
        ("held-out perplexity", f"{base['perplexity']:.2f}", f"{glob['perplexity']:.2f}"),
        ("held-out loss", f"{base['loss']:.4f}", f"{glob['loss']:.4f}"),
        ("next-token top-1", f"{base['top1']:.3f}", f"{glob['top1']:.3f}"),
        ("next-token top-3", f"{base['top3']:.3f}", f"{glob['top3']:.3f}"),
    ]
    if "personalised" in summary:
        pers, loc = _filled(summary["personalised"]), _filled(summary.get("local_only"))
        rows = [(*r, *extra) for r, extra in zip(rows, [
            ("local-only", "personalised"), (f"{loc['perplexity']:.2f}", f"{pers['perplexity']:.2f}"),
            (f"{loc['loss']:.4f}", f"{pers['loss']:.4f}"), (f"{loc['top1']:.3f}", f"{pers['top1']:.3f}"),
            (f"{loc['top3']:.3f}", f"{pers['top3']:.3f}")])]
    lines = ["".join([f"{r[0]:<22}", *(f"{x:>14}" for x in r[1:])]) for r in rows]
    if (summary.get("data") or {}).get("synthetic_clients"):
        lines.insert(0, f"SCALE TEST: synthetic clients (the plays' private speeches dealt "
                        f"{summary['data']['partitioner']}); the roles are the natural clients")
    shape = summary.get("base_shape")
    if shape:  # a `fedllm base shape` model: its figures are costs, never quality
        lines.insert(0, f"BASE WEIGHTS ARE RANDOM ({shape.get('shape')} shape from `fedllm base shape`): cost "
                        "figures only, no utility claim")
    if "personalised" in summary:
        p = summary["personalisation"]
        lines.append(f"personalisation '{p['method']}' beats global on {100 * p['beats_global_fraction']:.0f}% "
                     f"of {p['clients']} clients ({p['declined']} declined for budget)")
    up, full = summary["upload_bytes_per_client_round"], summary["base_model_bytes"]
    secure = summary.get("secure_aggregation", False)
    lines += [
        "",
        f"clients evaluated       {len(summary['evaluated_clients'])} (same clients for base and global)",
        f"upload per client/round {up / 1024:.1f} KiB of {'SecAgg+ traffic' if secure else 'adapter deltas'} = "
        f"{100 * up / full:.2f}% "
        f"of the base model ({full / 2**20:.1f} MiB)",
        f"rejected replies        {summary['rejected_replies']}",
        privacy_line(summary.get("privacy", {})),
        user_level_line(summary.get("user_level_privacy", {})),
        "secure aggregation      " + ("on (Flower SecAgg+): the server saw only sums" if secure else "off"),
        f"rounds                  {summary['rounds']}, {summary['wall_seconds']:.0f}s",
    ]
    if summary.get("hive"):
        lines += hive_lines(summary["hive"])
    return "\n".join(lines)


def hive_lines(h: dict) -> list[str]:
    """The hive's part of summary.txt: who chose which specialist, and how pure each is."""
    lines = ["", f"hive                    {h['k']} specialists ({h['method']}); devices choose "
                 + ("privately (report-noisy-max, noise " + f"{h['select_noise']:g})" if h.get("select_noise")
                    else "by lowest loss on their training records")]
    for s in h.get("specialists") or []:
        kinds = ", ".join(f"{n} {kind}" for kind, n in s["kinds"].items()) or "kinds unknown"
        purity = f", purity {100 * s['purity']:.0f}% {s['majority']}" if s.get("purity") is not None else ""
        lines.append(f"  specialist {s['specialist']:<10}  chosen by {s['devices']} evaluated devices ({kinds}){purity}")
    if not h.get("specialists"):
        lines.append(f"  choices                {h.get('evaluated_choices')}")
    lines.append(f"  training choices       {h['train_counts_total']} over all rounds"
                 + (f"; each upload carries {h['upload_adapters_per_device']} adapter slots (secure)"
                    if h.get("upload_adapters_per_device", 1) > 1 else ""))
    return lines


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    atomic.write_bytes(path, buffer.getvalue())  # 0600, like the rest of the run directory
