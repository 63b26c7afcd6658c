"""The user-level half of `fedllm audit`: `privacy/user_level.json` against the run.

The claim is recomputed with dp-accounting from the mechanism the file records (R
rounds of a Gaussian with std `noise_multiplier * clip` on a sum of sensitivity `clip`,
Poisson-subsampled at `sample_rate`, or not at all when `sample_rate` is 1); the rounds
and the noise actually added are compared with the server's `metrics.jsonl`, and the
sampling claim with the run's config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUBJECT = "user-level"
USER_CHECKS = ("fields", "sampling", "delta", "rounds", "noise", "epsilon-pld", "epsilon-rdp", "target")
USER_REQUIRED = {"noise_multiplier": float, "clip": float, "sampling": str, "sample_rate": float, "population": int,
                 "denominator": float, "delta": float, "rounds": int, "mechanism": str, "privacy_unit": str,
                 "noise_std": float}


def _train_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, filter(str.strip, lines)) if "train" in m]


def check_user_level(audit, run_dir: Path, config: Mapping[str, Any]) -> None:
    from fedllm.privacy.audit import ClientEpsilon, _Checker, _read_json, _recompute, _type_ok

    check = _Checker(audit, SUBJECT)
    report, why = _read_json(run_dir / "privacy" / "user_level.json")
    if not isinstance(report, dict):
        check("fields", False, "privacy/user_level.json", why or "not a JSON object")
        return
    bad = [k for k, kind in USER_REQUIRED.items() if not _type_ok(report.get(k), kind)]
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

    try:
        train = _train_records(run_dir)
    except (OSError, ValueError) as exc:
        check("rounds", False, "metrics.jsonl", f"unreadable: {exc!r}")
        train = None
    if train is not None:
        check("rounds", rounds == len(train), "rounds",
              f"the report composes {rounds} rounds; metrics.jsonl records {len(train)}")
        off = [m["round"] for m in train if not math.isclose(
            (m["train"].get("user_dp") or {}).get("noise_std", -1.0), sigma * clip, rel_tol=1e-9)]
        check("noise", math.isclose(report["noise_std"], sigma * clip, rel_tol=1e-9) and not off, "noise_std",
              f"noise std should be noise_multiplier * clip = {sigma * clip:g}; rounds that added other noise "
              f"(or none recorded): {off[:10]}")

    claimed = report.get("epsilon")
    if sigma == 0:
        check("epsilon-pld", claimed is None, "epsilon", f"no noise, so no finite epsilon; the report claims {claimed}")
        check("epsilon-rdp", None)
        check("target", None)
        return
    pld = _recompute(((float(sigma), float(q), int(rounds)),), float(delta), "pld")
    rdp = _recompute(((float(sigma), float(q), int(rounds)),), float(delta), "rdp")
    audit.user_level = ClientEpsilon(claimed, pld, rdp, report.get("target_epsilon") or None)
    ok = isinstance(claimed, (int, float)) and abs(claimed - pld) <= audit.tolerance * max(pld, 1e-12)
    check("epsilon-pld", ok, "epsilon", f"claims {claimed}, dp-accounting PLD gives {pld:.4f}")
    check("epsilon-rdp", ok and rdp >= claimed * (1 - audit.tolerance), "epsilon",
          f"claims {claimed}, above the RDP upper bound {rdp:.4f}")
    target = report.get("target_epsilon") or 0.0
    check("target", None if not target else pld <= target * (1 + audit.tolerance), "target_epsilon",
          f"dp-accounting gives {pld:.4f}, over the target {target}")
