"""What a worker process keeps between clients: the frozen base with its LoRA slot,
and tokenised client data. Only adapter tensors are swapped per client.

Flower's simulation engine reuses worker (Ray actor) processes across virtual clients,
so this module-level cache turns "load the model per client" into "once per worker".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from fedllm.config import Config
from fedllm.data import ClientData, load_clients
from fedllm.data.tokens import encode
from fedllm.model import attach_lora, load_base, resolve_base


@dataclass
class Worker:
    model: object  # PeftModel
    tokenizer: object
    base: str


_WORKERS: dict[tuple, Worker] = {}
_EXAMPLES: dict[tuple, tuple[list[list[int]], list[list[int]]]] = {}


def worker_for(config: Config) -> Worker:
    base = resolve_base(config, progress=False)
    key = (base, config.lora, config.seed)
    if key not in _WORKERS:
        torch.set_num_threads(max(1, config.simulation.cpus_per_client))
        model, tokenizer = load_base(base)
        _WORKERS.clear()  # one base per worker process
        _WORKERS[key] = Worker(attach_lora(model, config.lora, config.seed), tokenizer, base)
    return _WORKERS[key]


def client_data(config: Config, partition_id: int) -> ClientData:
    clients = load_clients(config)
    if not 0 <= partition_id < len(clients):
        raise ValueError(f"partition-id {partition_id} outside 0..{len(clients) - 1}")
    return clients[partition_id]


def examples_for(worker: Worker, data: ClientData, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out) token ids of one client, cached per worker."""
    key = (worker.base, data.client_id, max_length)
    if key not in _EXAMPLES:
        _EXAMPLES[key] = (encode(worker.tokenizer, data.train, max_length),
                          encode(worker.tokenizer, data.heldout, max_length))
    return _EXAMPLES[key]


def client_seed(seed: int, server_round: int, client_id: str) -> int:
    """A stable per-(run, round, client) seed for batch order."""
    return zlib.crc32(f"{seed}/{server_round}/{client_id}".encode())


@dataclass
class Update:
    """What one client round produced. `delta` is None when the client declined."""

    data: ClientData
    delta: dict[str, torch.Tensor] | None
    result: object | None  # fedllm.train.TrainResult
    privacy: dict | None  # the epsilon report, when DP is on
    declined: str = ""


def open_ledger(config: Config, data: ClientData):
    from fedllm.config import planned_rounds
    from fedllm.privacy.engine import poisson_sample_rate
    from fedllm.privacy.ledger import Ledger
    from fedllm.state import StateStore, state_root

    p = config.privacy
    return Ledger.open(
        StateStore(state_root(config), data.client_id).ledger_path, client_id=data.client_id,
        num_records=data.num_records, delta=p.delta, target_epsilon=p.target_epsilon,
        sample_rate=poisson_sample_rate(data.num_records, config.train.batch_size),
        max_grad_norm=p.max_grad_norm, planned_steps=planned_rounds(config) * config.local_steps,
        accountant=p.accountant,
    )


def train_client(config: Config, partition_id: int, global_state: dict[str, torch.Tensor],
                 server_round: int, proximal_mu: float = 0.0) -> Update:
    """One client round: apply the global adapter, train locally (privately when DP is
    on, after charging the ledger), return the delta."""
    from fedllm.model import adapter_state, load_adapter_state
    from fedllm.privacy.engine import check_adapter_moved, make_private
    from fedllm.privacy.report import client_report
    from fedllm.train import loader_for, make_optimizer, train_local

    worker = worker_for(config)
    data = client_data(config, partition_id)
    train_examples, _ = examples_for(worker, data, config.model.max_length)
    load_adapter_state(worker.model, global_state)
    loader = loader_for(train_examples, config.train.batch_size, worker.tokenizer.pad_token_id,
                        client_seed(config.seed, server_round, data.client_id))
    optimizer = make_optimizer(worker.model, config.train.lr, config.train.weight_decay)

    ledger = None
    if config.privacy.enabled:
        ledger = open_ledger(config, data)
        charges = [ledger.next_charge(server_round, config.local_steps)]
        affordable, after = ledger.affordable(charges)
        if not affordable:
            reason = (f"declined: this round would bring epsilon to {after:.3f}, over the target "
                      f"{ledger.target_epsilon:g} (spent so far {ledger.epsilon():.3f})")
            return Update(data, None, None, client_report(ledger, declined=reason), declined=reason)
        ledger.charge(charges)  # before training: a crash can only over-report
        private = make_private(worker.model, optimizer, loader, ledger.noise_multiplier,
                               config.privacy.max_grad_norm)
        try:
            result = train_local(worker.model, private.loader, private.optimizer, config.local_steps, proximal_mu)
        finally:
            private.close()
    else:
        result = train_local(worker.model, loader, optimizer, config.local_steps, proximal_mu)

    local = adapter_state(worker.model)
    if ledger is not None:
        check_adapter_moved(global_state, local)
    delta = {k: local[k] - global_state[k].to(torch.float32) for k in local}
    return Update(data, delta, result, client_report(ledger) if ledger else None)


def evaluate_client(config: Config, partition_id: int, global_state: dict[str, torch.Tensor]):
    """Held-out metrics of the global adapter on one client."""
    from fedllm.evaluate import evaluate
    from fedllm.model import load_adapter_state

    worker = worker_for(config)
    data = client_data(config, partition_id)
    _, heldout = examples_for(worker, data, config.model.max_length)
    load_adapter_state(worker.model, global_state)
    return data, evaluate(worker.model, heldout, config.evaluate.batch_size, worker.tokenizer.pad_token_id)
