"""Aggregation steps over deltas, each alone and composed, without Flower's engine.

Each step is checked against a hand-computed expectation; the server optimizers and
robust rules also against Flower's own strategies fed the same replies (`global + delta`).
"""

import itertools
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, FedYogi, Krum, MultiKrum)
from flwr.supercore.task_identity import TaskIdentity

from fedllm import aggregate
from fedllm.aggregate import Contribution, Plan
from fedllm.config import Config

SHAPES = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
COMMON = dict(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _full(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def _random(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _close(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        np.testing.assert_allclose(np.asarray(actual[k], np.float64), np.asarray(expected[k], np.float64),
                                   rtol=0, atol=atol)


# -- each step alone ------------------------------------------------------------------------
def test_weighted_mean_is_the_record_weighted_average():
    got = aggregate.weighted_mean([Contribution("a", _full(1.0), 1), Contribution("b", _full(4.0), 3)])
    _close(got, _full((1 * 1 + 3 * 4) / 4))
    assert aggregate.weighted_mean([]) is None


def test_total_and_secure_mean():
    contributions = [Contribution(c, _full(v)) for c, v in (("a", 1.0), ("b", 2.0), ("c", 6.0))]
    _close(aggregate.total(contributions, SHAPES), _full(9.0))
    _close(aggregate.total([], SHAPES), _full(0.0))
    _close(aggregate.secure_mean(_full(9.0), 3), _full(3.0))
    assert aggregate.secure_mean(_full(9.0), 0) is None


def test_over_clip_drops_only_deltas_above_the_user_level_clip():
    n = math.sqrt(sum(math.prod(s) for s in SHAPES.values()))  # the L2 norm of a delta of ones
    inside, edge, outside = Contribution("in", _full(0.5)), Contribution("edge", _full(1.0)), Contribution("out",
                                                                                                        _full(2.0))
    kept, dropped = aggregate.over_clip([inside, edge, outside], clip=n)
    assert [c.client for c in kept] == ["in", "edge"]
    assert [c for c, _ in dropped] == ["out"] and math.isclose(dropped[0][1], 2 * n, rel_tol=1e-6)


def test_noisy_mean_adds_gaussian_noise_to_the_sum_then_divides():
    rng, same = np.random.default_rng(5), np.random.default_rng(5)
    got = aggregate.noisy_mean(aggregate.total([Contribution("a", _full(1.0))], SHAPES), 0.3, 4.0, rng)
    expected = {k: (1.0 + same.normal(0.0, 0.3, size=s)) / 4.0 for k, s in SHAPES.items()}
    _close(got, expected, atol=1e-12)
    big = aggregate.noisy_mean({"x": np.zeros(200_000)}, 0.3, 1.0, np.random.default_rng(1))
    assert abs(big["x"].std() - 0.3) < 0.003  # the noise has the stated std


@pytest.mark.parametrize("name, flower, kwargs", [
    ("fedmedian", FedMedian(**COMMON), {}),
    ("fedtrimmedavg", FedTrimmedAvg(**COMMON, beta=0.2), {"trim_beta": 0.2}),
    ("krum", Krum(**COMMON, num_malicious_nodes=2), {"num_malicious": 2}),
    ("multikrum", MultiKrum(**COMMON, num_malicious_nodes=2, num_nodes_to_select=4),
     {"num_malicious": 2, "num_selected": 4}),
    ("bulyan", Bulyan(**COMMON, num_malicious_nodes=2), {"num_malicious": 2}),
])
def test_robust_rules_pick_what_flower_picks(name, flower, kwargs):
    global_arrays = _random(99)
    contributions = [Contribution(str(i), _random(i, scale=1 + i), 1) for i in range(11)]
    expected, _ = flower.aggregate_train(1, [_reply(global_arrays, c.delta, 1) for c in contributions])
    got = aggregate.robust_combine(name, contributions, **kwargs)
    _close({k: global_arrays[k] + got[k] for k in SHAPES}, {k: v.numpy() for k, v in expected.items()}, atol=1e-5)


def _reply(global_arrays, delta, weight) -> Message:
    weights = ArrayRecord({k: Array(np.asarray(global_arrays[k] + delta[k], np.float32)) for k in SHAPES})
    return Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": weight})}),
                   dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("name, flower", [
    ("fedavg", FedAvg(**COMMON)),
    ("fedprox", FedProx(**COMMON, proximal_mu=0.1)),
    ("fedavgm", FedAvgM(**COMMON, server_momentum=0.9)),
    ("fedadam", FedAdam(**COMMON, eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)),
    ("fedyogi", FedYogi(**COMMON, eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)),
    ("fedadagrad", FedAdagrad(**COMMON, eta=0.05, tau=1e-3)),
])
def test_server_optimizers_step_as_flowers_strategies(name, flower):
    """Three rounds of two replies each: the same global adapter as Flower's strategy."""
    config = Config.from_flat({"strategy.name": name, "strategy.server-lr": 0.05, "strategy.beta-1": 0.9,
                               "strategy.beta-2": 0.99, "strategy.tau": 1e-3, "strategy.server-momentum": 0.9,
                               "strategy.proximal-mu": 0.1})
    optimizer = aggregate.make_optimizer(config.strategy)
    ours = theirs = _random(0)
    for server_round in (1, 2, 3):
        deltas = [_random(10 * server_round + i, scale=0.1) for i in (1, 2)]
        arrays = ArrayRecord({k: Array(v) for k, v in theirs.items()})
        flower.configure_train(server_round, arrays, ConfigRecord({}), _NoGrid())
        result, _ = flower.aggregate_train(server_round, [_reply(theirs, d, w) for d, w in zip(deltas, (1, 3))])
        theirs = {k: np.asarray(v.numpy(), np.float32) for k, v in result.items()}
        update = aggregate.weighted_mean([Contribution(str(i), d, w) for i, (d, w) in enumerate(zip(deltas, (1, 3)))])
        ours = {k: v.astype(np.float32) for k, v in optimizer.step(server_round, ours, update).items()}
        _close(ours, theirs, atol=1e-5)


class _NoGrid:
    """Flower's configure_train asks the grid for nodes; these tests only need its side effects."""

    def get_node_ids(self):
        return [1]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


# -- composed: secure aggregation x user-level DP x strategy ----------------------------------
DELTAS = {"a": 0.5, "b": -1.0, "c": 2.0}  # per client, every coordinate
WEIGHTS = {"a": 10, "b": 30, "c": 60}
GLOBAL = 1.0
ETA, B1, B2, TAU = 0.05, 0.9, 0.99, 1e-3
NOISE, DENOMINATOR, SEED = 0.25, 4.0, 11


def _expected(secure: bool, user_dp: bool, strategy: str) -> dict[str, np.ndarray]:
    """By hand: the update of one round, then the server optimizer's first step."""
    if user_dp:  # every client counts 1: the clip bounds its sensitivity
        rng = np.random.default_rng(SEED)
        update = {k: (sum(DELTAS.values()) + rng.normal(0.0, NOISE, size=s)) / DENOMINATOR for k, s in SHAPES.items()}
    elif secure:  # SecAgg+ weighs every contributor 1
        update = {k: np.full(s, sum(DELTAS.values()) / 3) for k, s in SHAPES.items()}
    else:  # weighted by record count
        mean = sum(WEIGHTS[c] * d for c, d in DELTAS.items()) / sum(WEIGHTS.values())
        update = {k: np.full(s, mean) for k, s in SHAPES.items()}
    if strategy in ("fedavg", "fedprox"):
        return {k: GLOBAL + u for k, u in update.items()}
    m = {k: (1 - B1) * u for k, u in update.items()}  # FedAdam, round 1, from zero moments
    v = {k: (1 - B2) * u ** 2 for k, u in update.items()}
    eta = ETA * math.sqrt(1 - B2 ** 2) / (1 - B1 ** 2)
    return {k: GLOBAL + eta * m[k] / (np.sqrt(v[k]) + TAU) for k in SHAPES}


@pytest.mark.parametrize("secure, user_dp, strategy",
                         list(itertools.product((False, True), (False, True), ("fedavg", "fedadam", "fedprox"))))
def test_every_combination_matches_the_hand_computed_update(secure, user_dp, strategy):
    contributions = [Contribution(c, _full(d), 1 if (secure or user_dp) else WEIGHTS[c]) for c, d in DELTAS.items()]
    plan = Plan(strategy, secure, NOISE if user_dp else None, DENOMINATOR if user_dp else 1.0)
    secure_sum = aggregate.total(contributions, SHAPES) if secure else None  # what SecAgg+ unmasks
    update = aggregate.round_update(plan, SHAPES, [] if secure else contributions, secure_sum, 3,
                                    np.random.default_rng(SEED))
    config = Config.from_flat({"strategy.name": strategy, "strategy.server-lr": ETA, "strategy.beta-1": B1,
                               "strategy.beta-2": B2, "strategy.tau": TAU})
    result = aggregate.make_optimizer(config.strategy).step(1, _full(GLOBAL), update)
    _close(result, _expected(secure, user_dp, strategy), atol=1e-9)


def test_a_round_with_no_contribution():
    """Nothing to apply, except under user-level DP: the noise is released regardless."""
    assert aggregate.round_update(Plan(), SHAPES) is None
    assert aggregate.round_update(Plan(secure=True), SHAPES) is None
    noisy = aggregate.round_update(Plan(noise_std=1.0, denominator=2.0), SHAPES, rng=np.random.default_rng(0))
    assert all(np.abs(v).sum() > 0 for v in noisy.values())


@pytest.mark.parametrize("user_dp, strategy", list(itertools.product((False, True), ("fedavg", "fedadam", "fedprox"))))
def test_the_streaming_sum_gives_the_listed_result(user_dp, strategy):
    """The server adds plain replies as they arrive (`RunningSum`): the same update as the
    list of contributions, for every rule but the robust ones."""
    contributions = [Contribution(c, _random(i, 0.1), 1 if user_dp else WEIGHTS[c]) for i, c in enumerate(DELTAS)]
    running = aggregate.RunningSum(SHAPES)
    for c in contributions:
        running.add(c)
    plan = Plan(strategy, False, NOISE if user_dp else None, DENOMINATOR if user_dp else 1.0)
    listed = aggregate.round_update(plan, SHAPES, contributions, rng=np.random.default_rng(SEED))
    streamed = aggregate.round_update(plan, SHAPES, running=running, rng=np.random.default_rng(SEED))
    _close(streamed, listed, atol=1e-12)
