"""Hostile replies through the real server round code (`Server.train_round` / `evaluate`:
collection, validation and the aggregation steps),
on Flower's own Message and Array types with raw bytes where a wire message could carry
them. A seeded generator makes over 1,000 replies in 20+ families; each round mixes one
hostile reply with three honest ones. Nothing may raise, nothing hostile may be accepted,
every rejection has a reason, and the round ends exactly as the honest replies alone."""

from __future__ import annotations

import collections
import io
import json
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedllm.config import Config
from fedllm.privacy.ledger import Ledger
from fedllm.privacy.report import client_report
from fedllm import aggregate
from fedllm.messages import EVAL_METRICS
from server.checkpoint import save_server_state
from server.round_loop import Server
from server.sampling import NodeInfo

HONEST = (2, 3, 4)
HOSTILE = 1
NODES = [HOSTILE, *HONEST]
RECORDS, HELDOUT, STEPS = 30, 8, 2


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


class FakeGrid:
    """A grid whose replies are given: the server code under test sees Flower Messages."""

    def __init__(self):
        self.replies = {}  # node -> list of content (or Error) to answer with
        self.extra: list[Message] = []

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            for content in self.replies.get(msg.metadata.dst_node_id, []):
                out.append(Message(content, reply_to=msg))
        return [_over_the_wire(m) for m in out + self.extra]


