"""`fedllm audit`: the hash chain, and every check on a real private run, untouched and tampered with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY
from fedllm.cli import main
from fedllm.privacy import chain
from fedllm.audit.records import audit_path
from fedllm.privacy.ledger import Ledger, LedgerError

HEADER = dict(client_id="c1", num_records=40, delta=1e-5, target_epsilon=8.0, noise_multiplier=1.1, sample_rate=0.2,
              max_grad_norm=1.0, planned_steps=20, accountant="prv", sampling="poisson", privacy_unit="record")
ENTRIES = [dict(round=r, noise_multiplier=1.1, sample_rate=0.2, steps=5, kind="train", run="x") for r in (1, 2, 3)]


def _ledger() -> dict:
    genesis, history = chain.link(HEADER, ENTRIES)
    return {**HEADER, "genesis": genesis, "history": history, "head": history[-1]["hash"]}


def _fields(ledger: dict) -> list[str]:
    return [f for f, _ in chain.problems(ledger)]


def test_chain_names_what_was_changed():
    assert chain.problems(_ledger()) == []
    edited = _ledger()
    edited["history"][1]["steps"] = 1
    assert _fields(edited) == ["history[1]"]
    deleted = _ledger()
    del deleted["history"][1]
    assert _fields(deleted) == ["history[1]"]
    reordered = _ledger()
    reordered["history"][0], reordered["history"][1] = reordered["history"][1], reordered["history"][0]
    assert "history[0]" in _fields(reordered)
    truncated = _ledger()
    truncated["history"].pop()
    assert _fields(truncated) == ["head"]
    header = _ledger()
    header["noise_multiplier"] = 2.0
    assert _fields(header) == ["genesis"]


def test_ledger_refuses_a_broken_chain_and_upgrades_version_1(tmp_path):
    path = tmp_path / "c1" / "ledger.json"
    ledger = Ledger.open(path, client_id="c1", num_records=40, delta=1e-5, target_epsilon=8.0, sample_rate=0.2,
                         max_grad_norm=1.0, planned_steps=10, accountant="prv")
    ledger.charge([ledger.next_charge(1, 5, run="r1"), ledger.next_charge(2, 5, run="r1")])
    saved = json.loads(path.read_text())
    assert saved["ledger_version"] == 2 and saved["head"] == saved["history"][-1]["hash"]
    assert Ledger.load(path).history == ledger.history

    saved["history"].pop(0)
    path.write_text(json.dumps(saved))
    with pytest.raises(LedgerError, match=r"hash chain \(history\[0\] prev_hash"):
        Ledger.load(path)

    old = {k: v for k, v in ledger.to_dict().items() if k not in ("genesis", "head")}  # as version 1 wrote it
    old.update(ledger_version=1, history=[{k: h[k] for k in ("round", "noise_multiplier", "sample_rate", "steps",
                                                             "kind")} for h in old["history"]])
    path.write_text(json.dumps(old))
    upgraded = Ledger.load(path)
    upgraded.save()
    assert chain.problems(json.loads(path.read_text())) == [] and len(upgraded.history) == 2


@pytest.fixture(scope="module")
def private_run(tmp_path_factory, cache_dir) -> Path:
    """A private run with sampling (3 of 6 clients a round) and personalisation; record-
    and user-level DP, under secure aggregation."""
    from fedllm.simulate import load_experiment, simulate

    run_dir = tmp_path_factory.mktemp("audited") / "run"
    simulate(load_experiment(TINY, {"privacy.target-epsilon": 4.0, "personal.method": "finetune",
                                    "personal.steps": 2, "secagg.enabled": True, "user-dp.enabled": True,
                                    "user-dp.sampling": "fixed", "user-dp.noise-multiplier": 1.5}), run_dir)
    return run_dir


def _tampered(run: Path, tmp_path: Path, relative: str, change) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    data = json.loads((copy / relative).read_text())
    change(data)
    (copy / relative).write_text(json.dumps(data))
    return copy


def _failed(path: Path) -> set[tuple[str, str, str]]:
    return {(f.client, f.check, f.field) for f in audit_path(path).failures}


def test_audit_passes_a_private_run_and_writes_the_report(private_run, capsys):
    assert main(["audit", str(private_run)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed for" in out
    audit = audit_path(private_run)
    passed = {f.check for f in audit.findings if f.status == "pass"}
    assert passed >= {"fields", "versions", "privacy-unit", "sampling", "chain", "delta", "epsilon-pld", "epsilon-rdp",
                      "target", "rounds", "device-ledger", "summary"}
    kinds = {e["kind"] for r in (private_run / "privacy" / "clients").glob("*.json")
             for e in json.loads(r.read_text())["history"]}
    assert kinds == {"train", "personal", "local-only"}  # the rounds check covered personal charges too
    report = private_run / "audit"
    assert (report / "epsilon_clients.png").stat().st_size > 1000 and (report / "epsilon_rounds.png").exists()
    assert "data:image/png;base64," in (report / "report.html").read_text()
    assert "Verdict: **PASS**" in (report / "report.md").read_text()
    for e in audit.epsilons.values():  # the recomputation is independent and agrees
        assert e.pld == pytest.approx(e.claimed, rel=0.01) and e.pld <= e.target * 1.01


def test_audit_names_client_and_field_of_a_changed_number(private_run, tmp_path, capsys):
    report = sorted((private_run / "privacy" / "clients").glob("*.json"))[0]
    client = json.loads(report.read_text())["client_id"]
    relative = f"privacy/clients/{report.name}"

    claim = _tampered(private_run, tmp_path / "a", relative, lambda d: d.update(epsilon=d["epsilon"] * 0.9))
    assert (client, "epsilon-pld", "epsilon") in _failed(claim)
    assert main(["audit", str(claim)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  client {client}  check epsilon-pld  field epsilon" in out

    noise = _tampered(private_run, tmp_path / "b", relative, lambda d: d["history"][0].update(noise_multiplier=9.0))
    assert (client, "chain", "history[0]") in _failed(noise)

    delta = _tampered(private_run, tmp_path / "c", relative, lambda d: d.update(delta=0.5))
    assert {(client, "delta", "delta"), (client, "chain", "genesis")} <= _failed(delta)


def test_audit_detects_a_deleted_ledger_entry(private_run, tmp_path):
    report = next(p for p in sorted((private_run / "privacy" / "clients").glob("*.json"))
                  if len(json.loads(p.read_text())["history"]) >= 2)
    client = json.loads(report.read_text())["client_id"]

    # From the server's copy: the chain breaks and the server's metrics show the missing round.
    first = _tampered(private_run, tmp_path / "a", f"privacy/clients/{report.name}", lambda d: d["history"].pop(0))
    failed = _failed(first)
    assert (client, "chain", "history[0]") in failed and (client, "rounds", "history") in failed

    # From the device's own ledger, the tail removed and the head rewritten to hide it.
    def truncate(d):
        d["history"].pop()
        d["head"] = d["history"][-1]["hash"]

    device = _tampered(private_run, tmp_path / "b", f"clients/{report.stem}/ledger.json", truncate)
    assert (client, "device-ledger", "head") in _failed(device)


def test_audit_refuses_what_it_cannot_audit(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"privacy.enabled": False}))
    assert main(["audit", str(tmp_path / "plain")]) == 2
    assert "without differential privacy" in capsys.readouterr().err


# -- the empirical one-run audit ---------------------------------------------------------------
def test_lower_bound_matches_the_closed_form_and_is_monotone():
    import math

    from fedllm.audit.canary import epsilon_lower_bound, p_value

    # All r guesses right, delta = 0: P = q^r, so the bound is logit(0.05 ** (1 / r)).
    for r in (20, 100):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance level proves nothing
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in (60, 70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[-1] > 3
    assert epsilon_lower_bound(1000, 100, 100, 1e-3) < epsilon_lower_bound(1000, 100, 100, 0.0)  # delta costs
    assert p_value(10, 4, 4, 0.0, 0.0) == pytest.approx(1 / 16)


def test_guesses_take_the_extremes():
    from fedllm.audit.canary import guess

    g = guess([0.9, -1.0, 0.1, 2.0, -0.5, 0.0], [True, False, True, False, False, True], 4)
    assert g.guess == [1, -1, 0, 1, -1, 0] and g.made == 4 and g.correct == 3
    with pytest.raises(ValueError, match="even number"):
        guess([0.0, 1.0, 2.0], [True, False, True], 3)


def test_canary_audit_end_to_end(tmp_path, cache_dir, capsys):
    from fedllm.data.corpus import clients_from_folder

    run_dir = tmp_path / "canary"
    assert main(["audit", "canary", "--config", str(TINY), "--run-dir", str(run_dir), "--canaries", "60",
                 "--guesses", "20", "--seed", "3", "--set", "num-server-rounds=1"]) == 0
    assert "epsilon lower bound at 95% confidence" in capsys.readouterr().out
    result = json.loads((run_dir / "audit" / "canary.json").read_text())
    assert result["m"] == 60 and result["guesses"] == 20 and 0 <= result["correct"] <= 20
    assert result["claimed_epsilon"] is not None and result["epsilon_lower_bound"] <= result["claimed_epsilon"]
    canaries = result["canaries"]
    assert sum(c["guess"] != 0 for c in canaries) == 20
    assert result["correct"] == sum((c["guess"] == 1) == c["included"] for c in canaries if c["guess"])
    # Included canaries are training records of their client, excluded ones are nowhere.
    train = {c.client_id: set(c.train) for c in clients_from_folder(run_dir / "audit" / "data", 1, 0.2)}
    everything = {t for f in (run_dir / "audit" / "data").glob("*.jsonl") for t in f.read_text().splitlines()}
    for c in canaries:
        assert (c["text"] in train[c["client"]]) == c["included"]
        assert c["included"] or json.dumps({"text": c["text"]}) not in everything
    # What was scored is what left the devices: one delta per accepted update, and the global it answered.
    sent = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])["train"]["clients"]
    kept = sorted(p.stem for p in (run_dir / "audit" / "updates" / "round-1" / "deltas").glob("*.safetensors"))
    assert kept == sorted(sent) and (run_dir / "audit" / "updates" / "round-1" / "global.safetensors").exists()


def test_user_level_claim_is_reported_beside_record_level_and_audited(private_run, tmp_path, capsys):
    summary = json.loads((private_run / "summary.json").read_text())
    assert summary["privacy"]["enabled"] and summary["secure_aggregation"]
    text = (private_run / "summary.txt").read_text()
    assert "record-level DP, epsilon" in text and "user-level privacy      DP-FedAvg per device" in text
    assert "fixed cohorts, no amplification claimed" in text and "secure aggregation      on" in text
    user = json.loads((private_run / "privacy" / "user_level.json").read_text())
    assert user["sampling"] == "fixed" and user["sample_rate"] == 1.0 and user["rounds"] == 2
    assert "after secure aggregation" in user["noise_added_by"] and user["epsilon"] == summary["user_level_privacy"][
        "epsilon"]
    assert main(["audit", str(private_run), "--out", str(tmp_path / "a")]) == 0
    assert "user-level: claimed" in capsys.readouterr().out

    for change, failing in [({"noise_multiplier": 3.0}, {"noise", "epsilon-pld"}),
                            ({"rounds": 1}, {"rounds", "epsilon-pld"}),
                            ({"sample_rate": 0.1}, {"sampling", "epsilon-pld"}),
                            ({"sampling": "poisson"}, {"sampling"}),
                            ({"delta": 0.5}, {"delta", "epsilon-pld"})]:
        copy = _tampered(private_run, tmp_path / str(len(change)) / next(iter(change)), "privacy/user_level.json",
                         lambda data, change=change: data.update(change))
        failed = {check for client, check, _ in _failed(copy) if client == "user-level"}
        assert failing <= failed, (change, failed)
