"""fedllm's real ClientApp behind Flower's SecAgg+ mod, with partition 0 hostile: after its
vector is masked and quantised (outside the mod, where nothing checks it) it adds 2**31
to every adapter coordinate in round 1, and three devices' worth to the first specialist's
count in round 2 (fedllm.secure_metrics); round 3 it is honest."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client import app as real
from client.secure import secagg_mod
from fedllm import secure_metrics

app = ClientApp()


def hostile(msg: Message, context: Context, call_next) -> Message:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS \
            or int(context.node_config["partition-id"]) != 0:
        return call_next(msg, context)
    fit_config = msg.content["fitins.config"]  # read before the mod consumes the request
    server_round, bits = int(fit_config["server-round"]), int(fit_config.get("secagg.quantization-bits", 22))
    reply = call_next(msg, context)
    masked = [bytes_to_ndarray(b) for b in reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    if server_round == 1:  # [weight, adapter tensors..., metrics]: shift every adapter coordinate
        masked[1:-1] = [_add(a, 2**31) for a in masked[1:-1]]
    elif server_round == 2:
        levels = np.zeros(masked[-1].shape, np.int64)
        levels.reshape(-1)[len(secure_metrics.FIELDS)] = 3 * 2**bits // 2  # + 3 x c on chose-0
        masked[-1] = _add(masked[-1], levels)
    reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in masked]
    return reply


def _add(array: np.ndarray, offset) -> np.ndarray:
    return ((array.astype(np.int64) + offset) % 2**32).astype(array.dtype)


app.train(mods=[hostile, secagg_mod])(real.train)
app.evaluate()(real.evaluate)
app.query()(real.query)
