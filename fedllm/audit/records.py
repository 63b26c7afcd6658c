"""`fedllm audit`: decide from the files alone whether every epsilon claim holds.

Nothing here trusts the code that trained: epsilon is recomputed from each report's
recorded mechanism with Google's dp-accounting (PLD, and RDP as a second opinion), not
with Opacus; the ledger's hash chain is re-derived; and the rounds and steps a client
says it was charged for are compared with what the server recorded independently in
`metrics.jsonl`. Every check yields a `Finding` naming the client, the check and the
field, so a failure says exactly what to look at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm.audit import chain, trust
from fedllm.audit.evidence import (Audit, Checker, ClientEpsilon, ServerRecord, read_json, recompute_epsilon,
                                   server_records, type_ok)
from fedllm.audit.user import check_user_level
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir
from fedllm.state import safe_name

CHECKS = ("fields", "versions", "privacy-unit", "sampling", "chain", "delta", "epsilon-pld", "epsilon-rdp",
          "target", "rounds", "device-ledger", "signature", "records", "select")
RUN_CHECKS = ("fields", "summary", "target", "ledger-restart")  # of the run as a whole: privacy/summary.json against the reports
REQUIRED = {
    "client_id": str, "num_records": int, "delta": float, "target_epsilon": float, "noise_multiplier": float,
    "sample_rate": float, "max_grad_norm": float, "planned_steps": int, "accountant": str, "sampling": str,
    "privacy_unit": str, "versions": dict, "history": list, "genesis": str, "head": str, "epsilon": float,
    "ledger_version": int,
}
VERSIONED = ("fedllm", "opacus", "torch", "dp-accounting")


def check_report(audit: Audit, report: Any, name: str, config: Mapping[str, Any] | None = None,
                 server: ServerRecord | None = None, run_id: str = "",
                 key: tuple[str | None, str] | None = None) -> None:
    """All per-client checks on one report (or ledger file) `report`, found under `name`;
    `key`: the trusted public key to verify a report's signature with, and its source."""
    client = report.get("client_id", name) if isinstance(report, dict) else name
    check = Checker(audit, str(client))
    if not isinstance(report, dict):
        check("fields", False, name, "not a JSON object")
        return
    bad = [k for k, kind in REQUIRED.items() if not type_ok(report.get(k), kind)]
    is_ledger = "epsilon" not in report  # a device's ledger file carries no claim
    if is_ledger:
        bad = [k for k in bad if k != "epsilon"]
    entry_bad = [f"history[{i}]" for i, e in enumerate(report.get("history") or [])
                 if not isinstance(e, dict) or not all(
                     type_ok(e.get(k), t) for k, t in (("round", int), ("steps", int), ("noise_multiplier", float),
                                                        ("sample_rate", float)))]
    if not check("fields", not bad and not entry_bad, ", ".join(bad + entry_bad),
                 "missing or of the wrong type"):
        return  # nothing below can be computed reliably
    history = report["history"]
    versions = report["versions"]
    missing = [v for v in VERSIONED if versions.get(v) in (None, "", "not installed")]
    check("versions", not missing, "versions", f"no version recorded for {', '.join(missing)}")
    check("privacy-unit", bool(report["privacy_unit"].strip()), "privacy_unit", "empty")

    # Sampling: Poisson, one rate from the header or from the last record-count change
    # (a zero-step "records" entry), and the rate the loader uses for this many records.
    sampling_problems = []
    if report["sampling"] != "poisson":
        sampling_problems.append(("sampling", f"{report['sampling']!r}; the accounting assumes 'poisson'"))
    rate, changed = float(report["sample_rate"]), []
    for i, e in enumerate(history):
        if e.get("kind") == "select":  # a hive's choice: one unsampled Gaussian release, whatever the rate in force
            if float(e["sample_rate"]) != 1.0 or int(e["steps"]) != 1:
                changed.append(f"history[{i}] is a specialist choice at rate {e['sample_rate']} over {e['steps']} "
                               "steps; a choice is one release at rate 1")
        elif e.get("kind") == "records":
            if int(e["steps"]) != 0:
                changed.append(f"history[{i}] is a record-count change with {e['steps']} steps")
            rate = float(e["sample_rate"])
        elif float(e["sample_rate"]) != rate:
            changed.append(f"history[{i}] charges rate {e['sample_rate']}, not the {rate} in force")
    if changed:
        sampling_problems.append(("history[].sample_rate", "; ".join(changed[:3])))
    if config and "train.batch-size" in config:
        n, b = report["num_records"], int(config["train.batch-size"])
        expected = 1.0 / -(-n // min(b, n))
        if abs(report["sample_rate"] - expected) > 1e-12:
            sampling_problems.append(("sample_rate", f"{report['sample_rate']} but {n} records in batches of {b} "
                                                     f"are sampled at {expected}"))
    check("sampling", not sampling_problems, "; ".join(f for f, _ in sampling_problems),
          "; ".join(m for _, m in sampling_problems))

    broken = chain.problems(report)
    check("chain", not broken, ", ".join(f for f, _ in broken), "; ".join(f"{f} {m}" for f, m in broken))
    if is_ledger:
        check("signature", None, "", "a device's own ledger file: its reports are what it signs")
    else:
        trust.check_signature(check, report, *(key or (None, "")))
    batch = int(config["train.batch-size"]) if config and type(config.get("train.batch-size")) is int else None
    trust.check_records(check, report, batch, server.declared if server is not None else None, run_id)
    trust.check_selects(check, report, server, run_id)

    delta, n = report["delta"], report["num_records"]
    check("delta", 0 < delta < 1.0 / n, "delta", f"{delta} is not below 1/n = {1.0 / n:.4g} ({n} records)")

    tol = audit.tolerance
    pld = recompute_epsilon(history, delta, "pld")
    rdp = recompute_epsilon(history, delta, "rdp")
    claimed = None if is_ledger else float(report["epsilon"])
    if claimed is None:
        check("epsilon-pld", None, "epsilon", "a ledger file makes no claim; recomputed only")
    else:
        check("epsilon-pld", abs(claimed - pld) <= max(tol * pld, 1e-3), "epsilon",
              f"claims {claimed:.4f}, dp-accounting PLD recomputes {pld:.4f} from the history "
              f"(tolerance {tol:.1%})")
    worst = max(pld, claimed or 0.0)
    check("epsilon-rdp", worst <= rdp * (1 + tol) + 1e-9, "epsilon",
          f"{worst:.4f} is above dp-accounting's RDP upper bound {rdp:.4f}: the accountants disagree")
    target = report["target_epsilon"]
    over = []
    if claimed is not None and claimed > target * (1 + 1e-9):  # the client itself must never exceed it
        over.append("epsilon")
    if pld > target * (1 + tol):  # nor may the independent recomputation, beyond accountant disagreement
        over.append("history")
    check("target", not over, ", ".join(over),
          f"target {target} exceeded: claimed {claimed}, recomputed {pld:.4f}")

    audit.epsilons[str(client)] = ClientEpsilon(claimed, pld, rdp, target, _by_round(history, delta))

    if server is None:
        check("rounds", None, "", "no server record (metrics.jsonl) to compare with")
    else:
        _check_rounds(check, history, server, config or {}, run_id)


def _by_round(history: list[Mapping[str, Any]], delta: float) -> list[tuple[int, float]]:
    """PLD epsilon after each entry, in ledger order (rounds repeat across runs; order does not)."""
    return [(int(e["round"]), recompute_epsilon(history[: i + 1], delta, "pld")) for i, e in enumerate(history)]


def _check_rounds(check: Checker, history: list[Mapping[str, Any]], server: ServerRecord,
                  config: Mapping[str, Any], run_id: str) -> None:
    """The ledger's charges for this run against the rounds the server saw the client in."""
    mine = [(i, e) for i, e in enumerate(history) if e.get("run", "") == run_id]
    train = {int(e["round"]): (i, int(e["steps"])) for i, e in mine if e.get("kind", "train") == "train"}
    # personal.every-round: a personal charge right after a round's train charge is that round's
    # personal update (not an evaluation's personalisation), bounded by the train round itself
    every_round = config.get("personal.every-round") in (True, "true")
    after_train = {k for (j, e), (k, f) in zip(mine, mine[1:]) if every_round and k == j + 1
                   and e.get("kind", "train") == "train" and f.get("kind") == "personal" and e["round"] == f["round"]}
    personal = {(int(e["round"]), e.get("kind")): (i, int(e["steps"])) for i, e in mine
                if e.get("kind") in ("personal", "local-only") and i not in after_train}
    local_steps, personal_steps = config.get("local-steps"), config.get("personal.steps")
    problems: list[tuple[str, str]] = []
    # hive: a choice is charged right before the train charge of its round, or at most twice per
    # run in evaluations: once for a device with no choice of its own, once after the last round
    with_train = {j for (j, e), (_, f) in zip(mine, mine[1:]) if e.get("kind") == "select"
                  and f.get("kind", "train") == "train" and e["round"] == f["round"]}
    alone = [j for j, e in mine if e.get("kind") == "select" and j not in with_train]
    if len(alone) > 2:
        problems.append((f"history[{alone[2]}]", f"{len(alone)} specialist choices outside training rounds in one run; "
                                                 "a device makes at most two (its first, and after the last round)"))
    for r, reported in sorted(server.accepted.items()):
        if r not in train:
            problems.append(("history", f"the server accepted this client's update in round {r}, but no train "
                                        "charge for that round is in the history"))
            continue
        i, steps = train[r]
        for source, expected in (("the server's metrics", reported), ("config local-steps", local_steps)):
            if expected is not None and steps != int(expected):
                problems.append((f"history[{i}].steps", f"{steps} steps charged in round {r}, {source} say {expected}"))
    for r, (i, _) in sorted(train.items()):
        if r in server.declined:
            problems.append((f"history[{i}]", f"charged in round {r}, in which the server recorded a decline"))
        elif r not in server.sampled and r not in server.accepted and r not in server.dropped:
            problems.append((f"history[{i}]", f"charged in round {r}, in which the server never sampled this client"))
    for r, charged in sorted(server.personalised.items()):
        for kind in ("personal", "local-only"):
            got = personal.get((r, kind))
            if charged and got is None:
                problems.append(("history", f"the client reported {kind} training after round {r}, but no {kind} "
                                            "charge for it is in the history"))
            elif charged and personal_steps is not None and got[1] != int(personal_steps):
                problems.append((f"history[{got[0]}].steps", f"{got[1]} {kind} steps charged, config "
                                                             f"personal.steps says {personal_steps}"))
            elif not charged and got is not None:
                problems.append((f"history[{got[0]}]", f"{kind} steps charged in round {r}, for which the client "
                                                       "reported it declined personalisation"))
    for (r, kind), (i, _) in sorted(personal.items()):
        if r not in server.personalised:
            problems.append((f"history[{i}]", f"{kind} steps charged in round {r}, for which the server has no "
                                              "personalised evaluation"))
    check("rounds", not problems, "; ".join(dict.fromkeys(f for f, _ in problems)), "; ".join(m for _, m in problems))


def _check_device(audit: Audit, report: Mapping[str, Any], ledger_path: Path) -> None:
    """The device's own ledger must extend the chain the server was shown."""
    check = Checker(audit, str(report["client_id"]))
    if not ledger_path.exists():
        check("device-ledger", None, "", f"no device ledger at {ledger_path}")
        return
    ledger, why = read_json(ledger_path)
    if ledger is None:
        check("device-ledger", False, str(ledger_path), why)
        return
    broken = chain.problems(ledger)
    if broken:
        check("device-ledger", False, ", ".join(f for f, _ in broken),
              f"{ledger_path}: " + "; ".join(f"{f} {m}" for f, m in broken))
        return
    hashes = [e["hash"] for e in ledger["history"]]
    head = report["head"]
    ok = ledger["genesis"] == report["genesis"] and (head == ledger["genesis"] or head in hashes)
    check("device-ledger", ok, "head",
          f"{ledger_path} does not contain the chain the server was shown (its head {head[:12]}...): "
          "entries were removed or rewritten on the device")


def _run_checks(audit: Audit, run: RunDir, reports: dict[str, dict], config: Mapping[str, Any]) -> None:
    check = Checker(audit, "run")
    summary, why = read_json(run.privacy_summary_file)
    if summary is None:
        check("fields", False, "privacy/summary.json", why)
        return
    check("fields", True)
    claims = sorted(r["epsilon"] for r in reports.values() if isinstance(r.get("epsilon"), (int, float)))
    eps = summary.get("epsilon") or {}
    agree = bool(claims) and math.isclose(eps.get("max", -1), claims[-1], rel_tol=1e-9) and math.isclose(
        eps.get("min", -1), claims[0], rel_tol=1e-9) and summary.get("clients_reporting") == len(reports)
    check("summary", agree, "privacy/summary.json:epsilon",
          f"summary says {eps} over {summary.get('clients_reporting')} clients; the reports say "
          f"min {claims[0] if claims else None}, max {claims[-1] if claims else None} over {len(reports)}")
    target = config.get("privacy.target-epsilon")
    mismatched = sorted(c for c, r in reports.items() if target is not None and r.get("target_epsilon") != target)
    check("target", not mismatched and not summary.get("over_target"), "target_epsilon",
          f"over target: {summary.get('over_target')}; target differs from config's {target}: {mismatched[:5]}")
    restarted = summary.get("restarted_ledgers") or {}
    check("ledger-restart", not restarted, "privacy/summary.json:restarted_ledgers",
          f"ledgers that started over during the run (their earlier spending is not in the reports): "
          f"{sorted(restarted)[:5]}")


def audit_path(path: Path | str, tolerance: float = 0.01, state_dir: Path | str | None = None,
               keys: Mapping[str, str] | None = None) -> Audit:
    """Audit a run directory (its `privacy/clients/*.json`, against `metrics.jsonl`, and
    the devices' ledgers when their state store is at hand) or a state store
    (`*/ledger.json`) or one ledger file."""
    path = Path(path)
    if not path.exists():
        raise FedllmError(f"{path} does not exist; give a run directory or a client state store")
    run = RunDir.existing(path) if path.is_dir() else None
    if run is not None and (run.client_reports_dir.is_dir() or run.user_level_file.is_file()):
        return _audit_run(run, tolerance, state_dir, keys)
    ledgers = [path] if path.is_file() else sorted(path.glob("*/ledger.json")) or sorted(path.glob("ledger.json"))
    if not ledgers:
        config, _ = read_json(run.config_file) if run is not None else (None, "")
        if isinstance(config, dict) and config.get("privacy.enabled") is False:
            raise FedllmError(f"{path} is a run without differential privacy (privacy.enabled=false): "
                              "it makes no epsilon claim to audit")
        raise FedllmError(f"{path} has neither privacy/clients/*.json (a private run's directory) nor "
                          "*/ledger.json (a state store); give one of those")
    audit = Audit(path, "state store", tolerance)
    for ledger_path in ledgers:
        ledger, why = read_json(ledger_path)
        if ledger is None:
            Checker(audit, ledger_path.parent.name)("fields", False, str(ledger_path), why)
            continue
        check_report(audit, ledger, ledger_path.parent.name)
    return audit


def _audit_run(run: RunDir, tolerance: float, state_dir: Path | str | None,
               keys: Mapping[str, str] | None = None) -> Audit:
    audit = Audit(run.path, "run", tolerance)
    config, _ = read_json(run.config_file)
    config = config if isinstance(config, dict) else {}
    run_id, servers = "", None
    if run.metrics_file.exists():
        try:
            run_id, servers = server_records(run)
        except (FedllmError, ValueError, KeyError, TypeError, AttributeError) as exc:
            Checker(audit, "run")("fields", False, "metrics.jsonl", f"unreadable ({exc!r}); rounds not checked")
    if state_dir is None:
        state_dir = config.get("privacy.state-dir") or run.path / "clients"
    reports: dict[str, dict] = {}
    for report_path in run.client_report_files():
        report, why = read_json(report_path)
        if report is None:
            Checker(audit, report_path.stem)("fields", False, f"privacy/clients/{report_path.name}", why)
            continue
        server = servers.get(report.get("client_id"), ServerRecord()) if servers is not None else None
        client = str(report.get("client_id", report_path.stem)) if isinstance(report, dict) else report_path.stem
        try:
            store = Path(state_dir) / safe_name(client)
        except FedllmError:
            store = None
        check_report(audit, report, report_path.stem, config, server, run_id, trust.trusted_key(client, keys, store))
        if isinstance(report, dict) and audit.status(str(report.get("client_id")), "fields") == "pass":
            reports[report["client_id"]] = report
            _check_device(audit, report, Path(state_dir) / safe_name(report["client_id"]) / "ledger.json")
    if servers is not None and config.get("privacy.enabled", True):  # accepted under DP: must have reported
        for client, record in sorted(servers.items()):
            if record.accepted and client not in reports and client not in audit.clients:
                Checker(audit, client)("fields", False, f"privacy/clients/{safe_name(client)}.json",
                                        f"missing: the server accepted updates in rounds {sorted(record.accepted)}")
    if run.client_reports_dir.is_dir():
        _run_checks(audit, run, reports, config)
    if run.user_level_file.is_file():
        check_user_level(audit, run, config)
    return audit
