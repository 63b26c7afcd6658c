"""The fedllm ClientApp: receive the global adapter, train or evaluate, reply.

A train reply holds the adapter delta (local minus global), metrics and, under DP, the
client's epsilon report; nothing else: no text, no tokens, no per-record gradients, no
non-adapter tensor. A client whose budget would be exceeded declines: no delta at all.
Under user-level DP the delta is clipped to `user-dp.clip` here, on the device; under
secure aggregation `client.secure.secagg_mod` masks it before it leaves.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure import secagg_mod
from client.runtime import client_data, evaluate_client, personalise_client, train_client
from fedllm.config import KEYS, Config

app = ClientApp()


def _config(msg: Message, context: Context) -> tuple[Config, ConfigRecord]:
    record = msg.content["config"]
    config = Config.from_flat({k: v for k, v in record.items() if k in KEYS})
    if "state-dir" in context.node_config:  # a real device keeps its state where its operator says
        config = config.with_values({"privacy.state-dir": str(context.node_config["state-dir"])})
    return config, record


def _partition(context: Context):
    """Which client this node is: a device's own data (`data-path` in its node config),
    or a partition of the run's clients (simulation)."""
    if "data-path" in context.node_config:
        return dict(context.node_config)
    return int(context.node_config["partition-id"])


@app.train(mods=[secagg_mod])
def train(msg: Message, context: Context) -> Message:
    config, record = _config(msg, context)
    global_state = msg.content["arrays"].to_torch_state_dict()
    update = train_client(
        config, _partition(context), global_state, int(record["server-round"]),
        proximal_mu=float(record.get("proximal-mu", 0.0)), run_id=str(record.get("run-id", "")),
    )
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
    config, record = _config(msg, context)
    global_state = msg.content["arrays"].to_torch_state_dict()
    data, metrics = evaluate_client(config, _partition(context), global_state)
    report = None
    if record.get("personalise", False):
        personal, report = personalise_client(config, _partition(context), global_state,
                                              int(record["server-round"]), global_metrics=metrics,
                                              run_id=str(record.get("run-id", "")))
        metrics.update(personal)
    content = RecordDict({"metrics": MetricRecord({"num-examples": len(data.heldout), **metrics}),
                          "client": ConfigRecord({"client-id": data.client_id})})
    if report is not None:  # personal steps were charged: the server's copy of the report follows
        content["privacy"] = ConfigRecord({"report": json.dumps(report)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? Lets the server sample and evaluate by client, reproducibly."""
    config, _ = _config(msg, context)
    data = client_data(config, _partition(context))
    content = RecordDict({"metrics": MetricRecord({"num-records": data.num_records, "num-heldout": len(data.heldout)}),
                          "client": ConfigRecord({"client-id": data.client_id})})
    return Message(content=content, reply_to=msg)
