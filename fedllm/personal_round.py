"""Personalisation on the device, the sibling of `fedllm.client_round`: after the last
round a device turns the global adapter into its personal one (per `personal.method`) and
trains the local-only baseline, both on its own records; charged when DP is on.

    1. policy and charge   as in a training round; a refusal keeps the global adapter
    2. local-only          its data alone, from the initial adapter, the same steps
    3. personal            finetune | ditto | a stacked personal adapter (fedllm.personal)
    4. the metrics         held-out, of both; personal state stays in the state store
"""

from __future__ import annotations

import torch

from fedllm import messages as wire
from fedllm.client_round import Request, Source, client_data, client_seed, train_round, train_steps
from fedllm.config import Config
from fedllm.evaluate import evaluate
from fedllm.hive_device import specialists
from fedllm.model import adapter_state, load_adapter_state
from fedllm.personal import (EarlyStopping, load_state, personal_state, save_state, stacked_personal_adapter,
                             trainable_snapshot)
from fedllm.privacy import budget
from fedllm.privacy.policy import DevicePolicy
from fedllm.state import StateStore, state_root
from fedllm.worker import examples_for, worker_for


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}-{k}": values[k] for k in wire.SUMMARY_VALUES}


def fit_personal(config: Config, worker, data, train_examples, kind: str, request: Request, ledger,
                 **kw) -> None:
    """Train personal (or local-only) steps. Early-stopped on a split of the training
    records when DP is off and the client has enough records to spare some (a split would
    be a second, uncharged use)."""
    p, pad, batch = config.personal, worker.tokenizer.pad_token_id, config.evaluate.batch_size
    records, stopper = train_examples, None
    if ledger is None and p.early_stopping and len(train_examples) >= 10:
        n_val = max(2, len(train_examples) // 5)
        records, validation = train_examples[:-n_val], train_examples[-n_val:]
        stopper = EarlyStopping(worker.model, lambda: evaluate(worker.model, validation, batch, pad)["loss"],
                                every=max(1, p.steps // 5))
    seed = client_seed(config.seed, request.server_round, f"{data.client_id}/{kind}")
    train_steps(config, worker, records, p.steps, p.lr, seed, ledger, after_step=stopper, **kw)
    if stopper is not None:
        stopper.restore()


def update_personal(config: Config, worker, data, global_state: dict[str, torch.Tensor], request: Request,
                    ledger, reason: str, heldout=None) -> dict[str, float] | None:
    """Train this device's personal adapter from `global_state` (its steps already charged
    when `ledger` is given), keep it with a new version in the state store, and return its
    metrics on `heldout` (default: the client's own held-out records); None for method none."""
    p = config.personal
    if p.method == "none":
        return None
    store = StateStore(state_root(config), data.client_id)
    train_examples, own_heldout = examples_for(worker, data, config.model.max_length)
    heldout = own_heldout if heldout is None else heldout
    pad, batch = worker.tokenizer.pad_token_id, config.evaluate.batch_size
    load_adapter_state(worker.model, global_state)
    try:
        if p.method == "finetune":
            fit_personal(config, worker, data, train_examples, "personal", request, ledger)
            save_state(store.personal_path("finetune"), adapter_state(worker.model))
            metrics = evaluate(worker.model, heldout, batch, pad)
        elif p.method == "ditto":  # Ditto: the personal model trains against this round's global one
            anchor = trainable_snapshot(worker.model)  # the global adapter, by parameter name
            load_adapter_state(worker.model, load_state(store.personal_path("ditto")) or global_state)
            fit_personal(config, worker, data, train_examples, "personal", request, ledger,
                         proximal_mu=p.lambda_, anchor=anchor)
            save_state(store.personal_path("ditto"), adapter_state(worker.model))
            metrics = evaluate(worker.model, heldout, batch, pad)
        else:  # a personal adapter stacked on the global one
            with stacked_personal_adapter(worker.model, p, config.lora, load_state(store.personal_path("adapter")),
                                          client_seed(config.seed, request.server_round, f"{data.client_id}/init")):
                fit_personal(config, worker, data, train_examples, "personal", request, ledger)
                save_state(store.personal_path("adapter"), personal_state(worker.model))
                metrics = evaluate(worker.model, heldout, batch, pad)
    finally:
        load_adapter_state(worker.model, global_state)
    store.record_personal(p.method, request.server_round, request.run_id, data.num_records + len(data.heldout),
                          ledger.epsilon() if ledger is not None else None, reason)
    return metrics


def train_and_personalise(config: Config, source: Source, global_state: dict[str, torch.Tensor], request: Request,
                          policy: DevicePolicy | None = None, still_available=None) -> wire.TrainReply:
    """A training round (`fedllm.client_round.train_round`), then, with personal.every-round,
    Ditto's protocol: the device trains its personal adapter against the global one it just
    received. The personal steps are charged first, and skipped (not declined: the shared
    update is already paid for) when the budget cannot cover them."""
    reply = train_round(config, source, global_state, request, policy, still_available)
    if reply.delta is None or not config.personal.every_round or config.personal.method == "none":
        return reply
    data = client_data(config, source)
    spent = budget.spend(config, data.client_id, data.num_records, policy or DevicePolicy.from_config(config),
                         lambda ledger: [ledger.next_charge(request.server_round, config.personal.steps, "personal",
                                                            request.run_id)],
                         request.server_round, request.run_id)
    if not spent.admitted:
        return reply
    if wire.SPECIALIST in reply.metrics:  # a hive: the personal adapter follows the specialist just trained
        global_state = specialists(config, global_state)[int(reply.metrics[wire.SPECIALIST])]
    update_personal(config, worker_for(config), data, global_state, request, spent.ledger, "every-round")
    if spent.report is not None:  # the report the server gets shows the personal charge too
        reply.report = spent.report
        reply.metrics[wire.EPSILON] = reply.report["epsilon"]
    return reply


def personalise(config: Config, source: Source, global_state: dict[str, torch.Tensor], request: Request,
                global_metrics: dict[str, float] | None = None,
                policy: DevicePolicy | None = None) -> tuple[dict[str, float], dict | None]:
    """(held-out metrics of the personal and local-only adapters, the epsilon report when
    DP is on). What is personal (adapter, Ditto weights, local-only adapter) stays here."""
    worker = worker_for(config)
    data = client_data(config, source)
    train_examples, heldout = examples_for(worker, data, config.model.max_length)
    store = StateStore(state_root(config), data.client_id)
    p, pad, batch = config.personal, worker.tokenizer.pad_token_id, config.evaluate.batch_size

    load_adapter_state(worker.model, global_state)
    if global_metrics is None:  # the evaluate handler has them already
        global_metrics = evaluate(worker.model, heldout, batch, pad)
    kept = {**_prefixed("personal", global_metrics), **_prefixed("local", global_metrics),
            wire.PERSONAL_DECLINED: 1.0}  # what a device that personalises nothing reports

    # 1. Policy and charge: both trainings are charged before either runs.
    spent = budget.spend(config, data.client_id, data.num_records, policy or DevicePolicy.from_config(config),
                         lambda ledger: [ledger.next_charge(request.server_round, p.steps, kind, request.run_id)
                                         for kind in ("personal", "local-only")],
                         request.server_round, request.run_id)
    if not spent.admitted:
        return kept, spent.report
    ledger = spent.ledger

    # 2. The local-only baseline.
    load_adapter_state(worker.model, load_state(store.local_only_path) or worker.initial)
    fit_personal(config, worker, data, train_examples, "local-only", request, ledger)
    save_state(store.local_only_path, adapter_state(worker.model))
    local_metrics = evaluate(worker.model, heldout, batch, pad)

    # 3. The personal adapter.
    personal_metrics = update_personal(config, worker, data, global_state, request, ledger, "evaluate",
                                       heldout) or global_metrics

    # 4. The metrics, and the report of the charge.
    report = spent.report
    return {**_prefixed("personal", personal_metrics), **_prefixed("local", local_metrics),
            wire.PERSONAL_DECLINED: 0.0}, report
