"""The user-level half of `fedllm audit`: `privacy/user_level.json` against the run.

The claim is recomputed with dp-accounting from the mechanism the file records (R
rounds of a Gaussian with std `noise_multiplier * clip` on a sum of sensitivity `clip`,
Poisson-subsampled at `sample_rate`, or not at all when `sample_rate` is 1); the rounds
and the noise actually added are compared with the server's `metrics.jsonl`, and the
sampling claim with the run's config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedllm.audit.evidence import Audit, Checker, ClientEpsilon, read_json, recompute_epsilon, type_ok
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir

SUBJECT = "user-level"
USER_CHECKS = ("fields", "sampling", "delta", "rounds", "noise", "epsilon-pld", "epsilon-rdp", "target")
USER_REQUIRED = {"noise_multiplier": float, "clip": float, "sampling": str, "sample_rate": float, "population": int,
                 "denominator": float, "delta": float, "rounds": int, "mechanism": str, "privacy_unit": str,
                 "noise_std": float}


def _rounds_history(report: Mapping[str, Any], check: Checker) -> list[Mapping[str, Any]]:
    """The report's rounds as events of the record-level schema (one Poisson-sampled
    Gaussian per round, `kind` "user-round"), checked against its mechanism; a report
    written before `history` existed is expanded from (sigma, q, rounds)."""
    sigma, q, rounds = report["noise_multiplier"], report["sample_rate"], report["rounds"]
    history = report.get("history")
    if history is None:
        return [{"round": r, "noise_multiplier": sigma, "sample_rate": q, "steps": 1, "kind": "user-round"}
                for r in range(1, rounds + 1)]
    ok = isinstance(history, list) and len(history) == rounds and all(
        isinstance(e, Mapping) and type_ok(e.get("noise_multiplier"), float) and type_ok(e.get("sample_rate"), float)
        and e.get("steps") == 1 and e.get("kind") == "user-round" and math.isclose(e["noise_multiplier"], sigma)
        and math.isclose(e["sample_rate"], q) for e in history)
    check("fields", ok, "history", f"history should hold {rounds} user-round events of noise_multiplier {sigma} "
                                   f"and sample_rate {q}, one step each")
    return history if ok else []


def check_user_level(audit: Audit, run: RunDir, config: Mapping[str, Any]) -> None:
    check = Checker(audit, SUBJECT)
    report, why = read_json(run.user_level_file)
    if not isinstance(report, dict):
        check("fields", False, "privacy/user_level.json", why or "not a JSON object")
        return
    bad = [k for k, kind in USER_REQUIRED.items() if not type_ok(report.get(k), kind)]
    if not check("fields", not bad, ",".join(bad), f"missing or mistyped: {bad}"):
        return
    sigma, clip, q, rounds = report["noise_multiplier"], report["clip"], report["sample_rate"], report["rounds"]
    delta, population = report["delta"], report["population"]

    k = min(int(config.get("clients-per-round", 0)), population)
    if report["sampling"] == "poisson":
        expected, note = k / population, f"Poisson at clients-per-round/population = {k}/{population}"
    else:
        expected, note = 1.0, "no amplification may be claimed without Poisson participation"
    check("sampling", report["sampling"] in ("poisson", "fixed") and math.isclose(q, expected, rel_tol=1e-9)
          and math.isclose(report["denominator"], k, rel_tol=1e-9), "sample_rate",
          f"{report['sampling']} sampling claims sample_rate {q} and denominator {report['denominator']}; "
          f"expected {expected} ({note}) and {k}")
    check("delta", delta < 1.0 / population, "delta", f"delta {delta} is not below 1/{population} clients")

    cohort = report.get("noise_cohort_size") or 0  # a simulation of a larger cohort: less noise on this sum
    if not (isinstance(cohort, int) and not isinstance(cohort, bool) and cohort >= 0):
        check("fields", False, "noise_cohort_size", f"not a count: {cohort!r}")
        cohort = 0
    scale = report["denominator"] / cohort if cohort else 1.0
    scaled = f" * {report['denominator']:g}/{cohort}" if cohort else ""
    try:
        train = [m for m in run.metrics() if "train" in m]
    except (OSError, FedllmError) as exc:
        check("rounds", False, "metrics.jsonl", f"unreadable: {exc!r}")
        train = None
    if train is not None:
        check("rounds", rounds == len(train), "rounds",
              f"the report composes {rounds} rounds; metrics.jsonl records {len(train)}")
        std = sigma * clip * scale
        off = [m["round"] for m in train if not math.isclose(
            (m["train"].get("user_dp") or {}).get("noise_std", -1.0), std, rel_tol=1e-9)]
        check("noise", math.isclose(report["noise_std"], std, rel_tol=1e-9) and not off, "noise_std",
              f"noise std should be noise_multiplier * clip{scaled} = {std:g}; rounds that added other noise "
              f"(or none recorded): {off[:10]}")

    claimed = report.get("epsilon")
    if sigma == 0:
        check("epsilon-pld", claimed is None, "epsilon", f"no noise, so no finite epsilon; the report claims {claimed}")
        check("epsilon-rdp", None)
        check("target", None)
        return
    history = _rounds_history(report, check)  # one recomputation for both claims: the same events
    pld = recompute_epsilon(history, float(delta), "pld")
    rdp = recompute_epsilon(history, float(delta), "rdp")
    audit.user_level = ClientEpsilon(claimed, pld, rdp, report.get("target_epsilon") or None)
    ok = isinstance(claimed, (int, float)) and abs(claimed - pld) <= audit.tolerance * max(pld, 1e-12)
    check("epsilon-pld", ok, "epsilon", f"claims {claimed}, dp-accounting PLD gives {pld:.4f}")
    check("epsilon-rdp", ok and rdp >= claimed * (1 - audit.tolerance), "epsilon",
          f"claims {claimed}, above the RDP upper bound {rdp:.4f}")
    target = report.get("target_epsilon") or 0.0
    check("target", None if not target else pld <= target * (1 + audit.tolerance), "target_epsilon",
          f"dp-accounting gives {pld:.4f}, over the target {target}")
