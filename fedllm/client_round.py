"""What a device does in one training round, in order. `client/app.py` only turns Flower
messages into the arguments here and the returned `TrainReply` into records.

    1. its data            this node's client: a partition (simulation) or its data-path
    2. its policy          refuse what the device's own policy forbids: nothing read or charged
    3. the charge          open (calibrate) or read the ledger, charge before any step, or decline
                           (2 and 3 are the one door to spending, `fedllm.privacy.budget`)
    4. local training      a hive's specialist chosen first (fedllm.hive); the same loop with or
                           without DP (Opacus wraps it when charged)
    5. the delta           local minus global adapter
    6. the user-level clip on the device, when the run has user-level DP
    7. the reply           plain data: client id, delta, metrics, epsilon report

Personalisation, its sibling after the last round (and, with personal.every-round, after
every training round: `fedllm.personal_round.train_and_personalise`), is `fedllm.personal_round`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedllm import messages as wire
from fedllm.config import Config
from fedllm.data import ClientData, load_clients
from fedllm.data.corpus import device_client
from fedllm.hive import identical
from fedllm.hive_device import keep_choice, kept_choice, pick, specialists
from fedllm.model import adapter_state, load_adapter_state
from fedllm.personal import trainable_snapshot
from fedllm.privacy import budget
from fedllm.privacy.engine import check_adapter_moved, make_private
from fedllm.privacy.ledger import Ledger
from fedllm.privacy.policy import DevicePolicy
from fedllm.privacy.report import client_report
from fedllm.privacy.user_level import clip_delta
from fedllm.schedule import STOPPED, UNAVAILABLE, Unavailable
from fedllm.state import MODEL_KEYS, StateStore, state_root
from fedllm.train import TrainResult, loader_for, make_optimizer, train_local
from fedllm.worker import Worker, examples_for, worker_for

Source = int | Mapping[str, Any]  # a partition id (simulation) or a device's node config


@dataclass(frozen=True)
class Request:
    """What the server asked for, already checked by the device (`client/app.py`)."""

    server_round: int
    run_id: str = ""
    proximal_mu: float = 0.0


def node_local(node: Mapping[str, Any]) -> dict[str, Any]:
    """A real device's values of the local keys, from its operator's flags (node config)."""
    return {"privacy.state-dir": str(node.get(wire.NODE_STATE_DIR, "")),
            "model.name": str(node.get(wire.NODE_MODEL, "builtin")),
            "model.cache-dir": str(node.get(wire.NODE_CACHE_DIR, "")),
            "device": str(node.get(wire.NODE_DEVICE, "auto")), "model.dtype": str(node.get(wire.NODE_DTYPE, "auto"))}


def client_data(config: Config, source: Source) -> ClientData:
    """This node's client: partition `source` of the run's clients (simulation), or, given
    a device's node config, the records in its `data-path`."""
    if isinstance(source, Mapping):
        return device_client(Path(str(source[wire.NODE_DATA_PATH])), str(source.get(wire.NODE_CLIENT_ID, "")),
                             config.data.min_records, config.data.holdout_fraction)
    clients = load_clients(config)
    if not 0 <= source < len(clients):
        raise ValueError(f"partition-id {source} outside 0..{len(clients) - 1}")
    return clients[source]


def client_seed(seed: int, server_round: int, client_id: str) -> int:
    """A stable per-(run, round, client) seed for batch order."""
    return zlib.crc32(f"{seed}/{server_round}/{client_id}".encode())


