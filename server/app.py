"""The fedllm ServerApp. `flwr run .` enters through `app`; `fedllm simulate` builds one
with `make_server_app` so that its validated config and run directory are used as given.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm.config import Config
from fedllm.rundir import flwr_run_dir
from server.rounds import run_server


def make_server_app(config: Config, run_dir: Path) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config, run_dir)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = Config.from_flat(dict(context.run_config))
    run_server(grid, config, Path(config.run_dir) if config.run_dir else flwr_run_dir(context.run_id))
