"""What a worker process keeps between clients: the frozen base with its LoRA slot,
and tokenised client data. Only adapter tensors are swapped per client.

Flower's simulation engine reuses worker (Ray actor) processes across virtual clients,
so this module-level cache turns "load the model per client" into "once per worker".
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedllm.config import Config
from fedllm.data import ClientData, load_clients
from fedllm.data.tokens import encode
from fedllm.model import adapter_state, attach_lora, load_base, resolve_base


@dataclass
class Worker:
    model: object  # PeftModel
    tokenizer: object
    base: str
    initial: dict  # the adapter as initialised (B = 0): the start of every local-only baseline


_WORKERS: dict[tuple, Worker] = {}
_EXAMPLES: dict[tuple, tuple[list[list[int]], list[list[int]]]] = {}


def worker_for(config: Config) -> Worker:
    base = resolve_base(config, progress=False)
    key = (base, config.lora, config.seed)
    if key not in _WORKERS:
        torch.set_num_threads(max(1, config.simulation.cpus_per_client))
        model, tokenizer = load_base(base)
        _WORKERS.clear()  # one base per worker process
        peft_model = attach_lora(model, config.lora, config.seed)
        _WORKERS[key] = Worker(peft_model, tokenizer, base, adapter_state(peft_model))
    return _WORKERS[key]


def client_data(config: Config, partition_id: int | Mapping[str, Any]) -> ClientData:
    """This node's client: partition `partition_id` of the run's clients (simulation), or,
    given a device's node config, the records in its `data-path`."""
    if isinstance(partition_id, Mapping):
        from fedllm.data.corpus import device_client

        node = partition_id
        return device_client(Path(str(node["data-path"])), str(node.get("client-id", "")),
                             config.data.min_records, config.data.holdout_fraction)
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


def ledger_path(config: Config, data: ClientData) -> Path:
    from fedllm.state import StateStore, state_root

    return StateStore(state_root(config), data.client_id).ledger_path


def refused(config: Config, data: ClientData, policy):
    """(why this device refuses the request, or "", its unchanged report when refused, its
    existing ledger or None). Nothing is charged, trained or written here."""
    from fedllm.privacy.ledger import Ledger
    from fedllm.privacy.policy import refusal
    from fedllm.privacy.report import client_report

    ledger = Ledger.existing(ledger_path(config, data), data.client_id) if config.privacy.enabled else None
    why = refusal(policy, config, ledger, data.num_records)
    return why, client_report(ledger, declined=why) if why and ledger is not None else None, ledger


def open_ledger(config: Config, data: ClientData):
    from fedllm.config import planned_steps
    from fedllm.privacy.engine import poisson_sample_rate
    from fedllm.privacy.ledger import Ledger

    p = config.privacy
    return Ledger.open(
        ledger_path(config, data), client_id=data.client_id,
        num_records=data.num_records, delta=p.delta, target_epsilon=p.target_epsilon,
        sample_rate=poisson_sample_rate(data.num_records, config.train.batch_size),
        max_grad_norm=p.max_grad_norm, planned_steps=planned_steps(config),
        accountant=p.accountant,
    )


def _train_steps(config: Config, worker: Worker, examples, steps: int, lr: float, seed: int, ledger=None,
                 proximal_mu: float = 0.0, anchor=None, after_step=None):
    """`steps` steps on the model's trainable (adapter) weights: DP-SGD when a ledger is
    given (the caller has already charged it), plain AdamW otherwise."""
    from fedllm.personal import trainable_snapshot
    from fedllm.privacy.engine import check_adapter_moved, make_private
    from fedllm.train import loader_for, make_optimizer, train_local

    loader = loader_for(examples, config.train.batch_size, worker.tokenizer.pad_token_id, seed)
    optimizer = make_optimizer(worker.model, lr, config.train.weight_decay)
    if ledger is None:
        return train_local(worker.model, loader, optimizer, steps, proximal_mu, anchor, after_step)
    before = trainable_snapshot(worker.model)
    private = make_private(worker.model, optimizer, loader, ledger.noise_multiplier, ledger.max_grad_norm,
                           charged_rate=ledger.sample_rate)
    try:
        result = train_local(worker.model, private.loader, private.optimizer, steps, proximal_mu, anchor)
        private.check_charged(ledger.noise_multiplier, ledger.sample_rate, steps, ledger.max_grad_norm)
    finally:
        private.close()
    check_adapter_moved(before, trainable_snapshot(worker.model))
    return result


