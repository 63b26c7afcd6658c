"""`fedllm client --personalise-on-new-data`: when records were appended to a device's data
file since its personal adapter was trained, train it again at daemon start, on the
device alone, from the latest global adapter it kept, with the settings of the last
request it accepted (model.json). Its newest records are held out (fedllm.data.corpus
holds out the last lines), so the new data is what the personal model is evaluated on.

Under DP the steps are charged first, like any other, with the sample rate of the new
record count (`Ledger.note_records`); the charges carry run "device" (no server round
asked for them) and the round of the global adapter they started from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedllm.errors import FedllmError
from fedllm.state import StateStore

DEVICE_RUN = "device"  # the `run` of charges no server asked for


def personalise_on_new_data(node: Mapping[str, Any]) -> str:
    """Personalise again if the data grew; returns what happened, for the daemon's log."""
    from fedllm import messages as wire
    from fedllm.client_round import Request, client_data, node_local
    from fedllm.data.corpus import device_client
    from fedllm.personal import load_state
    from fedllm.personal_round import update_personal
    from fedllm.privacy import budget
    from fedllm.privacy.policy import DevicePolicy, device_config
    from fedllm.worker import worker_for

    quick = device_client(node[wire.NODE_DATA_PATH], str(node.get(wire.NODE_CLIENT_ID, "")), 1, 0.2)
    store = StateStore(node[wire.NODE_STATE_DIR], quick.client_id)
    info = store.model_info()
    if info is None or not isinstance(info.get("request"), dict):
        return "no global adapter kept yet: personalises after its first round"
    config = device_config(info["request"], node_local(node))
    if config.personal.method == "none":
        return "the last request had personal.method=none: nothing to personalise"
    data = client_data(config, node)
    total = data.num_records + len(data.heldout)
    personal = store.personal_info() or {}
    seen = int(personal.get("records_seen", info.get("records", total)))
    if total <= seen:
        return f"no new records ({total} records, {seen} seen by the personal adapter)"
    global_state = load_state(store.global_path)
    if global_state is None:
        raise FedllmError(f"{store.model_path} names a global adapter but {store.global_path} is missing")
    request = Request(int(info.get("global_round", 0)), DEVICE_RUN)
    spent = budget.spend(config, data.client_id, data.num_records, DevicePolicy.from_node_config(node),
                         lambda ledger: [ledger.next_charge(request.server_round, config.personal.steps, "personal",
                                                            request.run_id)],
                         request.server_round, request.run_id)
    if not spent.admitted:
        return f"not personalised: {spent.declined}"
    ledger = spent.ledger
    metrics = update_personal(config, worker_for(config), data, global_state, request, ledger, "new-data")
    spent = f"; epsilon {ledger.epsilon():.3f} of {ledger.target_epsilon:g}" if ledger is not None else ""
    return (f"personalised on {total - seen} new records ({total} in all, newest {len(data.heldout)} held out): "
            f"held-out loss {metrics['loss']:.4f}, version {store.personal_info()['version']}{spent}")
