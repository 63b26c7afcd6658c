"""A ClientApp that is fedllm's own, plus a recorder of everything each reply carries.

Each reply's tensors (keys, shapes), record names and the keys of the global adapter it
was answering are appended to <run-dir>/sent.jsonl, for the test to inspect.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as real

app = ClientApp()


def _record(msg: Message, reply: Message, kind: str) -> Message:
    run_dir = Path(str(msg.content["config"]["run-dir"]))
    received = sorted(msg.content["arrays"].keys()) if "arrays" in msg.content.array_records else []
    sent = {name: {k: list(a.shape) for k, a in record.items()} for name, record in reply.content.array_records.items()}
    entry = {"kind": kind, "received": received, "sent_arrays": sent,
             "records": sorted([*reply.content.array_records, *reply.content.metric_records,
                                *reply.content.config_records]),
             "metric_keys": sorted(k for r in reply.content.metric_records.values() for k in r.keys()),
             "fields": {name: sorted(record.keys()) for records in (reply.content.array_records,
                                                                   reply.content.metric_records,
                                                                   reply.content.config_records)
                        for name, record in records.items()}}
    with open(run_dir / "sent.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _record(msg, real.train(msg, context), "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _record(msg, real.evaluate(msg, context), "evaluate")


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _record(msg, real.query(msg, context), "query")
