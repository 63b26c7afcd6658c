"""The client half of SecAgg+: Flower's `secaggplus_mod`, in front of fedllm's train.

Flower's mod speaks the legacy FitIns/FitRes records; fedllm's train handler speaks
"arrays"/"config". `secagg_mod` translates at that boundary only, so the same handler
trains with or without secure aggregation. Training messages without SecAgg+ stages
pass straight through. The masking, key agreement and secret sharing are Flower's.

What leaves the device in a secure round: public keys, encrypted key shares, the
masked quantised delta with its training metrics (loss, steps, records: the server
learns their sums only, `fedllm.secure_metrics`), and in the clear its client id, a
decline's reason and its record-level epsilon report; the delta itself never does.
"""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedllm import messages as wire
from fedllm import secure_metrics
from fedllm.hive import slotted
from fedllm.secure_metrics import clipping_range

KEYS_FIELD = wire.ADAPTER_KEYS
REQUIRE = wire.NODE_REQUIRE_SECAGG  # node config: this device never uploads an unmasked update


class SecureAggregationRequired(RuntimeError):
    """A plain training request reached a device whose operator requires SecAgg+."""


def is_secure(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def _from_fitins(content: RecordDict) -> tuple[RecordDict, list[str]]:
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    keys = str(fitins.config[KEYS_FIELD]).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"secure round: {len(arrays)} tensors for {len(keys)} adapter keys")
    config = ConfigRecord({k: v for k, v in fitins.config.items() if k != KEYS_FIELD})
    return RecordDict({wire.ARRAYS: ArrayRecord({k: Array(a) for k, a in zip(keys, arrays)}),
                       wire.CONFIG: config}), keys


def _to_fitres(reply: RecordDict, global_arrays: ArrayRecord, keys: list[str], weight: int, clip: float,
               k: int = 1) -> RecordDict:
    """fedllm's train reply as FitRes: the delta in `keys` order (zeros when the client
    declined), then its training metrics encoded into one more tensor (fedllm.secure_metrics),
    all masked; weight 1 (0: a decline that must not count); in the clear only the client
    id, a decline's reason and the epsilon report."""
    delta = reply.array_records.get(wire.ARRAYS)
    trained = dict(reply.metric_records[wire.METRICS]) if delta is not None and wire.METRICS in reply.metric_records \
        else None
    chosen = int(trained[wire.SPECIALIST]) if trained and wire.SPECIALIST in trained else None
    # a hive: one slot per specialist, the delta in the chosen one (fedllm.hive.slotted)
    tensors = slotted({k: a.numpy() for k, a in delta.items()} if delta is not None else None, chosen, keys,
                      {k: global_arrays[k].numpy() for k in keys})
    tensors.append(secure_metrics.encode(trained, clip, k))  # masked with the delta: the server sees only sums
    plain: dict = {}
    for name in (wire.CLIENT, wire.PRIVACY):
        if name in reply.config_records:
            plain.update(reply.config_records[name])
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(tensors), weight, plain)
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def _secure_settings(request: ConfigRecord):
    """The request's secure-aggregation and user-level DP keys, checked (the server's
    values: they set the quantiser's range, which the server decodes with)."""
    from fedllm.config import Config

    keys = ("secagg.clipping-range", "user-dp.enabled", "user-dp.clip", "hive.k")
    return Config.from_flat({k: request[k] for k in keys if k in request})


def _train_in_fedllm_format(call_next: ClientAppCallable) -> ClientAppCallable:
    def call(msg: Message, context: Context) -> Message:
        msg.content, keys = _from_fitins(msg.content)
        global_arrays = msg.content[wire.ARRAYS]
        request = msg.content[wire.CONFIG]
        user_dp = bool(request.get("user-dp.enabled", False))
        settings = _secure_settings(request)
        clip = clipping_range(settings)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        declined = wire.ARRAYS not in reply.content.array_records
        # A decline sends zeros; weighted 0 unless user-level DP needs every sampled client counted.
        weight = 0 if declined and not user_dp else 1
        reply.content = _to_fitres(reply.content, global_arrays, keys, weight, clip, settings.hive.k)
        return reply

    return call


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for secure rounds; plain training otherwise, unless the
    device's operator requires secure aggregation (`fedllm client --require-secagg`):
    then the device refuses before training, so nothing is charged or sent."""
    if not is_secure(msg):
        if context.node_config.get(REQUIRE, False):
            raise SecureAggregationRequired(
                "this device requires secure aggregation (started with --require-secagg); the server asked for a "
                "plain update: run the server with secagg.enabled=true")
        return call_next(msg, context)
    flwr_log = logging.getLogger("flwr")
    if flwr_log.getEffectiveLevel() < logging.INFO:  # Flower logs every stage of every node at DEBUG
        flwr_log.setLevel(logging.INFO)
    return secaggplus_mod(msg, context, _train_in_fedllm_format(call_next))
