"""Secure aggregation (Flower SecAgg+) and user-level DP, end to end on the simulation engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY
from fedllm import messages as wire
from fedllm import secure_metrics
from fedllm.config import Config
from fedllm.data import load_clients
from fedllm.errors import ConfigError
from fedllm.personal import load_state
from fedllm.privacy.user_level import clip_delta, delta_norm, epsilon


def test_clip_delta_bounds_the_norm_across_all_tensors():
    delta = {"a": torch.full((3, 4), 1.0), "b": torch.full((5,), -2.0)}
    clipped, norm = clip_delta(delta, 0.5)
    assert norm == pytest.approx(math.sqrt(12 + 20))
    assert delta_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    assert torch.allclose(clipped["a"] / clipped["b"][0], delta["a"] / delta["b"][0])  # direction kept
    small = {"a": torch.full((2,), 0.01)}
    assert torch.equal(clip_delta(small, 0.5)[0]["a"], small["a"])


def test_user_level_epsilon_amplification_only_with_poisson():
    assert epsilon(1.0, 0.1, 10, 1e-3) < epsilon(1.0, 1.0, 10, 1e-3)
    assert epsilon(0.0, 1.0, 3, 1e-3) == math.inf
    assert epsilon(1.0, 0.1, 0, 1e-3) == 0.0


@pytest.mark.parametrize("values, message", [
    ({"secagg.num-shares": 5, "secagg.threshold": 5}, "below secagg.num-shares"),
    ({"secagg.enabled": True, "clients-per-round": 2}, "clients-per-round >= 3"),
    ({"secagg.enabled": True, "secagg.quantization-bits": 28, "num-clients": 100}, "at most 25"),
    ({"user-dp.sampling": "random"}, "'poisson', 'fixed'"),
    ({"user-dp.clip": 0}, "user-dp.clip"),
])
def test_bad_secure_config_is_refused_with_the_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_flat(values)


def _read_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_secure_rounds_mask_each_update_sum_exactly_and_survive_dropouts(tmp_path, cache_dir):
    """10 clients, all sampled, 2 crash mid-round in every round; no noise (multiplier 0)
    so the server's update is exactly the sum of the survivors' clipped deltas / 10."""
    from fedllm.simulate import load_experiment, simulate

    run_dir = tmp_path / "run"
    config = load_experiment(TINY, {
        "num-clients": 10, "clients-per-round": 10, "privacy.enabled": False, "evaluate.num-clients": 2,
        "secagg.enabled": True, "user-dp.enabled": True, "user-dp.sampling": "fixed",
        "user-dp.noise-multiplier": 0.0, "user-dp.clip": 0.01,
    })
    simulate(config, run_dir, client_app="secure_client:app")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in (1, 2):
        train = rounds[r]["train"]
        secagg = train["secagg"]
        assert secagg["sampled"] == 10 and secagg["dropped_out"] == 2 and secagg["contributed"] == 8
        assert "error" not in secagg and len(train["clients"]) == 8
        observed = run_dir / "observed" / f"round-{r}"
        masked = {p.stem: _read_npz(p) for p in (observed / "masked").glob("*.npz")}
        clipped = {p.stem: _read_npz(p) for p in (observed / "clipped").glob("*.npz")}
        assert len(masked) == 8 and len(clipped) == 10  # the 2 that dropped trained, never uploaded
        keys = sorted(next(iter(clipped.values())))
        step = secagg["quantization"]["step"]
        total = {k: sum(clipped[c][k].astype(np.float64) for c in masked) for k in keys}
        for client, vectors in masked.items():
            norm = math.sqrt(sum(float((clipped[client][k].astype(np.float64) ** 2).sum()) for k in keys))
            assert norm <= 0.01 * (1 + 1e-5)
            # What left the device: [weight factor, masked tensors...], uniform mod 2**32, unrelated to the delta.
            tensors = [vectors[f"arr_{i + 1}"] for i in range(len(keys))]
            as_if_plain = [t.astype(np.float64) * step - secagg["quantization"]["clipping_range"] for t in tensors]
            assert all(np.abs(a - clipped[client][k]).max() > 1e4 * step for a, k in zip(as_if_plain, keys))
            assert max(int(t.max()) for t in tensors) > 2**31
        before = load_state(run_dir / "checkpoints" / f"round-{r - 1}" / "global.safetensors")
        after = load_state(run_dir / "checkpoints" / f"round-{r}" / "global.safetensors")
        bound = secagg["quantization"]["max_error_per_coordinate_of_sum"]
        for k in keys:
            server_sum = (after[k].double() - before[k].double()).numpy() * 10  # fixed denominator: 10
            rounding = 10 * np.spacing(np.abs(after[k].numpy())).astype(np.float64)
            assert np.all(np.abs(server_sum - total[k]) <= bound + rounding), k
        assert any(np.abs(total[k]).max() > 100 * bound for k in keys)  # the check has something to check
        # The training metrics left each device only inside the masked vector: in the clear, the
        # client id (and a decline's reason, an epsilon report) and nothing else; the server has sums.
        for path in (observed / "plain").glob("*.json"):
            plain = json.loads(path.read_text())
            assert plain["arrays"] == [], plain
            fields = {f for name, names in plain.items() if name != "arrays" for f in names}
            assert not fields & {wire.TRAIN_LOSS, wire.STEPS, wire.NUM_EXAMPLES, wire.EPSILON}, plain
            assert set(plain.get("fitres.metrics", [])) <= wire.SECURE_METRICS, plain
        assert train["train_loss"] == [] and train["steps"] == [None] * 8
        sums = secagg["metric_sums"]
        records = {c.client_id: c.num_records for c in load_clients(config)}
        assert sums["trained"] == 8 and sums[wire.STEPS] == 8 * config.local_steps
        assert sums[wire.NUM_EXAMPLES] == sum(records[c] for c in train["clients"])
        assert 0 < train["train_loss_mean"] < 20
    user = json.loads((run_dir / "privacy" / "user_level.json").read_text())
    assert user["rounds"] == 2 and user["epsilon"] is None and user["noise_multiplier"] == 0.0
    assert user["sample_rate"] == 1.0 and user["sampling"] == "fixed"



def test_poisson_participation_is_independent_with_the_claimed_rate():
    from fedllm.privacy.user_level import UserLevel
    from server.sampling import ClientSampler

    config = Config.from_flat({"num-clients": 100, "clients-per-round": 10, "user-dp.enabled": True})
    mech = UserLevel.for_run(config, population=80)
    assert mech.sample_rate == pytest.approx(10 / 80) and mech.denominator == 10 and mech.sampling == "poisson"
    sampler = ClientSampler({f"c{i}": i for i in range(80)}, seed=1)
    counts = [len(sampler.poisson(mech.sample_rate)) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(10, rel=0.03) and np.var(counts) == pytest.approx(80 * 0.125 * 0.875,
                                                                                                rel=0.1)
    fixed = UserLevel.for_run(config.with_values({"user-dp.sampling": "fixed"}), population=80)
    assert fixed.sample_rate == 1.0 and fixed.epsilon(5) > mech.epsilon(5)
    with pytest.raises(ConfigError, match="user-dp.delta < 0.0125"):
        UserLevel.for_run(config.with_values({"user-dp.delta": 0.05}), population=80)
    calibrated = UserLevel.for_run(config.with_values({"user-dp.target-epsilon": 2.0}), population=80)
    assert calibrated.epsilon(5) <= 2.0 and calibrated.epsilon(5) == pytest.approx(2.0, rel=0.02)


def test_a_device_that_requires_secure_aggregation_refuses_plain_training(tmp_path, monkeypatch):
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.secure import SecureAggregationRequired, secagg_mod
    from fedllm.deploy.daemon import supernode_command

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    trained = []

    def train(msg, context):
        trained.append(msg)
        return msg

    plain = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)

    def context(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    with pytest.raises(SecureAggregationRequired, match="secagg.enabled=true"):
        secagg_mod(plain, context({"require-secagg": True}), train)
    assert not trained  # refused before any training (and any ledger charge)
    assert secagg_mod(plain, context({}), train) is plain

    data = tmp_path / "device.txt"
    data.write_text("\n".join(f"line {i} of my own text" for i in range(30)))
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    command = supernode_command(superlink="127.0.0.1:1", ca_cert=tmp_path / "ca.crt", key=tmp_path / "key",
                                data=data, state_dir=tmp_path / "s", require_secagg=True)
    assert "require-secagg=true" in command[command.index("--node-config") + 1]


def test_noise_of_a_larger_cohort_is_said_plainly_and_audits(tmp_path):
    """user-dp.noise-cohort-size: the sum gets the noise of a larger cohort (its mean the
    noise a 5,000-client cohort would have); the report says the epsilon is that
    deployment's, and the audit checks the scaled noise."""
    from fedllm.audit.records import audit_path
    from fedllm.privacy.user_level import UserLevel
    from fedllm.rundir import RunDir

    with pytest.raises(ConfigError, match="noise-cohort-size=5 is below clients-per-round=10"):
        Config.from_flat({"user-dp.enabled": True, "user-dp.noise-cohort-size": 5})
    config = Config.from_flat({"num-clients": 100, "clients-per-round": 10, "num-server-rounds": 2,
                               "user-dp.enabled": True, "user-dp.noise-multiplier": 2.0, "user-dp.delta": 1e-3,
                               "user-dp.noise-cohort-size": 5000})
    mech = UserLevel.for_run(config, population=100)
    assert mech.noise_std == pytest.approx(2.0 * 5.0 * 10 / 5000)
    assert mech.noise_std / mech.denominator == pytest.approx(2.0 * 5.0 / 5000)  # the mean's noise of 5,000 clients
    report = {"enabled": True, "run_id": "r", **mech.report(2, 2)}
    assert "SIMULATION OF A LARGER COHORT" in report["simulated_cohort"]
    assert report["epsilon_of_this_run"] is None or report["epsilon_of_this_run"] > report["epsilon"]

    run = RunDir(tmp_path / "run")
    run.write_config(config)
    for r in (1, 2):
        run.append_metrics({"round": r, "train": {"clients": [], "user_dp": {"noise_std": mech.noise_std}}})
    run.write_user_level(report)
    audit = audit_path(run.path)
    assert not [f for f in audit.failures if f.client == "user-level"], audit.failures
    run.write_user_level({**report, "noise_cohort_size": 0})  # the unscaled claim no longer matches the noise added
    assert "noise" in {f.check for f in audit_path(run.path).failures if f.client == "user-level"}


