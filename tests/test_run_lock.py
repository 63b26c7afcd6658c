"""One process at a time in a run directory or a sweep's folder: a second one would resume
the same run, charge the same devices' ledgers for a round twice and interleave the rounds
of metrics.jsonl (seen when two sweeps were started on one --out)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import TINY
from fedllm.errors import FedllmError

HOLD = """
import sys, time
from fedllm import atomic
with atomic.exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another live process holds."""
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield folder, holder
    finally:
        holder.kill()
        holder.wait()


def test_a_held_folder_names_its_holder_and_is_free_once_the_holder_dies(held):
    from fedllm import atomic

    folder, holder = held
    with pytest.raises(atomic.InUse) as busy:
        with atomic.exclusive(folder):
            pass
    assert busy.value.holder == str(holder.pid)
    holder.kill()  # a crash, not a clean exit: the kernel drops the lock, nothing stale is left
    holder.wait()
    with atomic.exclusive(folder) as path:
        assert (path / atomic.LOCK).read_text().strip() == str(os.getpid())
        assert oct((path / atomic.LOCK).stat().st_mode & 0o777) == "0o600"


def test_a_second_sweep_on_one_folder_is_refused_before_it_runs_a_cell(held):
    from fedllm.sweep import load_grid, run_sweep

    folder, holder = held
    grid_file = folder.parent / "grid.toml"
    grid_file.write_text(f'base = "{TINY}"\n[grid]\n"lora.r" = [1, 2]\n')
    ran = []
    with pytest.raises(FedllmError, match=rf"in use by another sweep \(process {holder.pid}\).*--out"):
        run_sweep(load_grid(grid_file), folder, run=lambda config, run_dir: ran.append(run_dir), log=lambda _: None)
    assert ran == [] and not (folder / "runs").exists()


def test_a_second_simulation_in_one_run_directory_is_refused_before_it_starts(held, cache_dir):
    from fedllm.simulate import load_experiment, simulate

    folder, holder = held
    started = time.time()
    with pytest.raises(FedllmError, match=rf"in use by another simulation \(process {holder.pid}\).*--run-dir"):
        simulate(load_experiment(TINY, {}), folder)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no Flower app, no log, no client store
    assert time.time() - started < 60


def test_a_second_server_on_one_run_directory_is_refused_before_it_starts_a_superlink(held):
    from fedllm.config import Config
    from fedllm.deploy.server import serve

    folder, holder = held
    files = folder.parent / "pki"
    (files / "nodes").mkdir(parents=True)
    for name in ("ca.crt", "server.crt", "server.key", "nodes/device-0.pub"):
        (files / name).write_text("placeholder: refused before any is read\n")
    with pytest.raises(FedllmError, match=rf"in use by another server \(process {holder.pid}\).*--run-dir"):
        serve(Config(), folder, ca_cert=files / "ca.crt", cert=files / "server.crt", key=files / "server.key",
              nodes=files / "nodes")
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]
