"""Flower strategies over adapter *deltas*.

Clients send deltas (local minus global). Flower's strategies aggregate *weights*, so
each accepted delta is turned back into `global + delta` before the strategy sees it;
FedAvg, FedAdam and FedProx then behave exactly as Flower defines them.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedllm.config import Config


def make_strategy(config: Config) -> Strategy:
    """The configured strategy. fedllm samples the clients (server.sampling) and offers the
    strategy only those, so it takes all it is offered."""
    s = config.strategy
    common = dict(
        fraction_train=1.0,
        min_train_nodes=1,
        min_available_nodes=1,
        fraction_evaluate=0.0,  # evaluation uses a fixed client set, see server.rounds
    )
    if s.name == "fedadam":
        return FedAdam(**common, eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    if s.name == "fedprox":
        return FedProx(**common, proximal_mu=s.proximal_mu)
    return FedAvg(**common)


def as_weights(msg: Message, global_arrays: ArrayRecord) -> Message:
    """Replace a validated reply's delta by `global + delta`, keeping its metrics."""
    delta = next(iter(msg.content.array_records.values()))
    weights = ArrayRecord({k: Array(global_arrays[k].numpy() + delta[k].numpy()) for k in global_arrays.keys()})
    metrics = next(iter(msg.content.metric_records.values()))
    msg.content = RecordDict({"arrays": weights, "metrics": metrics})
    return msg
