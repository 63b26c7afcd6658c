"""One training round under Flower's SecAgg+, driven from fedllm's round loop.

Flower 1.42 runs SecAgg+ only through its legacy stack: `SecAggPlusWorkflow` takes a
`LegacyContext` whose legacy `Strategy` hands out the fit instructions and receives the
unmasked aggregate. fedllm keeps one server: sampling, validation, checkpoints and the
configured Message-API strategy stay in `server.rounds`; this module only lends the
workflow a minimal legacy strategy (`_Handoff`) that gives it the instructions fedllm
chose and hands back what it aggregated. The cryptography is all Flower's.

Every contributing client is weighted 1 (`max_weight` 1; a decline 0 unless user-level DP
counts it): the workflow returns the mean over the weight, and this module hands back the
sum (`mean * weight`, the weight counted from the plain replies), which is what the
protocol hides each delta in, once `server.secure_check` finds it possible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedllm import messages as wire
from fedllm import secure_metrics
from fedllm.config import Config
from fedllm.secure_metrics import clipping_range
from server import transport
from server.secure_check import aggregate_problem

log = logging.getLogger("fedllm.server")
KEYS_FIELD = wire.ADAPTER_KEYS


def shares_and_threshold(config: Config, sampled: int) -> tuple[int, int]:
    """(shares, threshold) for a round with `sampled` clients; shares odd when below all."""
    shares = min(config.secagg.num_shares or sampled, sampled)
    if shares < sampled and shares % 2 == 0:
        shares += 1
    threshold = config.secagg.threshold or max(2, math.ceil(2 * shares / 3))
    return shares, threshold


def quantization(config: Config, contributors: int, num_values: int) -> dict[str, float]:
    """The stated quantisation error. Flower rounds each coordinate stochastically onto a
    grid of step 2c/2**bits; each client's error is below one step, so the mean's is too
    and the sum's is below contributors * step (per coordinate; times sqrt(d) in L2)."""
    c = clipping_range(config)
    step = 2 * c / 2**config.secagg.quantization_bits
    return {"clipping_range": c, "step": step, "max_error_per_coordinate_of_sum": contributors * step,
            "max_l2_error_of_sum": contributors * step * math.sqrt(num_values)}


class _Handoff(Strategy):
    """The legacy strategy SecAggPlusWorkflow calls: fedllm's instructions in, the
    aggregate out. Evaluation never goes through it."""

    def __init__(self, instructions: list[tuple[GridClientProxy, FitIns]]):
        self.instructions = instructions
        self.results: list[tuple[Any, FitRes]] = []
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)  # the same aggregate on every result
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _MeteredGrid:
    """The grid, counting the bytes each node sends (masked vectors, keys, shares), and
    pulling replies every 0.1 s (`server.transport`) for each SecAgg+ stage."""

    def __init__(self, grid: Grid):
        self._grid, self.sent = grid, {}

    def send_and_receive(self, messages, *, timeout=None):
        replies = transport.send_and_receive(self._grid, messages, timeout)
        for msg in replies:
            if not msg.has_error():
                node = msg.metadata.src_node_id
                self.sent[node] = self.sent.get(node, 0) + _content_bytes(msg.content)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _content_bytes(content: RecordDict) -> int:
    total = sum(a.numpy().nbytes for record in content.array_records.values() for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


@dataclass
class SecureRound:
    """What a SecAgg+ round gave the server: `total`, the sum of the deltas (None when the
    protocol halted or the sum was refused, `error` says why), `contributors`, the honest
    weight it was summed over (the devices that trained; every result under user-level
    DP), and each contributor's plain metrics."""

    total: dict[str, np.ndarray] | None
    replies: dict[int, dict[str, Any]]  # node -> FitRes plain fields (client id, declined, report)
    shares: int
    threshold: int
    sampled: int
    upload_bytes: dict[int, int] = field(default_factory=dict)
    error: str = ""
    contributors: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)  # fedllm.secure_metrics: sums only


def secure_round(grid: Grid, config: Config, server_round: int, nodes: list[int], arrays: ArrayRecord,
                 record: ConfigRecord) -> SecureRound:
    keys = sorted(arrays.keys())
    shares, threshold = shares_and_threshold(config, len(nodes))
    result = SecureRound(None, {}, shares, threshold, len(nodes))
    if len(nodes) < 3 or threshold >= shares:
        result.error = (f"{len(nodes)} sampled clients cannot run secure aggregation with {shares} shares and "
                        f"threshold {threshold}")
        return result
    parameters: Parameters = ndarrays_to_parameters([np.asarray(arrays[k].numpy(), np.float32) for k in keys])
    fit_config = {**dict(record), KEYS_FIELD: ",".join(keys)}
    metered = _MeteredGrid(grid)
    try:
        run_id = grid.run.run_id
    except Exception:  # a grid without a run (tests)
        run_id = 0
    handoff = _Handoff([(GridClientProxy(n, metered, run_id), FitIns(parameters, fit_config)) for n in nodes])
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=handoff, client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
    workflow = SecAggPlusWorkflow(
        num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0,
        clipping_range=clipping_range(config), quantization_range=2**config.secagg.quantization_bits,
        timeout=config.round_timeout,
    )
    try:
        workflow(metered, context)
    except Exception as exc:  # a hostile or broken reply must not take the server down
        log.exception("round %d: secure aggregation failed", server_round)
        result.error = f"secure aggregation failed: {exc!r}"
        return result
    result.upload_bytes = metered.sent
    result.replies = {proxy.node_id: dict(res.metrics) for proxy, res in handoff.results}
    if handoff.mean is None:
        result.error = "secure aggregation halted (too few clients left to unmask; see Flower's log)"
    elif len(handoff.mean) == len(keys) + 1 and all(np.isfinite(a).all() for a in handoff.mean):
        # The protocol divides by the weights the devices sent; honest ones send 1 for a
        # delta and 0 for a decline (1 under user-level DP: every sampled client counts).
        # Counted here from the plain replies, not taken from a client's claim.
        trained = sum(1 for m in result.replies.values() if not m.get(wire.DECLINED))
        weight = len(handoff.results) if config.user_dp.enabled else trained
        sums = {k: np.asarray(a, np.float64) * weight for k, a in zip(keys, handoff.mean)}
        metric_sum = np.asarray(handoff.mean[-1], np.float64) * weight
        c = clipping_range(config)
        why = aggregate_problem(sums, metric_sum, clip_range=c, bits=config.secagg.quantization_bits,
                                results=len(handoff.results), trained=trained, k=config.hive.k,
                                user_clip=config.user_dp.clip if config.user_dp.enabled else None)
        if why:
            log.warning("round %d: secure aggregate refused: %s", server_round, why)
            result.error = f"the unmasked sum is not one honest devices can produce, so the round is refused: {why}"
            return result
        result.contributors, result.total = weight, sums
        result.metric_sums = secure_metrics.decode(metric_sum, c, config.hive.k)
    else:
        result.error = (f"the unmasked aggregate has {len(handoff.mean)} tensors for {len(keys)} adapter tensors and "
                        "the metrics, or is not finite (every contributor declined?)")
    return result

