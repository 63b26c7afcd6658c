"""What the server keeps of what clients said: epsilon reports, declines, rejected replies,
upload sizes, and each ledger's genesis (a ledger that starts over is flagged, not trusted).

Every report stored here passed `server.validation` first; the files go through `RunDir`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedllm import atomic
from fedllm.privacy.report import summarize
from fedllm.rundir import RunDir
from fedllm.untrusted import MAX_TEXT, say
from server.resume import read_genesis_registry

log = logging.getLogger("fedllm.server")


class Books:
    def __init__(self, run: RunDir, registry: Path | None = None):
        self.run, self.registry = run, registry
        self.reports: dict[str, dict[str, Any]] = {}
        self.declined: dict[str, list[int]] = {}
        self.rejected = 0
        self.upload: list[int] = []
        self.small_cohort_rounds: list[int] = []
        self.genesis: dict[str, str] = {}  # client -> its ledger's genesis hash, as first seen
        self.restarted_ledgers: dict[str, list[str]] = {}
        if registry is not None and registry.exists():
            self.genesis = read_genesis_registry(registry)

    def record_privacy(self, client_id: str, report: dict[str, Any]) -> None:
        """Keep the client's latest epsilon report (it carries its whole history); a ledger
        whose genesis differs from the one this server saw before started over: flag it."""
        known = self.genesis.setdefault(client_id, report["genesis"])
        if known != report["genesis"]:
            log.warning("client %s: its ledger started over (genesis %s..., first seen %s...); its spending before "
                        "is no longer in its reports", say(client_id), report["genesis"][:12], known[:12])
            self.restarted_ledgers.setdefault(client_id, []).append(report["genesis"])
            self.genesis[client_id] = report["genesis"]
        self.reports[client_id] = report
        self.run.write_client_report(client_id, report)

    def book(self, server_round: int, client: str, declined: str, report: dict[str, Any] | None,
             round_declines: list) -> None:
        """Book what a checked reply says about its sender: its report (stored under the
        node's discovered id only) and its decline."""
        if report is not None and client != "?":
            self.record_privacy(client, report)
        if declined:
            log.info("round %d: client %s %s", server_round, say(client), say(declined, 300))
            round_declines.append({"client_id": client, "reason": declined[:MAX_TEXT]})
            self.declined.setdefault(client, []).append(server_round)

    def privacy_summary(self, enabled: bool, run_id: str) -> dict[str, Any]:
        summary = {"enabled": enabled, "run_id": run_id, **summarize(self.reports, self.declined),
                   "restarted_ledgers": self.restarted_ledgers}
        self.run.write_privacy_summary(summary)
        return summary

    def state(self) -> dict[str, Any]:
        """What a restarted server reloads (server-state.json)."""
        return {"declined": self.declined, "rejected": self.rejected, "upload": self.upload,
                "small_cohort_rounds": self.small_cohort_rounds, "genesis": self.genesis}

    def restore(self, state: dict[str, Any], reports: dict[str, dict[str, Any]]) -> None:
        self.declined, self.rejected, self.upload = state["declined"], state["rejected"], state["upload"]
        self.small_cohort_rounds = state.get("small_cohort_rounds", [])
        self.genesis = {**self.genesis, **dict(state.get("genesis", {}))}
        self.reports.update(reports)

    def save_registry(self) -> None:
        if self.registry is not None:
            atomic.write_json(self.registry, self.genesis)
