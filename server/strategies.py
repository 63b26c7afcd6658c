"""Flower strategies over adapter *deltas*.

Clients send deltas (local minus global). Flower's strategies aggregate *weights*, so
each accepted (validated) delta is turned back into `global + delta` before the strategy
sees it; every strategy, the robust ones included, then behaves exactly as Flower defines
it (a coordinate-wise median of `global + delta` is `global +` the median of the deltas).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy)

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
    if s.name == "fedyogi":
        return FedYogi(**common, eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    if s.name == "fedadagrad":
        return FedAdagrad(**common, eta=s.server_lr, tau=s.tau)
    if s.name == "fedavgm":
        return FedAvgM(**common, server_momentum=s.server_momentum)
    if s.name == "fedprox":
        return FedProx(**common, proximal_mu=s.proximal_mu)
    if s.name == "fedmedian":
        return FedMedian(**common)
    if s.name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=s.trim_beta)
    if s.name == "krum":
        return Krum(**common, num_malicious_nodes=s.num_malicious)
    if s.name == "multikrum":
        return MultiKrum(**common, num_malicious_nodes=s.num_malicious, num_nodes_to_select=s.num_selected
                         or max(1, config.clients_per_round - s.num_malicious))
    if s.name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=s.num_malicious)
    return FedAvg(**common)


def weights_message(global_arrays: ArrayRecord, delta, weight: float) -> Message:
    """A checked delta as the reply a Flower strategy aggregates: `global + delta`, weighted."""
    weights = ArrayRecord({k: Array(global_arrays[k].numpy() + np.asarray(delta[k], np.float32))
                           for k in global_arrays.keys()})
    return Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": weight})}),
                   dst_node_id=0, message_type=MessageType.TRAIN)