def train_steps(config: Config, worker: Worker, examples, steps: int, lr: float, seed: int,
                ledger: Ledger | None = None, proximal_mu: float = 0.0, anchor=None, after_step=None,
                optimizer_name: str = "adamw") -> TrainResult:
    """`steps` steps on the model's trainable (adapter) weights: DP-SGD when a ledger is
    given (the caller has already charged it), plain steps otherwise, with the named local
    optimizer (federated rounds: train.optimizer; personalisation: AdamW)."""
    loader = loader_for(examples, config.train.batch_size, worker.tokenizer.pad_token_id, seed)
    optimizer = make_optimizer(worker.model, lr, config.train.weight_decay, optimizer_name)
    if ledger is None:
        return train_local(worker.model, loader, optimizer, steps, proximal_mu, anchor, after_step)
    before = trainable_snapshot(worker.model)
    rate = ledger.current_sample_rate
    private = make_private(worker.model, optimizer, loader, ledger.noise_multiplier, ledger.max_grad_norm,
                           charged_rate=rate)
    try:
        result = train_local(worker.model, private.loader, private.optimizer, steps, proximal_mu, anchor,
                             after_step, on_empty=private.noise_step)
        private.check_charged(ledger.noise_multiplier, rate, steps, ledger.max_grad_norm)
    finally:
        private.close()
    check_adapter_moved(before, trainable_snapshot(worker.model))
    return result


def train_round(config: Config, source: Source, global_state: dict[str, torch.Tensor], request: Request,
                policy: DevicePolicy | None = None, still_available=None) -> wire.TrainReply:
    """One client round, steps 1-7 above. A refused or unaffordable request trains nothing.
    `still_available()` (the device's own conditions, `fedllm.schedule`) is asked after every
    step; when it says why not, training stops and the round is declined, its charge kept."""
    data = client_data(config, source)                                                    # 1
    packed, states = global_state, specialists(config, global_state)
    same = identical(states)  # one adapter, or a new hive's: a choice among them reads no record

    def charges(ledger: Ledger) -> list:
        steps = [ledger.next_charge(request.server_round, config.local_steps, run=request.run_id)]
        if not same:  # the hive's choice reads the records: charged with the steps
            steps.insert(0, ledger.selection_charge(request.server_round, config.hive.select_noise, request.run_id))
        return steps

    spent = budget.spend(config, data.client_id, data.num_records, policy or DevicePolicy.from_config(config),  # 2, 3
                         charges, request.server_round, request.run_id)
    if not spent.admitted:
        return wire.TrainReply(data.client_id, declined=spent.declined, report=spent.report)
    ledger = spent.ledger
    worker = worker_for(config)                                                           # 4
    train_examples, _ = examples_for(worker, data, config.model.max_length)
    chosen = None
    if len(states) > 1:  # the hive: train the specialist that fits these records best (fedllm.hive)
        chosen = pick(config, worker, data.client_id, states, train_examples, spent.private, request.server_round)
        keep_choice(config, data.client_id, chosen, request.server_round, request.run_id, spent.private,
                    scored=not same)
        global_state = states[chosen]
    load_adapter_state(worker.model, global_state)
    keep_global(config, worker, data, packed, request)
    try:
        result = train_steps(config, worker, train_examples, config.local_steps, config.train.lr,
                             client_seed(config.seed, request.server_round, data.client_id), ledger,
                             request.proximal_mu, after_step=_stop_when(still_available),
                             optimizer_name=config.train.optimizer)
    except Unavailable as stopped:
        load_adapter_state(worker.model, global_state)  # nothing of the cut-short steps is kept or sent
        report = client_report(ledger, str(stopped), config.privacy.target_epsilon) if ledger is not None else None
        return wire.TrainReply(data.client_id, declined=str(stopped), report=report)
    local = adapter_state(worker.model)                                                   # 5
    delta = {k: local[k] - global_state[k].to(torch.float32) for k in local}
    if config.user_dp.enabled:                                                            # 6
        delta, _ = clip_delta(delta, config.user_dp.clip)  # the norm itself stays on the device
    report = spent.report                                                                 # 7
    return wire.TrainReply(data.client_id, delta=delta, report=report, metrics={
        wire.NUM_EXAMPLES: data.num_records, wire.TRAIN_LOSS: result.loss, wire.STEPS: result.steps,
        wire.EPSILON: report["epsilon"] if report else 0.0,
        **({wire.SPECIALIST: chosen} if chosen is not None else {})})  # masked in a secure round (client/secure.py)


