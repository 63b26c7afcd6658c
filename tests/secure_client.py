"""fedllm's real ClientApp with two observers around Flower's SecAgg+ mod, and dropouts.

`inner` sees fedllm's train reply (the clipped delta, before masking); `outer` sees what
actually leaves the device (the masked, quantised vector). In every round the two
partitions `2r % n` and `2r+1 % n` crash in the middle of the round, after keys were
shared and after training, before they upload: 20% of the clients when all 10 are sampled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client import app as real
from client.secure import secagg_mod

app = ClientApp()


def _where(context: Context, run_dir: str, server_round: int, kind: str) -> Path:
    path = Path(run_dir) / "observed" / f"round-{server_round}" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path / f"{int(context.node_config['partition-id'])}.npz"


def outer(msg: Message, context: Context, call_next) -> Message:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
        return call_next(msg, context)
    fit_config = msg.content["fitins.config"]
    server_round, n = int(fit_config["server-round"]), int(fit_config["num-clients"])
    partition = int(context.node_config["partition-id"])
    reply = call_next(msg, context)  # trains
    if partition in ((2 * server_round) % n, (2 * server_round + 1) % n):
        raise RuntimeError("simulated dropout in the middle of a secure round")
    masked = [bytes_to_ndarray(b) for b in reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    np.savez(_where(context, str(fit_config["run-dir"]), server_round, "masked"), *masked)
    # ... and everything else that leaves with it, in the clear: record -> field names
    plain = {name: sorted(record) for name, record in [*reply.content.config_records.items(),
                                                        *reply.content.metric_records.items()]
             if name != RECORD_KEY_CONFIGS}
    plain["arrays"] = sorted(k for record in reply.content.array_records.values() for k in record)
    _where(context, str(fit_config["run-dir"]), server_round, "plain").with_suffix(".json").write_text(
        json.dumps(plain))
    return reply


def inner(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    config = msg.content["config"]
    delta = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    where = _where(context, str(config["run-dir"]), int(config["server-round"]), "clipped")
    np.savez(where, **delta)
    where.with_suffix(".json").write_text(json.dumps(dict(reply.content["metrics"])))  # a hive's choice among them
    return reply


app.train(mods=[outer, secagg_mod, inner])(real.train)
app.evaluate()(real.evaluate)
app.query()(real.query)
