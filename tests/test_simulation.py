"""End-to-end runs on Flower's simulation engine with a tiny configuration."""

import json
import os
from pathlib import Path

import pytest

from conftest import TINY
from fedllm.cli import main
from fedllm.config import Config

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("FEDLLM_RECORD_GOLDEN") == "1"  # re-record only for an intended change of behaviour


def _golden_adapter(path: Path) -> None:
    """The fixed-seed tiny run's final global adapter equals the recorded one."""
    import torch

    from fedllm.personal import load_state, save_state

    golden = GOLDEN / "tiny-nodp-round-2.safetensors"
    if RECORD:
        save_state(golden, load_state(path))
    expected, actual = load_state(golden), load_state(path)
    assert set(expected) == set(actual)
    for key in expected:
        # float32 sums in another order (another CPU's kernels) differ by ~1e-6; a change of behaviour by far more
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-5)


def _golden_reports(run_dir: Path) -> None:
    """The DP run's epsilon reports (mechanism, charges, epsilon) equal the recorded ones."""
    fields = ("num_records", "noise_multiplier", "sample_rate", "planned_steps", "epsilon", "delta")
    reports = {}
    for path in sorted((run_dir / "privacy" / "clients").glob("*.json")):
        report = json.loads(path.read_text())
        reports[report["client_id"]] = {**{f: report[f] for f in fields},
                                        "charges": [(e["round"], e["steps"], e["kind"]) for e in report["history"]]}
    golden = GOLDEN / "tiny-dp-reports.json"
    if RECORD:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(json.dumps(reports, indent=1, sort_keys=True) + "\n")
    expected = json.loads(golden.read_text())
    assert set(reports) == set(expected)
    for client, report in reports.items():
        want = expected[client]
        assert [list(c) for c in report["charges"]] == want["charges"], client
        for field in fields:
            assert report[field] == pytest.approx(want[field], rel=1e-9), (client, field)