def evaluation_choice(config: Config, source: Source, states: list, request: Request,
                      policy: DevicePolicy | None = None) -> tuple[int, dict | None]:
    """(the specialist this device is evaluated and personalised with, its epsilon report
    when a choice was charged). The device's policy comes first, as for training: a
    request it refuses (a non-private one on a device that requires DP) gets specialist 0,
    chosen without reading a record. Without DP it scores them afresh. Under DP it reuses
    the choice it keeps, if that was made (and paid for) under DP, and pays for a new one
    only where it has none, and after the last round (the specialists it personalises
    from), unless it chose in that very round; a device that cannot pay takes specialist 0,
    chosen without its data. Specialists that are all the same (a new hive) need no
    choice: 0, charged nothing."""
    data = client_data(config, source)
    if identical(states):
        return 0, None
    policy = policy or DevicePolicy.from_config(config)
    checked = budget.admit(config, data.client_id, data.num_records, policy)
    if not checked.admitted:
        return 0, checked.report
    kept = kept_choice(config, data.client_id) if config.privacy.enabled else None
    final = request.server_round >= config.num_server_rounds
    if kept is not None and (not final or kept[1] == request.server_round):
        return kept[0], None
    spent = budget.spend(config, data.client_id, data.num_records, policy,
                         lambda ledger: [ledger.selection_charge(request.server_round, config.hive.select_noise,
                                                                 request.run_id)],
                         request.server_round, request.run_id)
    if not spent.admitted:
        return 0, spent.report
    worker = worker_for(config)
    train_examples, _ = examples_for(worker, data, config.model.max_length)
    chosen = pick(config, worker, data.client_id, states, train_examples, spent.private, request.server_round)
    keep_choice(config, data.client_id, chosen, request.server_round, request.run_id, spent.private)
    return chosen, spent.report


def _stop_when(still_available):
    if still_available is None:
        return None

    def after_step(step: int) -> None:
        why = still_available()
        if why:
            raise Unavailable(f"{STOPPED} after {step} steps: {why.removeprefix(UNAVAILABLE + ': ')}")

    return after_step


def keep_global(config: Config, worker: Worker, data: ClientData, global_state: dict[str, torch.Tensor],
                request: Request) -> None:
    """Keep the global adapter (it has loaded, so it fits the base) and what it is an
    adapter of in the state store: the device uses it offline (`fedllm generate`)."""
    flat = config.to_flat()
    info = {"client_id": data.client_id, "base": worker.base, "config": {k: flat[k] for k in MODEL_KEYS},
            "global_round": request.server_round, "run": request.run_id,
            "records": data.num_records + len(data.heldout), "request": flat}  # request: for offline personalisation
    StateStore(state_root(config), data.client_id).save_global(global_state, info)


def evaluate_round(config: Config, source: Source, global_state: dict[str, torch.Tensor],
                   request: Request | None = None, packed: dict[str, torch.Tensor] | None = None) -> wire.EvalReply:
    """Held-out metrics of the global adapter (a hive's chosen specialist) on this client;
    `packed`: everything the server sent (a hive's every specialist), kept on the device."""
    from fedllm.evaluate import evaluate

    worker = worker_for(config)
    data = client_data(config, source)
    _, heldout = examples_for(worker, data, config.model.max_length)
    load_adapter_state(worker.model, global_state)
    if request is not None:
        keep_global(config, worker, data, packed if packed is not None else global_state, request)
    metrics = evaluate(worker.model, heldout, config.evaluate.batch_size, worker.tokenizer.pad_token_id)
    return wire.EvalReply(data.client_id, {wire.NUM_EXAMPLES: len(data.heldout), **metrics})
