"""A device's answer to each kind of server request, on plain data: no Flower here.

`client/app.py` turns a Flower message into a `Request` (the config record's items, the
global adapter as numpy arrays, the node's own config) and the answer back into records.
It calls these in its own process (simulation) or in the device's resident worker
(`fedllm.deploy.device_worker`), which keeps the model loaded between messages.

Every value in a request came from the server and is checked before use: round, run
id, proximal term, the config (with the device's local keys its own) and its policy.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from fedllm import hive
from fedllm import messages as wire
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.privacy.policy import DevicePolicy, device_config

MAX_ROUND = 10**9
DEVICE_CONFIG_ENV = "FEDLLM_DEVICE_CONFIG"  # the devices' own config in a simulation (set by fedllm simulate)


@dataclass
class DeviceRequest:
    """One server request as plain data (what crosses to the resident worker)."""

    config: dict[str, Any]  # the request's config record
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the global adapter
    node: dict[str, Any] = field(default_factory=dict)  # the node config: this device's own side
    run_config: dict[str, Any] = field(default_factory=dict)  # Flower's run config (plain `flwr run`)
    run_id: int = 0  # Flower's run id


def _local(request: DeviceRequest) -> tuple[dict, DevicePolicy]:
    """(this device's own values of the local keys, its policy), from its own side only.

    A real device (`data-path` in its node config) has its operator's flags; its run
    config comes from the server, so it is not read. A simulated device has the config
    `fedllm simulate` gives its devices, or, under a plain `flwr run`, Flower's run config."""
    from fedllm.client_round import node_local
    from fedllm.rundir import flwr_run_dir

    node = request.node
    if wire.NODE_DATA_PATH in node:
        return node_local(node), DevicePolicy.from_node_config(node)
    if os.environ.get(DEVICE_CONFIG_ENV):
        config = _own_config(os.environ[DEVICE_CONFIG_ENV])
    elif request.run_config:
        config = Config.from_flat(dict(request.run_config))
        if not config.run_dir:  # the ServerApp derives the same one (server.app)
            config = config.with_values({"run-dir": str(flwr_run_dir(request.run_id))})
    else:
        raise FedllmError(f"this simulated device has no config of its own (run config or {DEVICE_CONFIG_ENV})")
    return config.to_flat(), DevicePolicy.from_config(config)


@lru_cache(maxsize=4)
def _own_config(text: str) -> Config:
    """A simulated device's own config, parsed and checked once per worker, not per message."""
    return Config.from_flat(json.loads(text))


def _config(request: DeviceRequest) -> tuple[Config, DevicePolicy]:
    """The config this device acts on: the server's request, checked, with local keys its own."""
    local, policy = _local(request)
    return device_config(request.config, local), policy


def _round(record: dict) -> int:
    value = record.get(wire.SERVER_ROUND, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise FedllmError(f"server-round={value!r}: expected an integer in 0..{MAX_ROUND}")
    return value


def _run_id(record: dict) -> str:
    """The server's run id, written into ledger entries: short and plain, or refused."""
    value = str(record.get(wire.RUN_ID, ""))
    if not re.fullmatch(r"[A-Za-z0-9_-]{0,64}", value):
        raise FedllmError("run-id: expected at most 64 letters, digits, '-' or '_'")
    return value


def _proximal_mu(record: dict) -> float:
    value = record.get(wire.PROXIMAL_MU, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise FedllmError(f"proximal-mu={value!r}: expected a finite number >= 0")
    return float(value)


def _source(request: DeviceRequest):
    """Which client this node is: a device's own data (`data-path` in its node config),
    or a partition of the run's clients (simulation)."""
    if wire.NODE_DATA_PATH in request.node:
        return dict(request.node)
    return int(request.node[wire.NODE_PARTITION])


def check_global(config, arrays: dict[str, np.ndarray]) -> None:
    """The adapter a server sent is this device's model's, slot by slot: the same keys
    (lora.freeze-a: B alone), shapes and finite values. Checked before anything is charged
    or loaded, so a request that does not fit is refused whole, never half-run."""
    from fedllm.model import adapter_mismatch
    from fedllm.worker import worker_for

    expected = worker_for(config).initial
    for j, state in enumerate(hive.unpack(arrays, config.hive.k)):
        where = f"specialist {j}'s adapter" if config.hive.k > 1 else "the adapter sent"
        why = adapter_mismatch(expected, {k: np.asarray(v) for k, v in state.items()})
        if why:
            raise FedllmError(f"{where} does not fit this device's model (lora.r={config.lora.r}, lora.freeze-a="
                              f"{str(config.lora.freeze_a).lower()}): {why}")
        for key, value in state.items():
            if not np.isfinite(np.asarray(value, dtype=np.float64)).all():
                raise FedllmError(f"{where}: {key} holds values that are not finite")


def _state(arrays: dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _plain(reply: wire.TrainReply) -> wire.TrainReply:
    """Tensors as numpy: what the ClientApp puts in its records, without importing torch."""
    if reply.delta is not None:
        reply.delta = {k: v.detach().cpu().numpy() for k, v in reply.delta.items()}
    return reply


def train(request: DeviceRequest) -> wire.TrainReply:
    from fedllm import schedule
    from fedllm.client_round import Request, client_data
    from fedllm.personal_round import train_and_personalise
    from fedllm.state import state_root

    try:
        config, policy = _config(request)
        asked = Request(_round(request.config), _run_id(request.config), _proximal_mu(request.config))
        check_global(config, request.arrays)  # what the server sent fits this model, before anything is charged
    except FedllmError as exc:  # a request this device cannot even read: a reply that says why, nothing charged
        local, _ = _local(request)
        data = client_data(device_config({}, local), _source(request))
        return wire.TrainReply(data.client_id, declined=f"refused: {exc}")
    node = request.node
    schedule.limit_threads(node)
    client_id = client_data(config, _source(request)).client_id
    capped = bool(node.get(schedule.NODE_MAX_PER_DAY))
    why = schedule.availability(node, state_root(config) if capped else None, client_id)
    if why:  # not now: nothing charged, and not a failure
        return wire.TrainReply(client_id, declined=why)
    reply = train_and_personalise(config, _source(request), _state(request.arrays), asked, policy,
                                  still_available=schedule.still_available(node))
    if capped and (reply.delta is not None or reply.declined.startswith(schedule.STOPPED)):
        schedule.record_participation(schedule.participations_path(state_root(config), client_id))
    if capped and reply.report is not None:  # the cap is part of what the report claims
        reply.report["max_participations_per_day"] = int(node[schedule.NODE_MAX_PER_DAY])
    return _plain(reply)


def evaluate(request: DeviceRequest) -> wire.EvalReply:
    """Held-out metrics of the global adapter; when asked (after the last round), also of
    this device's personalised adapter and of its local-only baseline."""
    from fedllm.client_round import Request, evaluation_choice, evaluate_round
    from fedllm.hive_device import specialists
    from fedllm.personal_round import personalise
    from fedllm.schedule import limit_threads

    config, policy = _config(request)
    check_global(config, request.arrays)  # a request that does not fit is an error reply, nothing charged
    asked = Request(_round(request.config), _run_id(request.config))
    limit_threads(request.node)
    packed = _state(request.arrays)
    states = specialists(config, packed)
    chosen, report = evaluation_choice(config, _source(request), states, asked, policy) if len(states) > 1 \
        else (0, None)
    reply = evaluate_round(config, _source(request), states[chosen], asked, packed)
    reply.report = report
    if len(states) > 1 and not config.secagg.enabled:  # a secure run never shows a device's choice
        reply.metrics[wire.SPECIALIST] = chosen
    if request.config.get(wire.PERSONALISE, False) is True:
        personal, personal_report = personalise(config, _source(request), states[chosen], asked,
                                                global_metrics=reply.metrics, policy=policy)
        reply.report = personal_report or report
        reply.metrics.update(personal)
    return reply


def query(request: DeviceRequest) -> tuple[str, dict[str, float]]:
    """Who is this node? Lets the server sample and evaluate by client, reproducibly."""
    from fedllm.client_round import client_data

    config, _ = _config(request)
    data = client_data(config, _source(request))
    return data.client_id, {wire.NUM_RECORDS: data.num_records, wire.NUM_HELDOUT: len(data.heldout)}


HANDLERS = {"train": train, "evaluate": evaluate, "query": query}