def _charge_or_decline(ledger, charges, target: float) -> str:
    """Charge the ledger for `charges` (before any step), or say why the client declines.
    `target` is the ledger's, or a stricter one the server asked for."""
    cap = min(target, ledger.target_epsilon)
    affordable, after = ledger.affordable(charges, cap)
    if not affordable:
        return (f"declined: this would bring epsilon to {after:.3f}, over the target "
                f"{cap:g} (spent so far {ledger.epsilon():.3f})")
    ledger.charge(charges)  # before training: a crash can only over-report
    return ""


def train_client(config: Config, partition_id: int, global_state: dict[str, torch.Tensor],
                 server_round: int, proximal_mu: float = 0.0, run_id: str = "", policy=None) -> Update:
    """One client round: check the request against the device's policy, apply the global
    adapter, train locally (privately when DP is on, after charging the ledger), return
    the delta. A refused request charges and trains nothing."""
    from fedllm.model import adapter_state, load_adapter_state
    from fedllm.privacy.policy import DevicePolicy
    from fedllm.privacy.report import client_report

    data = client_data(config, partition_id)
    why, report, ledger = refused(config, data, policy or DevicePolicy.from_config(config))
    if why:
        return Update(data, None, None, report, declined=why)
    worker = worker_for(config)
    train_examples, _ = examples_for(worker, data, config.model.max_length)
    load_adapter_state(worker.model, global_state)

    if config.privacy.enabled and ledger is None:  # the first private round: calibrate and create it
        ledger = open_ledger(config, data)
    if ledger is not None:
        declined = _charge_or_decline(ledger, [ledger.next_charge(server_round, config.local_steps, run=run_id)],
                                      config.privacy.target_epsilon)
        if declined:
            return Update(data, None, None, client_report(ledger, declined, config.privacy.target_epsilon),
                          declined=declined)
    result = _train_steps(config, worker, train_examples, config.local_steps, config.train.lr,
                          client_seed(config.seed, server_round, data.client_id), ledger, proximal_mu)
    local = adapter_state(worker.model)
    delta = {k: local[k] - global_state[k].to(torch.float32) for k in local}
    return Update(data, delta, result, client_report(ledger, "", config.privacy.target_epsilon) if ledger else None)


