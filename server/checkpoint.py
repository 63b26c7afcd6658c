"""What a restarted server goes on from: after each completed round the global adapter,
the optimizer's state and the server's books, as data (no pickle); `latest.json` last.
Reading them back checks every file (`server.resume`): a bad one stops the server with
one line that names it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedllm import atomic, hive
from fedllm.errors import FedllmError
from fedllm.model import save_adapter
from fedllm.personal import load_state, save_state
from server.resume import check_server_state, config_changes, load_optimizer, read_json, save_optimizer
from server.validation import AdapterSpec

log = logging.getLogger("fedllm.server")
# `server` below is a server.round_loop.Server (not imported: that module imports this one)


def save_checkpoint(server: Any, server_round: int) -> Path:
    """checkpoints/round-N: the global adapter as a PEFT adapter directory; a hive's
    specialists as checkpoints/round-N/specialist-j, one PEFT directory each."""
    path = server.run.checkpoint(server_round)
    states = hive.unpack(server.arrays.to_torch_state_dict(), server.k)
    if server.k == 1:
        save_adapter(server.model, states[0], path)
    for j, state in enumerate(states if server.k > 1 else []):
        save_adapter(server.model, state, path / f"specialist-{j}")
    return path


def save_server_state(server: Any, server_round: int) -> None:
    """After a completed round (its metrics line written)."""
    run = server.run
    save_state(run.global_file(server_round), server.arrays.to_torch_state_dict())
    save_optimizer(server.optimizer, run.checkpoint(server_round))
    atomic.write_json(run.server_state_file(server_round), {
        "round": server_round, "run_id": server.run_id, "sampling_seed": server.sampling_seed,
        **server.books.state()})
    server.run.mark_complete(server_round)
    server.books.save_registry()


def resume(server: Any) -> int:
    """The last completed round (0 when the run is new), with the server's state restored."""
    run, config = server.run, server.config
    if not run.latest_file.exists():
        return 0
    config_changes(read_json(run.config_file), config, config.resume.accept_changes)
    marker = read_json(run.latest_file)
    done = marker.get("round") if isinstance(marker, dict) else None
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= config.num_server_rounds:
        raise FedllmError(f"cannot resume: {run.latest_file} names no completed round of this run; restore it or "
                          "delete it")
    state = check_server_state(read_json(run.server_state_file(done)), run.server_state_file(done))
    try:
        arrays = load_state(run.global_file(done))
    except Exception as exc:  # noqa: BLE001 - a corrupt or planted file
        raise FedllmError(f"cannot resume: {run.global_file(done)} is unreadable ({type(exc).__name__}); "
                          "restore it from a backup or start a new run directory") from None
    if AdapterSpec.from_state(arrays) != server.packed_spec or not all(torch.isfinite(v).all() for v in arrays.values()):
        raise FedllmError(f"cannot resume: {run.global_file(done)} does not fit this run's adapter "
                          "(keys, shapes or non-finite values)")
    load_optimizer(server.optimizer, run.checkpoint(done), config.strategy.name, server.packed_spec.shapes)
    reports = {}
    for report in run.client_report_files():
        data = read_json(report)
        if not isinstance(data, dict) or not isinstance(data.get("client_id"), str):
            raise FedllmError(f"cannot resume: {report} is not a client's epsilon report; restore or remove it")
        reports[data["client_id"]] = data
    server.arrays = ArrayRecord(arrays)
    server.run_id = state["run_id"]
    server.sampling_seed = state.get("sampling_seed", server.sampling_seed)
    server.books.restore(state, reports)
    run.keep_metrics_through(done)  # a round cut short by the crash is run again
    log.warning("resuming run %s after round %d of %d", server.run_id, done, config.num_server_rounds)
    return done
