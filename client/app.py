"""The fedllm ClientApp: Flower messages in, `fedllm.device_requests` called, records out.

What a device does is in the library (`fedllm.device_requests`, `fedllm.client_round`,
`fedllm.personal_round`); this module only turns the request's records into plain data
and the answer into records in the wire contract (`fedllm.messages`): the delta, metrics
and, under DP, the epsilon report; nothing else. Under secure aggregation
`client.secure.secagg_mod` masks the delta (and the training metrics) before it leaves.

On a deployed device (`fedllm client`) the request goes to the device's resident worker
(`fedllm.deploy.device_worker`), which keeps the model loaded across messages; Flower runs
this module in a fresh process per message, so it imports no torch. In a simulation it
runs in the simulation's worker process, where the model stays loaded anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure import secagg_mod
from fedllm import messages as wire

app = ClientApp()


def _request(msg: Message, context: Context):
    from fedllm.device_requests import DeviceRequest

    arrays = msg.content.array_records.get(wire.ARRAYS)
    return DeviceRequest(
        config=dict(msg.content[wire.CONFIG].items()),
        arrays={k: a.numpy() for k, a in arrays.items()} if arrays is not None else {},
        node=dict(context.node_config), run_config=dict(context.run_config), run_id=int(context.run_id))


def _answer(kind: str, msg: Message, context: Context):
    """The device's answer: from its resident worker when it has one, else computed here."""
    folder = context.node_config.get(wire.NODE_WORKER)
    request = _request(msg, context)
    if folder:
        from fedllm.deploy.device_worker import call

        return call(Path(str(folder)), kind, request)
    from fedllm import device_requests

    return device_requests.HANDLERS[kind](request)


def _client(client_id: str, declined: str | None = None) -> ConfigRecord:
    return ConfigRecord({wire.CLIENT_ID: client_id} if declined is None else
                        {wire.CLIENT_ID: client_id, wire.DECLINED: declined})


def _train_content(reply: wire.TrainReply) -> RecordDict:
    content = RecordDict({wire.CLIENT: _client(reply.client_id, reply.declined)})
    if reply.report is not None:
        content[wire.PRIVACY] = ConfigRecord({wire.REPORT: json.dumps(reply.report)})
    if reply.delta is not None:
        content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in reply.delta.items()})
        content[wire.METRICS] = MetricRecord(reply.metrics)
    return content


@app.train(mods=[secagg_mod])
def train(msg: Message, context: Context) -> Message:
    return Message(content=_train_content(_answer("train", msg, context)), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metrics of the global adapter; when asked (after the last round), also of
    this device's personalised adapter and of its local-only baseline."""
    reply = _answer("evaluate", msg, context)
    content = RecordDict({wire.METRICS: MetricRecord(reply.metrics), wire.CLIENT: _client(reply.client_id)})
    if reply.report is not None:  # personal steps were charged: the server's copy of the report follows
        content[wire.PRIVACY] = ConfigRecord({wire.REPORT: json.dumps(reply.report)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? Lets the server sample and evaluate by client, reproducibly."""
    client_id, metrics = _answer("query", msg, context)
    return Message(content=RecordDict({wire.METRICS: MetricRecord(metrics), wire.CLIENT: _client(client_id)}),
                   reply_to=msg)
