import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.validation import AdapterSpec, check_train_reply

SPEC = AdapterSpec({"a.lora_A.weight": (2, 4), "a.lora_B.weight": (4, 2)})


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _reply(arrays=None, metrics=None, node=7):
    if arrays is None:
        arrays = {k: np.full(s, 0.5, dtype=np.float32) for k, s in SPEC.shapes.items()}
    if metrics is None:
        metrics = {"num-examples": 10, "train-loss": 1.0, "steps": 3, "epsilon": 0.0}
    sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics), "client": ConfigRecord({"client-id": "x"})})
    return Message(content=content, reply_to=sent)


def _good():
    return {k: np.full(s, 0.5, dtype=np.float32) for k, s in SPEC.shapes.items()}


def test_a_good_reply_passes():
    assert check_train_reply(_reply(), SPEC).accepted


@pytest.mark.parametrize("mutate, reason", [
    (lambda a: a.__setitem__("a.lora_A.weight", np.full((2, 4), np.nan, np.float32)), "non-finite"),
    (lambda a: a.__setitem__("a.lora_A.weight", np.full((2, 4), np.inf, np.float32)), "non-finite"),
    (lambda a: a.__setitem__("a.lora_A.weight", np.zeros((4, 4), np.float32)), "shape"),
    (lambda a: a.__setitem__("a.lora_A.weight", np.full((2, 4), 1e30, np.float32).astype(np.float64)), "dtype"),
    (lambda a: a.__setitem__("a.lora_A.weight", np.zeros((2, 4), np.float64)), "dtype"),
    (lambda a: a.__setitem__("lm_head.weight", np.zeros(3, np.float32)), "unknown \\['lm_head.weight'\\]"),
    (lambda a: a.pop("a.lora_B.weight"), "missing \\['a.lora_B.weight'\\]"),
])
def test_bad_arrays_are_named(mutate, reason):
    arrays = _good()
    mutate(arrays)
    assert re.search(reason, check_train_reply(_reply(arrays), SPEC).reason)


@pytest.mark.parametrize("metrics, reason", [
    ({"num-examples": 10, "train-loss": 1.0, "epsilon": 0.0}, "metric keys"),
    ({"num-examples": 10, "train-loss": 1.0, "steps": 3, "epsilon": 0.0, "extra": 1}, "metric keys"),
    ({"num-examples": 0, "train-loss": 1.0, "steps": 3, "epsilon": 0.0}, "num-examples"),
    ({"num-examples": 10, "train-loss": float("nan"), "steps": 3, "epsilon": 0.0}, "train-loss"),
])
def test_bad_metrics_are_named(metrics, reason):
    assert reason in check_train_reply(_reply(metrics=metrics), SPEC).reason


def test_error_reply_is_dropped_with_its_reason():
    sent = Message(content=RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    reply = Message(Error(code=0, reason="client crashed"), reply_to=sent)
    assert "client crashed" in check_train_reply(reply, SPEC).reason
