"""The hive of specialists (fedllm.hive) and the embedded code corpus (fedllm.data.code):
the corpus is pinned, the choice and its charge are what the accountants and the audit
say, the server aggregates each specialist from its own choosers and restores them all."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from fedllm import hive
from fedllm import secure_metrics
from fedllm.config import Config, planned_selections
from fedllm.data.code import records_of, decode_source
from fedllm.errors import ConfigError, DataError, FedllmError


# -- the code corpus ---------------------------------------------------------------------
def test_code_corpus_is_pinned_and_the_base_is_unchanged():
    from fedllm.data.corpus import clients_from_code
    from fedllm.model import base_recipe

    clients = clients_from_code(20, 0.2)
    assert len(clients) == 88 and sum(c.num_records + len(c.heldout) for c in clients) == 3281
    ids = json.dumps([c.client_id for c in clients]).encode()
    assert hashlib.sha256(ids).hexdigest()[:16] == "f3314a30249fc83c"
    content = json.dumps([[c.client_id, c.train, c.heldout] for c in clients]).encode()
    assert hashlib.sha256(content).hexdigest()[:16] == "875a1ab214f9456b"
    assert all(c.kind == "code" and c.client_id.startswith("sympy.") for c in clients)
    # the built-in base is trained on the public plays only, whatever the clients are
    recipes = {base_recipe(Config.from_flat({"data.corpus": corpus})).key() for corpus in ("plays", "code", "mixed")}
    assert recipes == {"026163e5791a"}


def test_mixed_corpus_draws_equal_shares_of_each_kind():
    from fedllm.data import load_clients

    clients = load_clients(Config.from_flat({"data.corpus": "mixed", "num-clients": 11}))
    kinds = [c.kind for c in clients]
    assert kinds.count("code") == 6 and kinds.count("verse") == 5  # the remainder to the first kind by name
    assert load_clients(Config.from_flat({"data.corpus": "mixed", "num-clients": 11})) == clients


def test_records_are_whole_top_level_definitions():
    source = '''"""Module doc."""
import os

X = 1


@decorator(arg=1)
@other
def first(a, b):
    """Adds."""
    return a + b


class Outer:
    """Has a nested class."""

    class Inner:
        def method(self):
            return 1

    def m(self):
        pass


async def later():
    """Async."""
    await thing()
'''
    records = records_of(source, "mod.py")
    assert len(records) == 3
    assert records[0].startswith("@decorator(arg=1)\n@other\ndef first") and '"""Adds."""' in records[0]
    assert "class Inner" in records[1] and "def m(self)" in records[1]
    assert records[2].startswith("async def later")


def test_bad_source_is_refused_with_file_and_line():
    with pytest.raises(DataError, match=r"pkg/mod.py:3: not UTF-8"):
        decode_source(b"x = 1\ny = 2\nz = '\xff'\n", "pkg/mod.py")
    with pytest.raises(DataError, match=r"pkg/mod.py:2: not valid Python"):
        records_of("def ok():\n    return (\n", "pkg/mod.py")


@pytest.mark.parametrize("values, message", [
    ({"data.corpus": "prose"}, "data.corpus"),
    ({"data.corpus": "code", "data.path": "/tmp/x"}, "data.path"),
    ({"data.corpus": "code", "data.partitioner": "iid"}, "natural clients"),
    ({"hive.k": 2, "user-dp.enabled": True}, "user-dp"),
    ({"hive.k": 0}, "hive.k"),
])
def test_bad_hive_or_corpus_config_names_the_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_flat(values)


# -- packing, choosing, aggregating --------------------------------------------------------
def test_pack_and_unpack_check_every_slot():
    a = {"x": np.zeros(2), "y": np.ones(3)}
    b = {"x": np.ones(2), "y": np.zeros(3)}
    assert hive.pack([a]) == a and hive.unpack(a, 1) == [a]
    packed = hive.pack([a, b])
    assert sorted(packed) == ["hive-0/x", "hive-0/y", "hive-1/x", "hive-1/y"]
    back = hive.unpack(packed, 2)
    assert back[1]["x"] is b["x"]
    for bad in ({**packed, "hive-2/x": np.zeros(2)}, {**packed, "x": np.zeros(2)}, {"hive-0/x": 1, "hive-1/y": 1},
                {"hive-00/x": 1, "hive-1/x": 1}):
        with pytest.raises(FedllmError, match="hive.k=2"):
            hive.unpack(bad, 2)


def test_slotted_upload_has_the_delta_in_the_chosen_slot_only():
    like = {"hive-0/x": np.zeros(2), "hive-1/x": np.zeros(2)}
    out = hive.slotted({"x": np.array([1.0, 2.0])}, 1, ["hive-0/x", "hive-1/x"], like)
    assert out[0].tolist() == [0, 0] and out[1].tolist() == [1, 2]
    declined = hive.slotted(None, None, ["hive-0/x", "hive-1/x"], like)
    assert all(not t.any() for t in declined)
    single = hive.slotted({"x": np.array([1.0, 2.0])}, None, ["x"], {"x": np.zeros(2)})  # k = 1
    assert single[0].tolist() == [1, 2]
    assert hive.identical([{"x": np.ones(2)}, {"x": np.ones(2)}]) and not hive.identical([{"x": np.ones(2)},
                                                                                          {"x": np.zeros(2)}])


def test_choice_without_noise_is_ifca_and_ties_are_random():
    rng = np.random.default_rng(0)
    losses = np.array([[3.0, 1.0], [3.0, 2.0], [1.0, 2.5]])  # votes 1 : 2, mean loss 2.33 : 1.83
    assert hive.votes(losses).tolist() == [1, 2]
    assert hive.choose(losses, None, rng) == 1
    tied = np.ones((4, 3))
    assert {hive.choose(tied, None, rng) for _ in range(60)} == {0, 1, 2}
    with pytest.raises(ValueError):
        hive.choose(np.array([[np.nan, 1.0]]), None, rng)


def test_noisy_choice_follows_the_votes_and_is_random_near_a_tie():
    rng = np.random.default_rng(1)
    clear = np.array([[0.0, 1.0]] * 60 + [[1.0, 0.0]] * 10)  # 60 : 10 votes
    assert all(hive.choose(clear, 5.0, rng) == 0 for _ in range(50))
    close = np.array([[0.0, 1.0]] * 11 + [[1.0, 0.0]] * 10)  # 11 : 10 votes
    picks = [hive.choose(close, 5.0, rng) for _ in range(400)]
    # report-noisy-max with std 5 on a margin of 1: P(0) = Phi(1 / (5 sqrt 2)) = 0.556
    assert 0.48 < picks.count(0) / 400 < 0.64


def test_secure_metrics_carry_a_one_hot_count_of_the_choices():
    c = 8.0
    vectors = [secure_metrics.encode({"train-loss": 2.0, "steps": 4, "num-examples": 30, "specialist": j}, c, 3)
               for j in (0, 2, 2)]
    vectors.append(secure_metrics.encode(None, c, 3))  # a decline
    sums = secure_metrics.decode(sum(vectors), c, 3)
    assert [sums[secure_metrics.chose(j)] for j in range(3)] == pytest.approx([1, 0, 2])
    assert sums["trained"] == 3 and sums["steps"] == 12
    assert len(secure_metrics.encode(None, c)) == len(secure_metrics.FIELDS)  # k = 1: the vector of today


def test_purity_counts_each_specialists_members():
    table = hive.purity({"a": 0, "b": 0, "c": 1, "d": 1}, {"a": "code", "b": "code", "c": "verse", "d": "code"}, 3)
    assert table[0] == {"specialist": 0, "devices": 2, "kinds": {"code": 2}, "majority": "code", "purity": 1.0}
    assert table[1]["purity"] == 0.5 and table[2]["devices"] == 0 and table[2]["purity"] is None


# -- the private choice's charge -------------------------------------------------------------
def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release of sensitivity 1 (Balle & Wang 2018)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps: float) -> float:
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta

    return brentq(excess, 1e-6, 50)


def test_a_choice_costs_one_gaussian_release_and_the_audit_recomputes_it(tmp_path):
    from fedllm.audit.records import audit_path
    from fedllm.privacy.ledger import Ledger

    config = Config.from_flat({"hive.k": 2, "num-server-rounds": 4, "num-clients": 4, "clients-per-round": 2})
    assert planned_selections(config) == 6  # 4 planned rounds (2 of 4 clients sampled) + a first and a last
    assert planned_selections(Config()) == 0
    args = dict(client_id="c1", num_records=40, delta=1e-5, target_epsilon=8.0, sample_rate=0.2, max_grad_norm=1.0,
                planned_steps=15, accountant="prv")
    path = tmp_path / "c1" / "ledger.json"
    ledger = Ledger.open(path, **args, planned_selections=4, select_noise=5.0)
    plain = Ledger.open(tmp_path / "c2" / "ledger.json", **{**args, "client_id": "c2"})
    assert ledger.noise_multiplier > plain.noise_multiplier  # the choices are paid for from the same budget
    ledger.charge([ledger.selection_charge(1, 5.0, "r")])
    assert ledger.epsilon() == pytest.approx(_gaussian_epsilon(5.0, 1e-5), rel=2e-3)
    for r in (1, 2, 3):
        ledger.charge([ledger.selection_charge(r, 5.0, "r"), ledger.next_charge(r, 5, run="r")])
    assert ledger.epsilon() <= 8.0
    audit = audit_path(path)
    assert not audit.failures, audit.failures
    # a choice recorded at a sampled rate would under-state it: the audit says so
    data = json.loads(path.read_text())
    data["history"][0]["sample_rate"] = 0.2
    from fedllm.privacy import chain

    genesis, data["history"] = chain.link({k: v for k, v in data.items() if k not in ("genesis", "history", "head")},
                                          [{k: e[k] for k in chain.ENTRY_FIELDS} for e in data["history"]])
    data["genesis"], data["head"] = genesis, data["history"][-1]["hash"]
    path.write_text(json.dumps(data))
    assert [f.check for f in audit_path(path).failures] == ["sampling"]


# -- the server's side ----------------------------------------------------------------------
@pytest.fixture()
def hive_server(tiny_llama, tmp_path):
    from flwr.supercore.task_identity import TaskIdentity

    from server.round_loop import Server

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = Config.from_flat({"model.name": str(tiny_llama), "num-clients": 4, "clients-per-round": 2, "hive.k": 3,
                               "strategy.name": "fedadam", "lora.r": 2, "privacy.enabled": False,
                               "hive.min-choosers": 1})
    return Server(None, config, tmp_path / "run")


def test_each_specialist_is_aggregated_from_its_choosers_alone(hive_server):
    from fedllm.aggregate import Contribution, RunningSum
    from server.collect import Collected

    server = hive_server
    shapes = server.spec.shapes
    ones = {k: np.ones(s) for k, s in shapes.items()}
    running = [RunningSum(shapes) for _ in range(3)]
    running[0].add(Contribution("a", {k: 2 * v for k, v in ones.items()}, 10, 0))
    running[0].add(Contribution("b", {k: 4 * v for k, v in ones.items()}, 30, 0))
    running[2].add(Contribution("c", {k: -v for k, v in ones.items()}, 5, 2))
    updates = server.update(Collected({}, running_by=running, contributors=3, counts=[2.0, 0.0, 1.0]))
    assert updates[1] is None
    assert all(np.allclose(v, 3.5) for v in updates[0].values())  # weighted by records: (20 + 120) / 40
    assert all(np.allclose(v, -1.0) for v in updates[2].values())
    before = {k: v.numpy().copy() for k, v in server.arrays.items()}
    server.apply(1, updates)
    after = {k: v.numpy() for k, v in server.arrays.items()}
    for key in after:
        moved = not np.array_equal(after[key], before[key])
        assert moved == (not key.startswith("hive-1/")), key
    # the server optimizer's state of a specialist nobody chose stays as it was (zeros: never moved)
    assert all(not v.any() for k, v in server.optimizer.state["m_t"].items() if k.startswith("hive-1/"))
    # secure: the per-specialist sums divided by the masked counts
    total = hive.pack([{k: 6 * v for k, v in ones.items()}, {k: 0 * v for k, v in ones.items()},
                       {k: -v for k, v in ones.items()}])
    server.config = server.config.with_values({"secagg.enabled": True, "clients-per-round": 3})
    secure = server.update(Collected({}, secure_sum=total, contributors=4, counts=[3.0, 0.0, 1.0]))
    assert np.allclose(next(iter(secure[0].values())), 2.0) and secure[1] is None
    # with hive.min-choosers 2 the lone chooser of specialist 2 moves nothing; it is said in the record
    server.config = server.config.with_values({"hive.min-choosers": 2})
    running = [RunningSum(shapes) for _ in range(3)]
    running[0].add(Contribution("a", {k: 2 * v for k, v in ones.items()}, 10, 0))
    running[0].add(Contribution("b", {k: 4 * v for k, v in ones.items()}, 30, 0))
    running[2].add(Contribution("c", {k: -v for k, v in ones.items()}, 5, 2))
    server.config = server.config.with_values({"secagg.enabled": False})
    collected = Collected({}, running_by=running, contributors=3, counts=[2.0, 0.0, 1.0])
    held = server.update(collected)
    assert held[1] is None and held[2] is None and all(np.allclose(v, 3.5) for v in held[0].values())
    assert collected.record["hive"]["held"] == [2]
    assert Config.from_flat({}).hive.min_choosers == 2  # the default: no device is a specialist's whole update


def test_checkpoints_hold_every_specialist_and_resume_restores_them(hive_server):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.checkpoint import resume, save_checkpoint, save_server_state
    from server.round_loop import Server

    server = hive_server
    shapes = server.spec.shapes
    server.apply(1, [{k: np.full(s, 0.01 * (j + 1)) for k, s in shapes.items()} for j in range(3)])
    server.run.write_config(server.config)
    server.run.append_metrics({"round": 0, "run_id": server.run_id, "evaluate": {"clients": {}, "mean": {}}})
    server.run.append_metrics({"round": 1, "train": {}})
    path = save_checkpoint(server, 1)
    save_server_state(server, 1)
    assert sorted(p.name for p in path.glob("specialist-*")) == ["specialist-0", "specialist-1", "specialist-2"]
    base = AutoModelForCausalLM.from_pretrained(server.base)
    peft = PeftModel.from_pretrained(base, path / "specialist-2")
    assert peft is not None
    again = Server(None, server.config, server.run.path)
    assert resume(again) == 1
    for key, value in server.arrays.items():
        assert np.array_equal(again.arrays[key].numpy(), value.numpy()), key
    for name, arrays in server.optimizer.state.items():
        assert all(np.array_equal(again.optimizer.state[name][k], v) for k, v in arrays.items())


# -- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def private_hive(tmp_path_factory, cache_dir):
    """One tiny private hive run on the mixed corpus: 2 specialists, 3 rounds, finetune."""
    from conftest import TINY
    from fedllm.cli import main

    run_dir = tmp_path_factory.mktemp("hive") / "run"
    sets = ["hive.k=2", "data.corpus=mixed", "num-server-rounds=3", "personal.method=finetune", "personal.steps=2"]
    assert main(["simulate", "--config", str(TINY), "--run-dir", str(run_dir),
                 *[arg for value in sets for arg in ("--set", value)]]) == 0
    return run_dir


def test_private_hive_charges_every_choice_and_the_audit_recomputes_them(private_hive, capsys):
    from fedllm.audit.records import audit_path

    run_dir = private_hive
    summary = json.loads((run_dir / "summary.json").read_text())
    h = summary["hive"]
    assert h["k"] == 2 and h["select_noise"] == 5.0 and sum(s["devices"] for s in h["specialists"]) == 3
    assert all(s["purity"] is None or 0.5 <= s["purity"] <= 1 for s in h["specialists"])
    assert "hive                    2 specialists" in (run_dir / "summary.txt").read_text()
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rounds[1:]:
        assert set(r["train"]["hive"]["chosen"]) <= {0, 1} and sum(r["train"]["hive"]["counts"]) == 3
        assert all(m["specialist"] in (0, 1) for m in r["evaluate"]["clients"].values())
    for r in range(4):
        assert sorted(p.name for p in (run_dir / "checkpoints" / f"round-{r}").glob("specialist-*")) == \
            ["specialist-0", "specialist-1"]
    selections = 0
    for path in (run_dir / "privacy" / "clients").glob("*.json"):
        history = json.loads(path.read_text())["history"]
        for i, e in enumerate(history):
            if e["kind"] == "select":
                selections += 1
                assert e["sample_rate"] == 1.0 and e["steps"] == 1 and e["noise_multiplier"] == 5.0
        # the first specialists are all the same: that choice (round 0's evaluation, round 1's
        # training) reads nothing and is charged nothing
        assert not any(e["kind"] == "select" and e["round"] == 0 for e in history)
        assert not any(e["kind"] == "train" and e["round"] == 1 and i and history[i - 1]["kind"] == "select"
                       for i, e in enumerate(history))
    assert selections > 0
    audit = audit_path(run_dir)
    assert not audit.failures, [(f.client, f.check, f.message) for f in audit.failures]


def test_a_device_personalises_and_generates_from_its_specialist(private_hive, capsys):
    from fedllm.cli import main
    from fedllm.device_status import status_lines
    from fedllm.state import StateStore

    run_dir = private_hive
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    client, metrics = next(iter(rounds[-1]["evaluate"]["clients"].items()))
    assert "personal-perplexity" in metrics and metrics["personal-declined"] in (0.0, 1.0)
    store = StateStore(run_dir / "clients", client)
    kept = json.loads((store.dir / "hive.json").read_text())
    assert kept["specialist"] == metrics["specialist"] and kept["scored"] and kept["private"]
    assert any(line.startswith("hive: 2 specialists kept; chose specialist") for line in status_lines(store))
    capsys.readouterr()
    for adapter in ("hive", "global", "personal"):
        assert main(["generate", "--state-dir", str(run_dir / "clients"), "--client-id", client, "--adapter", adapter,
                     "--prompt", "def f(x):\n    return", "--max-new-tokens", "4", "--temperature", "0"]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("def f(x):") and "specialist" in err
    assert f"specialist {kept['specialist']} of 2 (the device's choice)" in err


def test_secure_hive_shows_the_server_no_device_choice(tmp_path, cache_dir):
    """Message inspection: in a secure hive round each device uploads one masked slot per
    specialist and a masked one-hot count; in the clear nothing says which it chose, and the
    server's update of each specialist is the mean of its choosers' deltas."""
    from conftest import TINY
    from fedllm import messages as wire
    from fedllm.personal import load_state
    from fedllm.simulate import load_experiment, simulate

    run_dir = tmp_path / "run"
    config = load_experiment(TINY, {"num-clients": 6, "clients-per-round": 6, "privacy.enabled": False,
                                    "evaluate.num-clients": 2, "secagg.enabled": True, "hive.k": 2,
                                    "data.corpus": "mixed", "hive.min-choosers": 1})
    simulate(config, run_dir, client_app="secure_client:app")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in (1, 2):
        train = rounds[r]["train"]
        assert "chosen" not in train["hive"] and "error" not in train["secagg"]
        observed = run_dir / "observed" / f"round-{r}"
        survivors = sorted(p.stem for p in (observed / "masked").glob("*.npz"))
        assert len(survivors) == 4  # two of six crash mid-round (secure_client)
        chosen = {c: int(json.loads((observed / "clipped" / f"{c}.json").read_text())["specialist"])
                  for c in survivors}
        assert train["hive"]["counts"] == [list(chosen.values()).count(j) for j in (0, 1)]
        for c in survivors:  # every upload has the same shape, whatever the choice
            with np.load(observed / "masked" / f"{c}.npz") as masked:
                sizes = [masked[name].size for name in masked.files]
            assert len(sizes) == 1 + 2 * len(config_keys(observed)) + 1, sizes
            plain = json.loads((observed / "plain" / f"{c}.json").read_text())
            fields = {f for name, names in plain.items() if name != "arrays" for f in names}
            assert plain["arrays"] == [] and wire.SPECIALIST not in fields, plain
            assert set(plain.get("fitres.metrics", [])) <= wire.SECURE_METRICS, plain
        before = hive.unpack(load_state(run_dir / "checkpoints" / f"round-{r - 1}" / "global.safetensors"), 2)
        after = hive.unpack(load_state(run_dir / "checkpoints" / f"round-{r}" / "global.safetensors"), 2)
        step = train["secagg"]["quantization"]["step"]
        for j in (0, 1):
            mine = [c for c in survivors if chosen[c] == j]
            for key in before[j]:
                moved = (after[j][key].double() - before[j][key].double()).numpy()
                if not mine:
                    assert not moved.any(), key
                    continue
                with_deltas = [np.load(observed / "clipped" / f"{c}.npz")[key].astype(np.float64) for c in mine]
                mean = sum(with_deltas) / len(mine)
                assert np.abs(moved - mean).max() <= 4 * step * 4 / len(mine) + 1e-6, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["hive"]["specialists"] == [] and summary["hive"]["upload_adapters_per_device"] == 2
    assert all("specialist" not in m for r in rounds for m in r.get("evaluate", {}).get("clients", {}).values())


def config_keys(observed) -> list[str]:
    """The adapter's tensor names, as a device's clipped delta holds them."""
    any_delta = next((observed / "clipped").glob("*.npz"))
    with np.load(any_delta) as data:
        return list(data.files)


def test_scoring_can_be_capped_without_reading_the_records(monkeypatch):
    from fedllm import hive_device

    seen = []

    def fake_scores(model, pad_id, states, examples, batch_size):
        seen.append(list(examples))
        return np.array([[0.0, 1.0]] * len(examples))

    monkeypatch.setattr(hive_device, "scores", fake_scores)
    states = [{"x": np.zeros(1)}, {"x": np.ones(1)}]
    examples = [[i] for i in range(100)]
    config = Config.from_flat({"hive.k": 2, "hive.score-records": 16, "privacy.enabled": False})
    worker = type("Worker", (), {"model": None, "tokenizer": type("T", (), {"pad_token_id": 0})})
    assert hive_device.pick(config, worker, "c", states, examples, False, 3) == 0
    assert 4 <= len(seen[-1]) <= 40 and len({tuple(e) for e in seen[-1]}) == len(seen[-1])  # Bernoulli(16/100)
    hive_device.pick(config, worker, "c", states, examples, False, 3)
    assert seen[-1] == seen[-2]  # out of DP the key is (seed, round, client): the same draw again
    hive_device.pick(config.with_values({"hive.score-records": 0}), worker, "c", states, examples, False, 3)
    assert len(seen[-1]) == 100
    assert hive_device.pick(config, worker, "c", [states[0], states[0]], examples, False, 3) in (0, 1)
    assert len(seen) == 3  # identical specialists: nothing scored


def test_the_scored_subsample_keeps_each_records_vote_its_own():
    """Neighbouring data sets (one record added or removed) differ in at most that record's
    vote: the others are kept or dropped by their own keyed hash, whatever the rest holds."""
    from fedllm.hive import scored

    rng = np.random.default_rng(0)
    examples = [list(rng.integers(0, 500, size=12)) for _ in range(400)]
    key = b"k" * 16
    full = scored(examples, 50, key)
    for drop in (0, 17, 399):
        neighbour = examples[:drop] + examples[drop + 1:]
        # the threshold is cap/n, so compare at the same rate: what each record does is fixed by its hash
        kept = {tuple(e) for e in scored(neighbour, 50, key)}
        kept_full = {tuple(e) for e in full}
        assert len(kept_full ^ kept) <= len(examples) * 0.05  # only the rate shift, cap/n vs cap/(n-1)
    same_rate = scored(examples + [examples[0][:5]], 50 * 401 / 400, key)
    assert {tuple(e) for e in full} <= {tuple(e) for e in same_rate}
    assert len(same_rate) - len(full) <= 1
    assert scored(examples, 0, key) == examples and scored(examples[:10], 50, key) == examples[:10]
    other = scored(examples, 50, b"j" * 16)
    assert other != full  # a fresh key is a fresh draw


def _forged(run_dir, tmp_path, edit, sign_with):
    """A copy of the run whose first report that had to charge a choice is edited, re-linked,
    re-claimed and re-signed, as whoever can write the run directory could do. (Which device
    had to is the run's draw: it trained among specialists that differed, or was evaluated
    with one other than 0, the choice every device may take unpaid.)"""
    import shutil

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedllm.audit.evidence import recompute_epsilon, server_records
    from fedllm.privacy import chain, signing
    from fedllm.rundir import RunDir

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    _, seen = server_records(RunDir.existing(copy))

    def had_to_choose(client: str) -> bool:
        record = seen.get(client)
        return record is not None and (any(record.hive_differed.get(r) for r in record.accepted)
                                       or any(s != 0 for s, _ in record.hive_evaluated.values()))

    path = next(p for p in sorted((copy / "privacy" / "clients").glob("*.json"))
                if had_to_choose(json.loads(p.read_text())["client_id"]))
    report = json.loads(path.read_text())
    entries = edit([{k: v for k, v in e.items() if k not in ("hash", "prev_hash")} for e in report["history"]])
    report["genesis"], report["history"] = chain.link(report, entries)
    report["head"] = report["history"][-1]["hash"]
    report["epsilon"] = recompute_epsilon(report["history"], report["delta"], "pld")
    # a stolen device key (its state store read), or the forger's own
    key = signing.device_key(copy / "clients" / report["client_id"]) if sign_with == "steal" \
        else Ed25519PrivateKey.generate()
    report["signature"] = key.sign(signing.signed_bytes(report)).hex()
    report["signing_key"] = signing.public_hex(key)
    path.write_text(json.dumps(report))
    return copy, report["client_id"]


def test_the_audit_fails_edited_re_signed_reports_with_or_without_the_ledgers(private_hive, tmp_path, capsys):
    from fedllm.audit.records import audit_path
    from fedllm.cli import main

    clean = audit_path(private_hive)
    assert not clean.failures and {f.check for f in clean.findings if f.status == "pass"} >= {
        "signature", "records", "select"}
    stores = private_hive / "clients"
    keys = {}
    for store in sorted(p for p in stores.iterdir() if (p / "signing.pub").exists()):
        assert main(["client", "key", "--state-dir", str(stores), "--client-id", store.name]) == 0
        keys.update(json.loads(capsys.readouterr().out))
    assert len(keys) >= 3 and all(len(v) == 64 for v in keys.values())
    nowhere = tmp_path / "no-ledgers"
    nowhere.mkdir()

    def failed(run, **kw):
        return {(f.client, f.check) for f in audit_path(run, **kw).failures}

    dropped, client = _forged(private_hive, tmp_path / "a", lambda h: [e for e in h if e["kind"] != "select"], None)
    for kw in ({}, {"state_dir": nowhere, "keys": keys}):  # the devices' stores at hand, or only the operator's keys
        assert {(client, "signature"), (client, "select")} <= failed(dropped, **kw), kw
    assert (client, "signature") in failed(dropped, state_dir=nowhere)  # no key to trust: not a pass

    def false_rate(history):
        return [*history[:1], {**history[0], "kind": "records", "steps": 0, "sample_rate": 0.01, "num_records": 40},
                *history[1:]]

    rated, client = _forged(private_hive, tmp_path / "b", false_rate, None)
    for kw in ({}, {"state_dir": nowhere, "keys": keys}):
        assert {(client, "records"), (client, "signature")} <= failed(rated, **kw), kw
    # the device's own key, were it stolen, still leaves the dropped choice for the select check
    stolen, client = _forged(private_hive, tmp_path / "c", lambda h: [e for e in h if e["kind"] != "select"],
                             "steal")
    assert (client, "select") in failed(stolen, state_dir=nowhere, keys=keys)
    assert (client, "signature") not in failed(stolen, state_dir=nowhere, keys=keys)
