"""The run directory: one folder per run that holds everything it produced.

    config.json          resolved configuration (flat dotted keys)
    metrics.jsonl        one object per round (round 0: the base, before training)
    summary.json         final figures (base vs global, upload bytes, ...)
    checkpoints/round-N  global adapter after round N (round-0: the initial one), a PEFT adapter directory,
                         with what a restarted server resumes from (global.safetensors, strategy.pkl,
                         server-state.json); checkpoints/latest.json names the last completed round
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedllm import atomic
from fedllm.config import Config


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    def checkpoint(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round}"

    def write_config(self, config: Config) -> None:
        atomic.write_json(self.path / "config.json", config.to_flat())

    def append_metrics(self, record: dict[str, Any]) -> None:
        atomic.append_line(self.metrics_file, record)

    def keep_metrics_through(self, server_round: int) -> None:
        """Drop metrics lines of rounds after `server_round` (a resumed run redoes them)."""
        kept = [m for m in self.metrics() if int(m["round"]) <= server_round]
        atomic.write_bytes(self.metrics_file, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_json(self.summary_file, summary)

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text())
