"""The fedllm ServerApp (the `serverapp` component): `flwr run .`, `fedllm server` and
`fedllm simulate` all enter through `app`; the run itself is `server.round_loop.Server`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm import atomic
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.plots import finish, format_summary
from fedllm.rundir import RunDir, flwr_run_dir
from server.round_loop import Server

log = logging.getLogger("fedllm.server")


def run_server(grid: Grid, config: Config, run_dir: Path) -> dict:
    """The whole run; a FedllmError stops it with its reason in server-error.txt."""
    RunDir(run_dir).error_file.unlink(missing_ok=True)
    try:
        summary = Server(grid, config, run_dir).run_all()
    except FedllmError as exc:
        atomic.write_bytes(RunDir(run_dir).error_file, f"{exc}\n".encode())
        log.error("%s", exc)
        raise
    finish(run_dir, format_summary(summary))  # summary.txt and plots, as in every run directory
    return summary


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The run's config is Flower's run config, under `flwr run`, `fedllm simulate` and `fedllm server` alike."""
    config = Config.from_flat(dict(context.run_config))
    run_server(grid, config, Path(config.run_dir) if config.run_dir else flwr_run_dir(context.run_id))