def test_a_hostile_device_under_the_mask_gets_its_round_refused(tmp_path, cache_dir):
    """One device of four adds 2**31 under its mask in round 1 and forges the hive counts in
    round 2 (tests/hostile_secure_client.py, outside Flower's mod): both rounds are refused
    with a reason and leave the global adapter; the honest round 3 moves it."""
    from fedllm.simulate import load_experiment, simulate

    run_dir = tmp_path / "run"
    config = load_experiment(TINY, {"num-clients": 4, "clients-per-round": 4, "num-server-rounds": 3,
                                    "privacy.enabled": False, "evaluate.num-clients": 2, "evaluate.every": 3,
                                    "secagg.enabled": True, "hive.k": 2, "hive.min-choosers": 1})
    simulate(config, run_dir, client_app="hostile_secure_client:app")
    rounds = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    state = {r: load_state(run_dir / "checkpoints" / f"round-{r}" / "global.safetensors") for r in (0, 1, 2, 3)}

    def same(a, b):
        return all(torch.equal(state[a][k], state[b][k]) for k in state[a])

    assert "beyond what" in rounds[1]["train"]["secagg"]["error"] and same(0, 1)
    assert "chose-0" in rounds[2]["train"]["secagg"]["error"] and same(1, 2)
    assert "error" not in rounds[3]["train"]["secagg"] and not same(2, 3)
    assert rounds[1]["train"]["clients"] == [] and len(rounds[3]["train"]["clients"]) == 4


