"""A ClientApp whose first three partitions send malformed updates (for the e2e test).

Partition 0 sends NaN, partition 1 a wrong shape, partition 2 an unknown key, partition
3 crashes, partition 4 claims to be another client; the rest behave. It wraps the real ClientApp's train, so the honest clients are the real thing.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as real

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    if partition == 3:
        raise RuntimeError("simulated client crash")
    reply = real.train(msg, context)
    arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
    first = next(iter(arrays))
    if partition == 0:
        arrays[first][...] = np.nan
    elif partition == 1:
        arrays[first] = np.zeros((3, 3), dtype=np.float32)
    elif partition == 2:
        arrays["base_model.model.lm_head.weight"] = np.zeros(4, dtype=np.float32)
    elif partition == 4:
        reply.content["client"] = ConfigRecord({"client-id": "somebody-else", "declined": ""})
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)
