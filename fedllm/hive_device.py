"""A device's side of the hive (`fedllm.hive`): score every specialist on its own training
records, choose one (privately under DP, charged), and keep the choice in its state store
(`hive.json`), so later evaluations and personalisation reuse it without a new release.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedllm import atomic
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.evaluate import record_losses
from fedllm.hive import MAX_K, choose, identical, scored, unpack
from fedllm.model import load_adapter_state
from fedllm.state import StateStore, _read_json, state_root
from fedllm.untrusted import number_in

HIVE_FILE = "hive.json"


def specialists(config: Config, global_state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The k specialists the server sent (k = 1: the global adapter), checked."""
    return unpack(global_state, config.hive.k)


def scores(model, pad_id: int, states: list[dict[str, torch.Tensor]], examples: list[list[int]],
           batch_size: int) -> np.ndarray:
    """Per-record mean token loss under each specialist: records x k. The model's adapter
    is left as it was found."""
    from fedllm.model import adapter_state

    before = adapter_state(model)
    try:
        columns = []
        for state in states:
            load_adapter_state(model, state)
            columns.append(record_losses(model, examples, batch_size, pad_id))
    finally:
        load_adapter_state(model, before)
    return np.asarray(columns, np.float64).T


def pick(config: Config, worker, client_id: str, states, examples, private: bool, server_round: int) -> int:
    """The specialist this device trains (or is evaluated with). Under DP a noisy choice
    from the OS's randomness (its charge is the caller's, made before); otherwise the
    lowest mean loss, ties broken by a seed of (run seed, round, client)."""
    if len(states) == 1:
        return 0
    rng = np.random.default_rng() if private else np.random.default_rng(
        zlib.crc32(f"{config.seed}/{server_round}/{client_id}/hive".encode()))
    if identical(states):  # a new hive: nothing to tell apart, nothing read, nothing charged
        return int(rng.integers(len(states)))
    # Under DP the subsample's key is the OS's, fresh for each choice: no server can pick the records scored.
    key = secrets.token_bytes(16) if private else hashlib.blake2b(
        f"{config.seed}/{server_round}/{client_id}/score".encode(), digest_size=16).digest()
    examples = scored(examples, config.hive.score_records, key)
    if not examples:  # no record drawn: nobody votes (under DP the noise alone decides)
        return int(np.argmax(rng.normal(0.0, config.hive.select_noise, len(states)))) if private \
            else int(rng.integers(len(states)))
    losses = scores(worker.model, worker.tokenizer.pad_token_id, states, examples, config.evaluate.batch_size)
    return choose(losses, config.hive.select_noise if private else None, rng)


def hive_path(config: Config, client_id: str) -> Path:
    return StateStore(state_root(config), client_id).dir / HIVE_FILE


def keep_choice(config: Config, client_id: str, chosen: int, server_round: int, run: str, private: bool,
                scored: bool = True) -> None:
    """hive.json: the last choice; `scored` False for a new hive's random one (not worth keeping)."""
    atomic.write_json(hive_path(config, client_id), {"k": config.hive.k, "specialist": chosen, "round": server_round,
                                                     "run": run, "private": private, "scored": scored})


CHOICE_FIELDS = {"k": lambda v: number_in(v, 1, MAX_K, integer=True),
                 "specialist": lambda v: number_in(v, 0, MAX_K - 1, integer=True),
                 "round": lambda v: number_in(v, 0, 10**9, integer=True)}


def read_choice(store_dir: Path) -> dict[str, Any] | None:
    """A state store's hive.json, its fields checked; None when absent or damaged (the
    device then chooses again, charged under DP)."""
    try:
        kept = _read_json(Path(store_dir) / HIVE_FILE, CHOICE_FIELDS)
    except FedllmError:
        return None
    if not kept or not all(isinstance(kept.get(f), int) and not isinstance(kept.get(f), bool) for f in CHOICE_FIELDS):
        return None
    return kept


def kept_choice(config: Config, client_id: str) -> tuple[int, int] | None:
    """(the specialist this device last chose on its records for a hive of this size, the
    round), or None; under DP only a choice that was itself made under DP (and charged)."""
    kept = read_choice(StateStore(state_root(config), client_id).dir)
    if kept is None or kept["k"] != config.hive.k or kept.get("scored") is not True:
        return None
    if config.privacy.enabled and kept.get("private") is not True:  # a choice made in the clear was never paid for
        return None
    return (kept["specialist"], kept["round"]) if kept["specialist"] < config.hive.k else None