def personalise_client(config: Config, partition_id: int, global_state: dict[str, torch.Tensor],
                       server_round: int, global_metrics: dict[str, float] | None = None,
                       run_id: str = "", policy=None) -> tuple[dict[str, float], dict | None]:
    """Personalise per `personal.method` and train the local-only baseline, both on this
    client's records (privately, charged, when DP is on); held-out metrics of both.

    Personal state (adapter, Ditto weights) and the local-only adapter stay in the state
    store; what is returned is metrics, and the epsilon report when DP is on.
    """
    from fedllm.evaluate import SUMMARY_METRICS, evaluate
    from fedllm.model import adapter_state, load_adapter_state
    from fedllm.personal import load_state, personal_state, save_state, stacked_personal_adapter, trainable_snapshot
    from fedllm.privacy.report import client_report
    from fedllm.state import StateStore, state_root

    worker = worker_for(config)
    data = client_data(config, partition_id)
    train_examples, heldout = examples_for(worker, data, config.model.max_length)
    store = StateStore(state_root(config), data.client_id)
    p, pad, batch = config.personal, worker.tokenizer.pad_token_id, config.evaluate.batch_size

    def metrics(prefix: str, values: dict[str, float]) -> dict[str, float]:
        return {f"{prefix}-{k}": values[k] for k in SUMMARY_METRICS}

    load_adapter_state(worker.model, global_state)
    if global_metrics is None:  # the evaluate handler has them already
        global_metrics = evaluate(worker.model, heldout, batch, pad)
    from fedllm.privacy.policy import DevicePolicy

    why, report, ledger = refused(config, data, policy or DevicePolicy.from_config(config))
    if why:  # the device keeps the global adapter and charges nothing
        return ({**metrics("personal", global_metrics), **metrics("local", global_metrics),
                 "personal-declined": 1.0}, report)
    if config.privacy.enabled and ledger is None:
        ledger = open_ledger(config, data)
    if ledger is not None:
        declined = _charge_or_decline(ledger, [ledger.next_charge(server_round, p.steps, "personal", run_id),
                                               ledger.next_charge(server_round, p.steps, "local-only", run_id)],
                                      config.privacy.target_epsilon)
        if declined:  # the device keeps the global adapter; report that
            return ({**metrics("personal", global_metrics), **metrics("local", global_metrics),
                     "personal-declined": 1.0}, client_report(ledger, declined, config.privacy.target_epsilon))

    def seed(kind: str) -> int:
        return client_seed(config.seed, server_round, f"{data.client_id}/{kind}")

    def fit(kind: str, **kw) -> None:
        """Personal or local-only training; early-stopped on a split of the training
        records when DP is off and the client has enough records to spare some."""
        from fedllm.personal import EarlyStopping

        records = train_examples
        stopper = None
        if ledger is None and p.early_stopping and len(train_examples) >= 10:
            n_val = max(2, len(train_examples) // 5)
            records, validation = train_examples[:-n_val], train_examples[-n_val:]
            stopper = EarlyStopping(worker.model, lambda: evaluate(worker.model, validation, batch, pad)["loss"],
                                    every=max(1, p.steps // 5))
        _train_steps(config, worker, records, p.steps, p.lr, seed(kind), ledger, after_step=stopper, **kw)
        if stopper is not None:
            stopper.restore()

    # The local-only baseline: this client's data alone, from the initial adapter, same steps.
    load_adapter_state(worker.model, load_state(store.local_only_path) or worker.initial)
    fit("local-only")
    save_state(store.local_only_path, adapter_state(worker.model))
    local_metrics = evaluate(worker.model, heldout, batch, pad)

    load_adapter_state(worker.model, global_state)
    if p.method == "finetune":
        fit("personal")
        personal_metrics = evaluate(worker.model, heldout, batch, pad)
    elif p.method == "ditto":
        anchor = trainable_snapshot(worker.model)  # the global adapter, by parameter name
        load_adapter_state(worker.model, load_state(store.personal_path("ditto")) or global_state)
        fit("personal", proximal_mu=p.lambda_, anchor=anchor)
        save_state(store.personal_path("ditto"), adapter_state(worker.model))
        personal_metrics = evaluate(worker.model, heldout, batch, pad)
    elif p.method == "adapter":
        with stacked_personal_adapter(worker.model, p, config.lora, load_state(store.personal_path("adapter")),
                                      seed("init")):
            fit("personal")
            save_state(store.personal_path("adapter"), personal_state(worker.model))
            personal_metrics = evaluate(worker.model, heldout, batch, pad)
    else:
        personal_metrics = global_metrics
    load_adapter_state(worker.model, global_state)
    report = client_report(ledger, "", config.privacy.target_epsilon) if ledger is not None else None
    return {**metrics("personal", personal_metrics), **metrics("local", local_metrics), "personal-declined": 0.0}, report


def evaluate_client(config: Config, partition_id: int, global_state: dict[str, torch.Tensor]):
    """Held-out metrics of the global adapter on one client."""
    from fedllm.evaluate import evaluate
    from fedllm.model import load_adapter_state

    worker = worker_for(config)
    data = client_data(config, partition_id)
    _, heldout = examples_for(worker, data, config.model.max_length)
    load_adapter_state(worker.model, global_state)
    return data, evaluate(worker.model, heldout, config.evaluate.batch_size, worker.tokenizer.pad_token_id)
