"""The fedllm ClientApp: Flower messages in, `fedllm.client_round` called, records out.

What a device does is in the library (`fedllm.client_round`, `fedllm.personal_round`);
this module only reads the request (checked: round, run id, proximal term, the config
with the device's own local keys and policy) and writes the reply in the wire contract
(`fedllm.messages`): the delta, metrics and, under DP, the epsilon report; nothing else.
Under secure aggregation `client.secure.secagg_mod` masks the delta before it leaves.
"""

from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure import secagg_mod
from fedllm import messages as wire
from fedllm.client_round import Request, client_data, evaluate_round, node_local, train_round
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.privacy.policy import DevicePolicy, device_config
from fedllm.rundir import flwr_run_dir
from fedllm.simulate import DEVICE_CONFIG_ENV

app = ClientApp()
MAX_ROUND = 10**9


def _local(context: Context) -> tuple[dict, DevicePolicy]:
    """(this device's own values of the local keys, its policy), from its own side only.

    A real device (`data-path` in its node config) has its operator's flags; its run
    config comes from the server, so it is not read. A simulated device has the config
    `fedllm simulate` gives its devices, or, under a plain `flwr run`, Flower's run config."""
    node = context.node_config
    if wire.NODE_DATA_PATH in node:
        return node_local(node), DevicePolicy.from_node_config(node)
    if os.environ.get(DEVICE_CONFIG_ENV):  # `fedllm simulate` states its devices' config
        config = _own_config(os.environ[DEVICE_CONFIG_ENV])
    elif context.run_config:  # a plain `flwr run`: the devices take the run's config
        config = Config.from_flat(dict(context.run_config))
        if not config.run_dir:  # the ServerApp derives the same one (server.app)
            config = config.with_values({"run-dir": str(flwr_run_dir(context.run_id))})
    else:
        raise FedllmError(f"this simulated device has no config of its own (run config or {DEVICE_CONFIG_ENV})")
    return config.to_flat(), DevicePolicy.from_config(config)


@lru_cache(maxsize=4)
def _own_config(text: str) -> Config:
    """A simulated device's own config, parsed and checked once per worker, not per message."""
    return Config.from_flat(json.loads(text))


def _config(msg: Message, context: Context) -> tuple[Config, ConfigRecord, DevicePolicy]:
    """The config this device acts on: the server's request, checked, with local keys its own."""
    record = msg.content[wire.CONFIG]
    local, policy = _local(context)
    return device_config(dict(record.items()), local), record, policy


def _round(record: ConfigRecord) -> int:
    value = record.get(wire.SERVER_ROUND, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise FedllmError(f"server-round={value!r}: expected an integer in 0..{MAX_ROUND}")
    return value


def _run_id(record: ConfigRecord) -> str:
    """The server's run id, written into ledger entries: short and plain, or refused."""
    value = str(record.get(wire.RUN_ID, ""))
    if not re.fullmatch(r"[A-Za-z0-9_-]{0,64}", value):
        raise FedllmError("run-id: expected at most 64 letters, digits, '-' or '_'")
    return value


def _proximal_mu(record: ConfigRecord) -> float:
    value = record.get(wire.PROXIMAL_MU, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise FedllmError(f"proximal-mu={value!r}: expected a finite number >= 0")
    return float(value)


def _refusal(msg: Message, context: Context, why: str) -> Message:
    """A request this device cannot even read: a reply that says why, nothing charged."""
    local, _ = _local(context)
    data = client_data(device_config({}, local), _partition(context))
    return Message(content=_train_content(wire.TrainReply(data.client_id, declined=f"refused: {why}")), reply_to=msg)


def _partition(context: Context):
    """Which client this node is: a device's own data (`data-path` in its node config),
    or a partition of the run's clients (simulation)."""
    if wire.NODE_DATA_PATH in context.node_config:
        return dict(context.node_config)
    return int(context.node_config[wire.NODE_PARTITION])


def _client(client_id: str, declined: str | None = None) -> ConfigRecord:
    return ConfigRecord({wire.CLIENT_ID: client_id} if declined is None else
                        {wire.CLIENT_ID: client_id, wire.DECLINED: declined})


def _train_content(reply: wire.TrainReply) -> RecordDict:
    content = RecordDict({wire.CLIENT: _client(reply.client_id, reply.declined)})
    if reply.report is not None:
        content[wire.PRIVACY] = ConfigRecord({wire.REPORT: json.dumps(reply.report)})
    if reply.delta is not None:
        content[wire.ARRAYS] = ArrayRecord(reply.delta)
        content[wire.METRICS] = MetricRecord(reply.metrics)
    return content


@app.train(mods=[secagg_mod])
def train(msg: Message, context: Context) -> Message:
    try:
        config, record, policy = _config(msg, context)
        request = Request(_round(record), _run_id(record), _proximal_mu(record))
    except FedllmError as exc:
        return _refusal(msg, context, str(exc))
    reply = train_round(config, _partition(context), msg.content[wire.ARRAYS].to_torch_state_dict(), request, policy)
    return Message(content=_train_content(reply), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metrics of the global adapter; when asked (after the last round), also of
    this device's personalised adapter and of its local-only baseline."""
    from fedllm.personal_round import personalise

    config, record, policy = _config(msg, context)
    request = Request(_round(record), _run_id(record))
    global_state = msg.content[wire.ARRAYS].to_torch_state_dict()
    reply = evaluate_round(config, _partition(context), global_state, request)
    if record.get(wire.PERSONALISE, False) is True:
        personal, reply.report = personalise(config, _partition(context), global_state, request,
                                             global_metrics=reply.metrics, policy=policy)
        reply.metrics.update(personal)
    content = RecordDict({wire.METRICS: MetricRecord(reply.metrics), wire.CLIENT: _client(reply.client_id)})
    if reply.report is not None:  # personal steps were charged: the server's copy of the report follows
        content[wire.PRIVACY] = ConfigRecord({wire.REPORT: json.dumps(reply.report)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? Lets the server sample and evaluate by client, reproducibly."""
    config, _, _ = _config(msg, context)
    data = client_data(config, _partition(context))
    content = RecordDict({wire.METRICS: MetricRecord({wire.NUM_RECORDS: data.num_records,
                                                       wire.NUM_HELDOUT: len(data.heldout)}),
                          wire.CLIENT: _client(data.client_id)})
    return Message(content=content, reply_to=msg)
