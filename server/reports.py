"""privacy/user_level.json: the user-level claim after each round, with what secure
aggregation adds to it (its parameters, and how often a round was too small for it)."""

from __future__ import annotations

from typing import Any

from fedllm.secure_metrics import clipping_range


# `server` below is a server.round_loop.Server (not imported: that module imports this one)


def small_cohort_probability(population: int, sample_rate: float, sampling: str) -> float:
    """P(a round's Poisson sample has fewer than 3 clients): how often the noise-alone rule can apply."""
    from scipy.stats import binom

    return float(binom.cdf(2, population, sample_rate)) if sampling == "poisson" else 0.0


def user_level_report(server: Any, rounds: int) -> dict[str, Any]:
    """privacy/user_level.json after `rounds` completed rounds ({"enabled": false} when off)."""
    u, config = server.user_level, server.config
    if u is None:
        return {"enabled": False}
    secagg = None
    if config.secagg.enabled:
        s = config.secagg
        secagg = {"protocol": "SecAgg+ (Flower SecAggPlusWorkflow / secaggplus_mod)", "num_shares": s.num_shares,
                  "threshold": s.threshold, "quantization_bits": s.quantization_bits,
                  "clipping_range": clipping_range(config),
                  "quantization": "stochastic rounding; per round, metrics.jsonl train.secagg.quantization holds "
                                  "the error bound of that round's sum",
                  "small_cohort_rounds": server.books.small_cohort_rounds,
                  "small_cohort_probability_per_round": small_cohort_probability(u.population, u.sample_rate,
                                                                                 u.sampling),
                  "small_cohort_note": "rounds whose sample was too small for secure aggregation released the "
                                       "noise alone; the accounting above does not charge for that choice"}
    report = {"enabled": True, "run_id": server.run_id, **u.report(rounds, config.num_server_rounds, secagg, server.run_id)}
    server.run.write_user_level(report)
    return report


def hive_summary(server: Any, last_eval: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `hive`: per specialist, the devices that chose it (at the last
    evaluation, where the run shows choices: never in a secure run) and how pure that
    membership is where the simulation knows each client's corpus; the training rounds'
    counts (a secure round's are sums of masked one-hot votes); the upload cost."""
    from fedllm import hive
    from fedllm import messages as wire

    config = server.config
    choices = {c: int(m[wire.SPECIALIST]) for c, m in last_eval.get("clients", {}).items() if wire.SPECIALIST in m}
    kinds: dict[str, str] = {}
    if not config.data.path:  # a simulation's embedded corpus: each client's kind is known
        try:
            from fedllm.data import load_clients

            kinds = {c.client_id: c.kind for c in load_clients(config)}
        except Exception:  # noqa: BLE001 - a server without the corpus reports no purity
            kinds = {}
    per_round = [m["train"]["hive"]["counts"] for m in server.run.metrics()  # a refused round has none
                 if isinstance(m.get("train"), dict) and isinstance(m["train"].get("hive"), dict)
                 and "counts" in m["train"]["hive"]]
    one_adapter = sum(a.numpy().nbytes for a in server.arrays.values()) / server.k
    return {
        "k": server.k, "method": config.hive.method,
        "select_noise": config.hive.select_noise if config.privacy.enabled else None,
        "specialists": hive.purity(choices, kinds, server.k) if choices else [],
        "evaluated_choices": "per device at the last evaluation" if choices else
                             "not shown to the server (secure aggregation)",
        "train_counts_per_round": per_round,
        "train_counts_total": [sum(r[j] for r in per_round) for j in range(server.k)],
        "upload_adapters_per_device": server.k if config.secagg.enabled else 1,
        "adapter_bytes": one_adapter,
    }
