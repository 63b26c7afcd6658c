"""The run directory: one folder per run that holds everything it produced. This module
is its only reader and writer; servers, plots, the audit and tools go through `RunDir`.

    config.json          resolved configuration (flat dotted keys)
    metrics.jsonl        one object per round (round 0: the base, before training)
    summary.json         final figures (base vs global, upload bytes, ...), with `format`
    summary.txt          the same, as the table `fedllm simulate` prints; plots beside it
    personalisation.csv  per client: base, local-only, global and personalised perplexity
    privacy/clients/*.json   each client's latest epsilon report (its whole ledger history)
    privacy/summary.json     the record-level summary over those reports
    privacy/user_level.json  the user-level claim, when user-level DP is on
    checkpoints/round-N  global adapter after round N (round-0: the initial one), a PEFT adapter directory,
                         with what a restarted server resumes from (global.safetensors, strategy.safetensors
                         and strategy.json: data only, never a pickle; server-state.json);
                         checkpoints/latest.json names the last completed round
    server-error.txt     why the server stopped, when it stopped on an error (one line)
    simulation.log       `fedllm simulate` only: everything Flower, Ray and the apps printed
    .flwr/               `fedllm simulate` only: the generated Flower app and the `flwr` CLI's connection
    proxy/               `fedllm server` only: nginx's config and logs
    .lock                the pid of the simulation or server working in it (one at a time)

How the format may change (auditors and plots read old run directories): a file or field
is never removed and never changes meaning; a new one is added. A change that cannot be
made so raises `FORMAT` (written in summary.json) and adds a reader for the new format
beside the old one. Readers take a missing field as its default in the format that
introduced it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedllm import atomic
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.state import safe_name

FORMAT = 1  # summary.json `format`: the version of this layout


@contextmanager
def in_use_refused(folder: Path, what: str, flag: str) -> Iterator[Path]:
    """Work in `folder` alone (`atomic.exclusive`); a second process is refused with who
    holds it and what to do, before it reads or charges anything."""
    try:
        with atomic.exclusive(folder) as held:
            yield held
    except atomic.InUse as busy:
        raise FedllmError(f"{busy.folder} is in use by another {what} (process {busy.holder}): wait for it to end "
                          f"or stop it, or give another {flag}") from None


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def flwr_run_dir(run_id: int) -> Path:
    """The run directory of a `flwr run` without `run-dir`: both apps derive it from the
    run id, so simulated devices find their state stores without taking a path from the server."""
    return Path("runs") / f"flwr-{run_id}"


class RunDir:
    def __init__(self, path: Path | str, create: bool = True):
        self.path = Path(path)
        if create:
            atomic.private_dir(self.path)

    @classmethod
    def existing(cls, path: Path | str) -> "RunDir":
        """A run directory to read (an audit, a plot): nothing is created."""
        return cls(path, create=False)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def summary_text_file(self) -> Path:
        return self.path / "summary.txt"

    def plot_file(self, name: str) -> Path:
        """A figure beside the summary (metrics.png, personalisation.png)."""
        return self.path / f"{name}.png"

    def checkpoint(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round}"

    def global_file(self, server_round: int) -> Path:
        """The global adapter after `server_round` as plain tensors (what a restart reloads)."""
        return self.checkpoint(server_round) / "global.safetensors"

    def server_state_file(self, server_round: int) -> Path:
        return self.checkpoint(server_round) / "server-state.json"

    @property
    def error_file(self) -> Path:
        """server-error.txt: why the server stopped, for whoever started it (one line, no traceback)."""
        return self.path / "server-error.txt"

    def server_error(self) -> str:
        """The reason the server stopped on an error, or "" (the file is the server's, one line)."""
        return self.error_file.read_text(errors="replace").strip()[:2000] if self.error_file.exists() else ""

    @property
    def log_file(self) -> Path:
        return self.path / "simulation.log"

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def privacy_dir(self) -> Path:
        return self.path / "privacy"

    @property
    def client_reports_dir(self) -> Path:
        return self.privacy_dir / "clients"

    @property
    def privacy_summary_file(self) -> Path:
        return self.privacy_dir / "summary.json"

    @property
    def user_level_file(self) -> Path:
        return self.privacy_dir / "user_level.json"

    @property
    def personalisation_file(self) -> Path:
        return self.path / "personalisation.csv"

    @property
    def latest_file(self) -> Path:
        """checkpoints/latest.json: the last round whose checkpoint and metrics line are complete."""
        return self.path / "checkpoints" / "latest.json"

    def write_config(self, config: Config) -> None:
        atomic.write_json(self.config_file, config.to_flat())

    def write_client_report(self, client_id: str, report: dict[str, Any]) -> Path:
        path = self.client_reports_dir / f"{safe_name(client_id)}.json"
        atomic.write_json(path, report)
        return path

    def client_report_files(self) -> list[Path]:
        return sorted(self.client_reports_dir.glob("*.json"))

    def write_privacy_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_json(self.privacy_summary_file, summary)

    def write_user_level(self, report: dict[str, Any]) -> None:
        atomic.write_json(self.user_level_file, report)

    def write_personalisation(self, rows: list[dict[str, Any]]) -> None:
        """personalisation.csv, one row per client (columns in the order given)."""
        if not rows:
            return
        columns = list(rows[0])
        lines = [",".join(columns)] + [",".join(_cell(row[c]) for c in columns) for row in rows]
        atomic.write_bytes(self.personalisation_file, ("\n".join(lines) + "\n").encode())

    def personalisation_rows(self) -> list[dict[str, str]]:
        """personalisation.csv's rows ([] when personalisation did not run)."""
        import csv

        if not self.personalisation_file.exists():
            return []
        with self.personalisation_file.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def write_summary_text(self, text: str) -> Path:
        atomic.write_bytes(self.summary_text_file, (text + "\n").encode())
        return self.summary_text_file

    def mark_complete(self, server_round: int) -> None:
        atomic.write_json(self.latest_file, {"round": server_round})

    def append_metrics(self, record: dict[str, Any]) -> None:
        atomic.append_line(self.metrics_file, record)

    def keep_metrics_through(self, server_round: int) -> None:
        """Drop metrics lines of rounds after `server_round` (a resumed run redoes them)."""
        kept = [m for m in self.metrics() if int(m["round"]) <= server_round]
        atomic.write_bytes(self.metrics_file, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_json(self.summary_file, {"format": FORMAT, **summary})

    def new_metrics(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The round records whole lines after byte `offset` hold, and the offset after
        them: a follower of a running server never sees a line half-written. A file shorter
        than `offset` was rewritten (a resumed run drops the rounds it redoes): read it again."""
        if not self.metrics_file.exists():
            return [], offset
        if self.metrics_file.stat().st_size < offset:
            offset = 0
        with open(self.metrics_file, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        # a bad line is the server's own reader's to report (`metrics`); a follower only shows progress
        records = [r for line in complete.decode(errors="replace").splitlines() if (r := _round_record(line))]
        return records, offset + len(complete)

    def metrics(self) -> list[dict[str, Any]]:
        """Every round's record. A torn last line (a crash mid-write) is dropped with a
        warning; a bad line before it is an error naming the line."""
        if not self.metrics_file.exists():
            return []
        lines = [(i, line) for i, line in enumerate(self.metrics_file.read_text(errors="replace").splitlines(), 1)
                 if line.strip()]
        records = []
        for n, (number, line) in enumerate(lines):
            record = _round_record(line)
            if record is None:
                if n == len(lines) - 1:
                    logging.getLogger("fedllm").warning("%s: line %d is torn (a crash while writing?); dropped",
                                                        self.metrics_file, number)
                    break
                raise FedllmError(f"{self.metrics_file}: line {number} is not a round record; restore the file "
                                  "from a backup, or remove that line and those after it")
            records.append(record)
        return records

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text())


def _round_record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a round record, or None when it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("round"), int) else None


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else str(value)