def _over_the_wire(msg: Message) -> Message:
    """Through Flower's protobuf serialisation and back, bytes included, as a SuperLink relays it."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    wire = message_to_proto(msg).SerializeToString()
    back = ProtoMessage()
    back.ParseFromString(wire)
    return message_from_proto(back)


@pytest.fixture(scope="module")
def rounds(tiny_llama, tmp_path_factory):
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower logs every aggregation at INFO
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    run_dir = tmp_path_factory.mktemp("hostile")
    config = Config.from_flat({"model.name": str(tiny_llama), "num-clients": 4, "clients-per-round": 4,
                               "local-steps": STEPS, "evaluate.num-clients": 4, "lora.r": 2,
                               "privacy.delta": 1e-3})
    r = Server(FakeGrid(), config, run_dir)
    r.cohort.node_client = {n: f"client-{n}" for n in NODES}
    r.cohort.infos.update({n: NodeInfo(f"client-{n}", RECORDS, HELDOUT) for n in NODES})
    reports = {}
    for n in NODES:
        ledger = Ledger.open(run_dir / "ledgers" / f"{n}.json", client_id=f"client-{n}", num_records=RECORDS,
                             delta=1e-3, target_epsilon=8.0, sample_rate=0.2, max_grad_norm=1.0, planned_steps=10,
                             accountant="rdp")
        ledger.charge([ledger.next_charge(1, STEPS, run=r.run_id)])
        reports[n] = client_report(ledger, "", 8.0)
    r.test_reports = reports
    return r


def _delta(r, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in r.spec.shapes.items()}


def _content(r, node: int, delta, **over) -> RecordDict:
    report = r.test_reports[node]
    metrics = {"num-examples": RECORDS, "train-loss": 3.2, "steps": STEPS, "epsilon": report["epsilon"]}
    metrics.update(over.pop("metrics", {}))
    arrays = over.pop("arrays", None) or ArrayRecord({k: Array(v) for k, v in delta.items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "client": ConfigRecord({"client-id": f"client-{node}", "declined": ""}),
                          "privacy": ConfigRecord({"report": json.dumps(report)})})
    return content


def _raw(dtype: str, shape, data: bytes) -> Array:
    return Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=data)


def _families(r, rng: random.Random, nrng: np.random.Generator):
    """family -> a function making one hostile reply content (or a list of extra messages)."""
    key0 = sorted(r.spec.shapes)[0]
    shape0 = r.spec.shapes[key0]

    def with_array(array) -> RecordDict:
        delta = _delta(r, nrng)
        arrays = ArrayRecord({k: Array(v) for k, v in delta.items()})
        arrays[key0] = array
        return _content(r, HOSTILE, delta, arrays=arrays)

    def report_edit(edit) -> RecordDict:
        content = _content(r, HOSTILE, _delta(r, nrng))
        report = json.loads(json.dumps(r.test_reports[HOSTILE]))
        edit(report)
        content["privacy"] = ConfigRecord({"report": json.dumps(report, allow_nan=True)})
        return content

    def metric(**m) -> RecordDict:
        return _content(r, HOSTILE, _delta(r, nrng), metrics=m)

    def big(scale) -> RecordDict:
        return _content(r, HOSTILE, {k: np.full(s, scale, np.float32) for k, s in r.spec.shapes.items()})

    return {
        "non-finite": lambda: with_array(Array(np.full(shape0, rng.choice([np.nan, np.inf, -np.inf]), np.float32))),
        "declared-shape": lambda: with_array(Array(np.zeros((rng.randint(1, 9), rng.randint(1, 9)), np.float32))),
        "declared-dtype": lambda: with_array(Array(np.zeros(shape0, rng.choice(
            [np.int32, np.int64, np.bool_, np.float64, np.complex64, np.float16])))),
        "header-dtype-lie": lambda: with_array(_raw("float32", shape0, _npy(np.zeros(shape0, rng.choice(
            [np.int32, np.float64, np.complex64]))))),
        "header-shape-lie": lambda: with_array(_raw("float32", shape0, _npy(np.zeros(
            (shape0[0] + rng.randint(1, 5), shape0[1]), np.float32)))),
        "undecodable-bytes": lambda: with_array(_raw("float32", shape0, rng.randbytes(
            int(np.prod(shape0)) * 4 + rng.randint(1, 200)))),
        "empty-bytes": lambda: with_array(_raw("float32", shape0, b"")),
        "oversized-payload": lambda: with_array(_raw("float32", shape0, _npy(np.zeros(shape0, np.float32))
                                                     + b"\0" * rng.randint(5000, 2**20))),
        "huge-declared-count": lambda: with_array(_raw("float32", (10**6, 10**6), _npy(np.zeros(shape0, np.float32)))),
        "unknown-or-missing-keys": lambda: _content(r, HOSTILE, None, arrays=ArrayRecord(
            {(k if i else k + rng.choice([".evil", "_x", "/../lm_head"])): Array(np.zeros(s, np.float32))
             for i, (k, s) in enumerate(list(r.spec.shapes.items())[: rng.randint(1, len(r.spec.shapes))])})),
        "huge-norm": lambda: big(float(10 ** rng.uniform(2, 38))),
        "num-examples": lambda: metric(**{"num-examples": rng.choice([2**53, 2**31 - 1, RECORDS + 1, 0, -5])}),
        "metric-values": lambda: metric(**{rng.choice(["train-loss", "steps", "epsilon"]): rng.choice(
            [float("nan"), float("inf"), -1.0, 1e300, 10**15, [1.0, 2.0]])}),
        "metric-keys": lambda: _content(r, HOSTILE, _delta(r, nrng), metrics={f"extra-{rng.randint(0, 99)}": 1.0}),
        "wrong-steps": lambda: metric(steps=STEPS + rng.randint(1, 1000)),
        "client-id": lambda: _spoof(r, nrng, rng.choice(["client-2", "x" * 300, "", "a\nb" * 50])),
        "report-malformed": lambda: _bad_report_text(r, nrng, rng),
        "report-fields": lambda: report_edit(lambda rep: rep.__setitem__(
            rng.choice(["epsilon", "target_epsilon", "delta", "noise_multiplier"]),
            rng.choice([float("nan"), -1.0, True, "8", None, 1e308]))),
        "report-missing": lambda: report_edit(lambda rep: rep.pop(rng.choice(["client_id", "target_epsilon", "epsilon",
                                                                              "history", "genesis"]))),
        "report-chain": lambda: report_edit(lambda rep: rep["history"][0].__setitem__("steps", rng.randint(0, 1))),
        "report-other-client": lambda: report_edit(lambda rep: rep.__setitem__("client_id", "client-3")),
        "epsilon-mismatch": lambda: metric(epsilon=r.test_reports[HOSTILE]["epsilon"] / rng.uniform(2, 10)),
        "extra-records": lambda: _extra_record(r, nrng, rng),
        "declined-with-update": lambda: _declined_with_update(r, nrng),
        "error-reply": lambda: Error(code=rng.randint(0, 9), reason="boom" * rng.randint(1, 500)),
        "duplicate": "duplicate",
        "unsampled-node": "unsampled",
    }


def _spoof(r, nrng, client_id) -> RecordDict:
    content = _content(r, HOSTILE, _delta(r, nrng))
    content["client"] = ConfigRecord({"client-id": client_id, "declined": ""})
    return content


def _bad_report_text(r, nrng, rng) -> RecordDict:
    content = _content(r, HOSTILE, _delta(r, nrng))
    content["privacy"] = ConfigRecord({"report": rng.choice(["{", "[]", "NaN", "null", '"x"', "{}" + " " * 10,
                                                             json.dumps({"epsilon": float("nan")})])})
    return content


def _extra_record(r, nrng, rng) -> RecordDict:
    content = _content(r, HOSTILE, _delta(r, nrng))
    content[rng.choice(["tokens", "raw", "arrays2"])] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})
    return content


def _declined_with_update(r, nrng) -> RecordDict:
    content = _content(r, HOSTILE, _delta(r, nrng))
    content["client"] = ConfigRecord({"client-id": f"client-{HOSTILE}", "declined": "declined: sure"})
    return content


def _train(r, strategy_name: str, replies: dict, extra=()) -> tuple[dict, ArrayRecord]:
    r.arrays = r.initial
    r.grid.replies, r.grid.extra = replies, list(extra)
    r.config = r.cohort.config = r.config.with_values({"strategy.name": strategy_name})
    r.optimizer = aggregate.make_optimizer(r.config.strategy)
    record = r.train_round(1, NODES)
    return record, r.arrays


def test_over_a_thousand_hostile_replies_are_rejected_with_reasons(rounds):
    r = rounds
    r.initial = r.arrays
    rng, nrng = random.Random(1234), np.random.default_rng(1234)
    families = _families(r, rng, nrng)
    table = collections.Counter()
    tried = collections.Counter()
    for i in range(1100):
        family = sorted(families)[i % len(families)]
        honest = {n: [_content(r, n, _delta(r, nrng))] for n in HONEST}
        expected_record, expected = _train(r, "fedavg", honest)
        replies = dict(honest)
        extra = []
        maker = families[family]
        if maker == "duplicate":
            replies[HONEST[0]] = [honest[HONEST[0]][0], _content(r, HONEST[0], _delta(r, nrng))]
        elif maker == "unsampled":
            sent = Message(RecordDict(), dst_node_id=99, message_type=MessageType.TRAIN)
            extra = [Message(_content(r, HOSTILE, _delta(r, nrng)), reply_to=sent)]
        else:
            replies[HOSTILE] = [maker()]
        tried[family] += 1
        try:
            record, arrays = _train(r, "fedavg", replies, extra)
        except Exception:  # noqa: BLE001 - counted, then the test fails
            table[(family, "crashed")] += 1
            continue
        hostile_accepted = HOSTILE in [int(c.split("-")[1]) for c in record["clients"] if c.startswith("client-")]
        if maker == "duplicate":
            hostile_accepted = record["clients"].count(f"client-{HONEST[0]}") > 1
        if hostile_accepted or len(record["clients"]) != len(HONEST):
            table[(family, "wrongly accepted")] += 1
            continue
        same = all(np.array_equal(arrays[k].numpy(), expected[k].numpy()) for k in expected.keys())
        reasons = [d["reason"] for d in record["dropped"]]
        if not same or len(reasons) != 1 or not all(reasons):
            table[(family, "wrongly accepted")] += 1
            continue
        table[(family, "rejected")] += 1
    rows = [f"{f:<24} {tried[f]:>5} {table[(f, 'rejected')]:>8} {table[(f, 'crashed')]:>7} "
            f"{table[(f, 'wrongly accepted')]:>16}" for f in sorted(tried)]
    print("\nfamily                   tried rejected crashed wrongly accepted\n" + "\n".join(rows))
    assert sum(tried.values()) >= 1000 and len(tried) >= 15
    assert sum(table[(f, "crashed")] for f in tried) == 0, rows
    assert sum(table[(f, "wrongly accepted")] for f in tried) == 0, rows


@pytest.mark.parametrize("strategy", ["fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "fedavgm",
                                      "fedyogi", "fedadagrad"])
def test_a_1e30_delta_cannot_freeze_or_poison_any_strategy(rounds, strategy):
    r = rounds
    r.initial = getattr(r, "initial", r.arrays)
    nrng = np.random.default_rng(7)
    honest = {n: [_content(r, n, _delta(r, nrng))] for n in HONEST}
    _, expected = _train(r, strategy, honest)
    hostile = {**honest, HOSTILE: [_content(r, HOSTILE, {k: np.full(s, 1e30, np.float32)
                                                         for k, s in r.spec.shapes.items()})]}
    record, arrays = _train(r, strategy, hostile)
    assert "exceeds the bound" in record["dropped"][0]["reason"]
    assert all(np.isfinite(arrays[k].numpy()).all() for k in arrays.keys())
    assert all(np.array_equal(arrays[k].numpy(), expected[k].numpy()) for k in expected.keys())


def test_hostile_evaluate_replies_never_crash_the_summary(rounds):
    r = rounds
    good = {"num-examples": HELDOUT, **{m: 0.5 for m in EVAL_METRICS if m != "num-examples"}, "perplexity": 20.0,
            "loss": 3.0}
    bad = [{**good, "perplexity": 1.7e308}, {**good, "num-examples": 2**40}, {**good, "loss": float("nan")},
           {k: v for k, v in good.items() if k != "loss"}]
    r.grid.extra = []
    r.grid.replies = {n: [RecordDict({"metrics": MetricRecord(bad[i % len(bad)]),
                                      "client": ConfigRecord({"client-id": f"client-{n}"})})]
                      for i, n in enumerate(NODES)}
    everyone_dropped = r.evaluate(1, NODES)
    assert everyone_dropped == {"clients": {}, "mean": {}}
    summary = r.summary(everyone_dropped, everyone_dropped, 1.0)
    assert summary["global"] == {} and summary["evaluated_clients"] == []
    from fedllm.plots import format_summary

    assert "held-out perplexity" in format_summary(summary)  # nan, not a crash


def test_a_ledger_that_starts_over_is_flagged(rounds):
    r = rounds
    first = dict(r.test_reports[2])
    r.books.record_privacy("client-2", first)
    r.books.record_privacy("client-2", {**first, "genesis": "f" * 64})
    assert r.books.privacy_summary(True, r.run_id)["restarted_ledgers"] == {"client-2": ["f" * 64]}


def test_the_genesis_registry_flags_a_ledger_that_started_over_in_an_earlier_run(rounds, tmp_path):
    registry = tmp_path / "genesis.json"
    registry.write_text(json.dumps({"client-3": "a" * 64}))
    r = Server(FakeGrid(), rounds.config.with_values({"privacy.genesis-registry": str(registry)}), tmp_path / "run")
    r.books.record_privacy("client-3", rounds.test_reports[3])
    assert list(r.books.restarted_ledgers) == ["client-3"]
    save_server_state(r, 0)
    assert json.loads(registry.read_text()) == {"client-3": rounds.test_reports[3]["genesis"]}
    registry.write_text("[1, 2]")
    from fedllm.errors import FedllmError

    with pytest.raises(FedllmError, match="genesis-registry"):
        Server(FakeGrid(), r.config, tmp_path / "run2")