def test_the_sum_check_refuses_what_honest_devices_cannot_produce():
    from server.secure_check import aggregate_problem

    c, bits = 8.0, 22
    spec = len(secure_metrics.fields(2))
    ones = np.zeros(spec)
    ones[0] = 3 * c  # three trained
    ones[4], ones[5] = 2 * c, 1 * c  # chose-0: 2, chose-1: 1
    sums = {"hive-0/a": np.full(4, 0.1), "hive-1/a": np.full(4, -0.05)}
    kw = dict(clip_range=c, bits=bits, results=4, trained=3, k=2)
    assert aggregate_problem(sums, ones, **kw) == ""
    assert "beyond what 1" in aggregate_problem({**sums, "hive-1/a": np.full(4, 9.0)}, ones, **kw)
    zero_count = ones.copy()
    zero_count[4], zero_count[5] = 3 * c, 0.0
    assert "beyond what 0" in aggregate_problem(sums, zero_count, **kw)  # a chosen slot's update cannot be discarded
    forged = ones.copy()
    forged[4] += 3 * c
    assert "outside [0, 3]" in aggregate_problem(sums, forged, **kw)
    forged[4] = ones[4] + c  # in range, but 4 choices from 3 devices
    assert "add up to" in aggregate_problem(sums, forged, **kw)
    half = ones.copy()
    half[5] += 0.5 * c
    assert "whole number" in aggregate_problem(sums, half, **kw)
    assert "devices trained" in aggregate_problem(sums, np.r_[2 * c, ones[1:]], **kw)
    assert "outside" in aggregate_problem(sums, np.r_[ones[:1], -c, ones[2:]], **kw)
    one = {"a": np.full(100, 0.0009)}  # L2 0.009 from 1 device at user-dp.clip 0.01: fine; 0.05: not
    metrics1 = np.zeros(len(secure_metrics.fields(1)))
    metrics1[0] = 0.01  # one trained device, at clipping range 0.01
    args = dict(clip_range=0.01, bits=bits, results=2, trained=1, user_clip=0.01)
    assert aggregate_problem(one, metrics1, **args) == ""
    assert "L2 norm" in aggregate_problem({"a": np.full(100, 0.005)}, metrics1, **args)
