"""fedllm's ClientApp, plus a note of the Ray node each call ran on (Ray's own node id,
as the worker's runtime context reports it), in <run-dir>/nodes.txt."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as real

app = ClientApp()


def _note(msg: Message) -> None:
    import ray

    run_dir = Path(str(msg.content["config"]["run-dir"]))
    with open(run_dir / "nodes.txt", "a") as handle:
        handle.write(ray.get_runtime_context().get_node_id() + "\n")


@app.train()
def train(msg: Message, context: Context) -> Message:
    _note(msg)
    return real.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _note(msg)
    return real.evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    _note(msg)
    return real.query(msg, context)
