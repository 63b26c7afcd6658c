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
