"""The fedllm ClientApp: receive the global adapter, train or evaluate, reply.

A train reply holds the adapter delta (local minus global), metrics and, under DP, the
client's epsilon report; nothing else: no text, no tokens, no per-record gradients, no
non-adapter tensor. A client whose budget would be exceeded declines: no delta at all.
Under user-level DP the delta is clipped to `user-dp.clip` here, on the device; under
secure aggregation `client.secure.secagg_mod` masks it before it leaves.
"""

from __future__ import annotations

import json
import math
import os
import re

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure import secagg_mod
from client.runtime import client_data, evaluate_client, personalise_client, train_client
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.privacy.policy import DevicePolicy, device_config
from fedllm.rundir import flwr_run_dir

app = ClientApp()
LOCAL_CONFIG_ENV = "FEDLLM_DEVICE_CONFIG"  # a simulation's own config, handed to its workers by the runner
MAX_ROUND = 10**9


def _local(context: Context) -> tuple[dict, DevicePolicy]:
    """(this device's own values of the local keys, its policy), from its own side only.

    A real device (`data-path` in its node config) has its operator's flags; its run
    config comes from the server, so it is not read. A simulated device has the run's
    config: Flower's run config under `flwr run`, or the runner's (`fedllm simulate`)."""
    node = context.node_config
    if "data-path" in node:
        local = {"privacy.state-dir": str(node.get("state-dir", "")), "model.name": str(node.get("model", "builtin")),
                 "model.cache-dir": str(node.get("cache-dir", ""))}
        return local, DevicePolicy.from_node_config(node)
    if context.run_config:
        config = Config.from_flat(dict(context.run_config))
        if not config.run_dir:  # the ServerApp derives the same one (server.app)
            config = config.with_values({"run-dir": str(flwr_run_dir(context.run_id))})
    elif os.environ.get(LOCAL_CONFIG_ENV):
        config = Config.from_flat(json.loads(os.environ[LOCAL_CONFIG_ENV]))
    else:
        raise FedllmError(f"this simulated device has no config of its own (run config or {LOCAL_CONFIG_ENV})")
    return config.to_flat(), DevicePolicy.from_config(config)


def _config(msg: Message, context: Context) -> tuple[Config, ConfigRecord, DevicePolicy]:
    """The config this device acts on: the server's request, checked, with local keys its own."""
    record = msg.content["config"]
    local, policy = _local(context)
    return device_config(dict(record.items()), local), record, policy


def _round(record: ConfigRecord) -> int:
    value = record.get("server-round", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise FedllmError(f"server-round={value!r}: expected an integer in 0..{MAX_ROUND}")
    return value


def _run_id(record: ConfigRecord) -> str:
    """The server's run id, written into ledger entries: short and plain, or refused."""
    value = str(record.get("run-id", ""))
    if not re.fullmatch(r"[A-Za-z0-9_-]{0,64}", value):
        raise FedllmError("run-id: expected at most 64 letters, digits, '-' or '_'")
    return value


def _proximal_mu(record: ConfigRecord) -> float:
    value = record.get("proximal-mu", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise FedllmError(f"proximal-mu={value!r}: expected a finite number >= 0")
    return float(value)


def _refusal(msg: Message, context: Context, why: str) -> Message:
    """A request this device cannot even read: a reply that says why, nothing charged."""
    local, _ = _local(context)
    data = client_data(device_config({}, local), _partition(context))
    content = RecordDict({"client": ConfigRecord({"client-id": data.client_id, "declined": f"refused: {why}"})})
    return Message(content=content, reply_to=msg)


def _partition(context: Context):
    """Which client this node is: a device's own data (`data-path` in its node config),
    or a partition of the run's clients (simulation)."""
    if "data-path" in context.node_config:
        return dict(context.node_config)
    return int(context.node_config["partition-id"])


@app.train(mods=[secagg_mod])
def train(msg: Message, context: Context) -> Message:
    try:
        config, record, policy = _config(msg, context)
        server_round, run_id, mu = _round(record), _run_id(record), _proximal_mu(record)
    except FedllmError as exc:
        return _refusal(msg, context, str(exc))
    global_state = msg.content["arrays"].to_torch_state_dict()
    update = train_client(config, _partition(context), global_state, server_round, proximal_mu=mu, run_id=run_id,
                          policy=policy)
    content = RecordDict({"client": ConfigRecord({"client-id": update.data.client_id, "declined": update.declined})})
    if update.privacy is not None:
        content["privacy"] = ConfigRecord({"report": json.dumps(update.privacy)})
    if update.delta is not None:
        delta = update.delta
        if config.user_dp.enabled:
            from fedllm.privacy.user_level import clip_delta

            delta, _ = clip_delta(delta, config.user_dp.clip)  # the norm itself stays on the device
        content["arrays"] = ArrayRecord(delta)
        content["metrics"] = MetricRecord({
            "num-examples": update.data.num_records, "train-loss": update.result.loss,
            "steps": update.result.steps, "epsilon": update.privacy["epsilon"] if update.privacy else 0.0,
        })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metrics of the global adapter; when asked (after the last round), also of
    this device's personalised adapter and of its local-only baseline."""
    config, record, policy = _config(msg, context)
    server_round, run_id = _round(record), _run_id(record)
    global_state = msg.content["arrays"].to_torch_state_dict()
    data, metrics = evaluate_client(config, _partition(context), global_state)
    report = None
    if record.get("personalise", False) is True:
        personal, report = personalise_client(config, _partition(context), global_state, server_round,
                                              global_metrics=metrics, run_id=run_id, policy=policy)
        metrics.update(personal)
    content = RecordDict({"metrics": MetricRecord({"num-examples": len(data.heldout), **metrics}),
                          "client": ConfigRecord({"client-id": data.client_id})})
    if report is not None:  # personal steps were charged: the server's copy of the report follows
        content["privacy"] = ConfigRecord({"report": json.dumps(report)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? Lets the server sample and evaluate by client, reproducibly."""
    config, _, _ = _config(msg, context)
    data = client_data(config, _partition(context))
    content = RecordDict({"metrics": MetricRecord({"num-records": data.num_records, "num-heldout": len(data.heldout)}),
                          "client": ConfigRecord({"client-id": data.client_id})})
    return Message(content=content, reply_to=msg)