def test_simulate_end_to_end(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    assert main(["simulate", "--config", str(TINY), "--run-dir", str(run_dir), "--set", "privacy.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "upload per client/round" in out
    # A clean terminal: fedllm's progress and table; Flower's runtime (a SuperLink in simulation
    # mode, `flwr run`), Ray and the workers wrote to the run's log instead.
    assert "round 1/2:" in out and "round 2/2:" in out
    for noise in ("DEPRECATED", "run_simulation", "fraction_evaluate", "FutureWarning", "Optimal order", "WARNING"):
        assert noise not in out, noise
    log = (run_dir / "simulation.log").read_text()
    assert "Starting Flower SuperLink" in log and "Starting Flower Simulation" in log

    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-clients"] == 6 and config["run-dir"] == str(run_dir)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(len(r["train"]["clients"]) == 3 and not r["train"]["dropped"] for r in rounds[1:])

    assert (run_dir / "metrics.png").stat().st_size > 0
    # the run directory is its owner's alone, logs and plots included (Flower's own home, .flwr,
    # is reachable only through it)
    assert run_dir.stat().st_mode & 0o077 == 0
    for path in run_dir.rglob("*"):
        if path.is_file() and ".flwr" not in path.relative_to(run_dir).parts:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"
    assert "held-out perplexity" in (run_dir / "summary.txt").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("rounds", "num_clients", "base_model", "upload_bytes_per_client_round", "base_model_bytes"):
        assert key in summary
    assert summary["rounds"] == 2 and summary["num_clients"] == 6
    assert summary["global"]["perplexity"] < summary["base"]["perplexity"]
    assert summary["upload_bytes_per_client_round"] <= 0.02 * summary["base_model_bytes"]
    _golden_adapter(run_dir / "checkpoints" / "round-2" / "global.safetensors")

    # The last checkpoint reproduces the held-out loss the run reported for it.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.data import load_clients
    from fedllm.data.tokens import encode
    from fedllm.evaluate import evaluate

    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(summary["base_model"])
    model = PeftModel.from_pretrained(base, run_dir / "checkpoints" / "round-2")
    cfg = Config.from_flat(config)
    clients = {c.client_id: c for c in load_clients(cfg)}
    for client_id, reported in rounds[2]["evaluate"]["clients"].items():
        heldout = encode(tokenizer, clients[client_id].heldout, cfg.model.max_length)
        measured = evaluate(model, heldout, cfg.evaluate.batch_size, tokenizer.pad_token_id)
        assert measured["loss"] == pytest.approx(reported["loss"], abs=1e-5)


def test_malformed_updates_are_dropped_and_the_round_completes(tmp_path, cache_dir):
    from fedllm.simulate import load_experiment, simulate

    config = load_experiment(TINY, {"clients-per-round": 6})
    summary = simulate(config, tmp_path / "run", client_app="faulty_client:app")
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in rounds[1:]:
        reasons = sorted(d["reason"] for d in record["train"]["dropped"])
        assert len(record["train"]["clients"]) == 1, record
        assert any("claims client id somebody-else" in r for r in reasons)
        assert any("client error" in r and "simulated client crash" in r for r in reasons)
        assert any("non-finite" in r for r in reasons)
        assert any("shape" in r for r in reasons)
        assert any("unknown" in r and "lm_head" in r for r in reasons)
    assert summary["rejected_replies"] == 10
    assert (tmp_path / "run" / "checkpoints" / "round-2" / "adapter_model.safetensors").exists()


def test_private_run_reports_recomputable_epsilons_and_clients_decline(tmp_path, cache_dir):
    """Every client trains every round; the noise is planned for 2 participations, so in
    round 3 every client would exceed its budget and declines; the run still completes."""
    from fedllm.audit.evidence import recompute_epsilon
    from fedllm.simulate import load_experiment, simulate

    run_dir = tmp_path / "run"
    config = load_experiment(TINY, {"clients-per-round": 6, "num-server-rounds": 3, "privacy.planned-rounds": 2,
                                    "privacy.target-epsilon": 3.0})
    summary = simulate(config, run_dir)
    assert summary["rounds"] == 3 and (run_dir / "checkpoints" / "round-3").is_dir()

    _golden_reports(run_dir)
    privacy = json.loads((run_dir / "privacy" / "summary.json").read_text())
    assert privacy["clients_reporting"] == 6 and privacy["over_target"] == []
    assert privacy["declines"] == 6 and all(rounds == [3] for rounds in privacy["declined"].values())
    assert privacy["epsilon"]["max"] <= 3.0
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds[3]["train"]["declined"]) == 6 and not rounds[3]["train"]["clients"]

    for path in (run_dir / "privacy" / "clients").glob("*.json"):
        report = json.loads(path.read_text())
        for field in ("client_id", "privacy_unit", "num_records", "delta", "epsilon", "target_epsilon",
                      "accountant", "sampling", "secure_rng", "history"):
            assert field in report, (path.name, field)
        assert report["sampling"] == "poisson" and report["secure_rng"] is False
        assert [h["round"] for h in report["history"]] == [1, 2]
        assert recompute_epsilon(report["history"], report["delta"]) == pytest.approx(report["epsilon"], rel=0.01)
        ledger = json.loads((run_dir / "clients" / report["client_id"] / "ledger.json").read_text())
        assert ledger["history"] == [{**h} for h in report["history"]]


def test_a_restarted_run_continues_from_its_last_completed_round(tmp_path, cache_dir):
    """Stopped after round 1 and started again on the same run directory, a run ends
    where an uninterrupted one does: same clients sampled, same global adapter."""
    import torch

    from fedllm.personal import load_state
    from fedllm.simulate import load_experiment, simulate

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    simulate(load_experiment(TINY, {"privacy.enabled": False}), straight)
    simulate(load_experiment(TINY, {"privacy.enabled": False, "num-server-rounds": 1}), resumed)
    first_run = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[0])["run_id"]
    with open(resumed / "metrics.jsonl", "a") as handle:  # a round 2 the crash cut short
        handle.write(json.dumps({"round": 2, "train": {"clients": ["half-done"]}}) + "\n")
    from fedllm.errors import FedllmError

    with pytest.raises(FedllmError, match="num-server-rounds: 1 -> 2"):  # a changed config is refused by default
        simulate(load_experiment(TINY, {"privacy.enabled": False}), resumed)
    simulate(load_experiment(TINY, {"privacy.enabled": False, "resume.accept-changes": True}), resumed)

    a, b = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, resumed))
    assert [m["round"] for m in b] == [0, 1, 2] and b[0]["run_id"] == first_run
    assert [m["train"]["sampled"] for m in a[1:]] == [m["train"]["sampled"] for m in b[1:]]
    x, y = (load_state(d / "checkpoints" / "round-2" / "global.safetensors") for d in (straight, resumed))
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)
    assert json.loads((resumed / "summary.json").read_text())["rounds"] == 2


def test_one_poisoning_client_in_six_is_contained(tmp_path, cache_dir):
    """1e30 deltas from one client in six: the run completes within 1% of the clean run's
    held-out loss under fedavg with validation.max-delta-norm=auto, and under fedmedian alone."""
    from simulations.poisoning import run

    clean = run("clean", {}, tmp_path / "clean", poisoned=False)
    bounded = run("auto", {"validation.max-delta-norm": "auto"}, tmp_path / "auto", poisoned=True)
    median = run("median", {"strategy.name": "fedmedian", "validation.max-delta-norm": "none"}, tmp_path / "median",
                 poisoned=True)
    assert bounded["rejected"] == 2 and median["rejected"] == 0  # dropped by the bound; outvoted by the median
    for result in (bounded, median):
        assert abs(result["loss"] / clean["loss"] - 1) < 0.01, (result, clean)


def test_the_generated_app_declares_the_runs_config_and_nothing_else(tmp_path):
    """What the ServerApp reads back is the run's config; only non-default keys are declared
    (Flower copies the run config per simulated node), and the components are the project's
    unless an experiment names its own client app."""
    import tomllib

    from fedllm.simulate import load_experiment, write_app

    config = load_experiment(TINY, {"run-dir": str(tmp_path / "run"), "strategy.name": "fedadam"})
    app = tomllib.loads((write_app(tmp_path / "app", config, "faulty_client:app") / "pyproject.toml").read_text())
    declared = app["tool"]["flwr"]["app"]["config"]
    assert Config.from_flat(declared) == config
    assert "strategy.name" in declared and "privacy.delta" not in declared and len(declared) < 30
    assert app["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                         "clientapp": "faulty_client:app"}
