"""Personalisation: personal state stays on the device, survives a restart, is charged."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY
from fedllm.client_round import Request, client_data, train_round
from fedllm.worker import examples_for
from fedllm.personal_round import personalise

OUTPUTS = """
import sys, torch
from fedllm.client_round import client_data
from fedllm.worker import examples_for, worker_for
from fedllm.data.tokens import collate
from fedllm.personal import load_state, stacked_personal_adapter
from fedllm.state import StateStore
from fedllm.simulate import load_experiment
config = load_experiment(sys.argv[1], {"personal.method": "adapter", "privacy.state-dir": sys.argv[2],
                                       "privacy.enabled": "false"})
worker = worker_for(config)
data = client_data(config, 0)
_, heldout = examples_for(worker, data, config.model.max_length)
from fedllm.model import load_adapter_state
load_adapter_state(worker.model, torch.load(sys.argv[3]))
state = load_state(StateStore(sys.argv[2], data.client_id).personal_path("adapter"))
with stacked_personal_adapter(worker.model, config.personal, config.lora, state, seed=123), torch.no_grad():
    logits = worker.model(**collate(heldout[:2], worker.tokenizer.pad_token_id)).logits
torch.save(logits, sys.argv[4])
"""


@pytest.fixture()
def setup(tmp_path, cache_dir):
    from fedllm import worker as workers
    from fedllm.model import resolve_base
    from fedllm.simulate import load_experiment

    def make(**overrides):
        values = {"privacy.state-dir": str(tmp_path / "state"), **overrides}
        config = load_experiment(TINY, values)
        resolve_base(config, progress=False)
        workers.reset()
        return config, None, workers.worker_for(config)

    return make


def test_personal_adapter_is_kept_and_reloaded_after_a_restart(setup, tmp_path):
    from fedllm.data.tokens import collate
    from fedllm.personal import load_state, stacked_personal_adapter
    from fedllm.state import StateStore

    config, _, worker = setup(**{"personal.method": "adapter", "privacy.enabled": "false",
                                       "personal.early-stopping": "false"})
    global_state = {k: v + 0.01 * torch.randn_like(v) for k, v in worker.initial.items()}
    metrics, report = personalise(config, 0, global_state, Request(1))
    assert report is None  # DP is off here
    assert metrics["personal-declined"] == 0.0 and metrics["personal-perplexity"] > 0
    data = client_data(config, 0)
    store = StateStore(tmp_path / "state", data.client_id)
    state = load_state(store.personal_path("adapter"))
    assert state and store.local_only_path.exists()

    # in this process, with the stored personal adapter on top of the global one ...
    from fedllm.model import load_adapter_state
    _, heldout = examples_for(worker, data, config.model.max_length)
    load_adapter_state(worker.model, global_state)
    with stacked_personal_adapter(worker.model, config.personal, config.lora, state, seed=123), torch.no_grad():
        here = worker.model(**collate(heldout[:2], worker.tokenizer.pad_token_id)).logits
    # ... and in a fresh process that only has the state store: the same outputs
    torch.save(global_state, tmp_path / "global.pt")
    subprocess.run([sys.executable, "-c", OUTPUTS, str(TINY), str(tmp_path / "state"), str(tmp_path / "global.pt"),
                    str(tmp_path / "logits.pt")], cwd=ROOT, check=True)
    assert torch.allclose(here, torch.load(tmp_path / "logits.pt"), atol=1e-6)
    # the personal adapter changes the outputs (it is not a no-op)
    with torch.no_grad():
        load_adapter_state(worker.model, global_state)
        plain = worker.model(**collate(heldout[:2], worker.tokenizer.pad_token_id)).logits
    assert not torch.allclose(here, plain)


def test_ditto_continues_from_its_stored_personal_weights(setup, tmp_path):
    from fedllm.personal import load_state
    from fedllm.state import StateStore

    config, _, worker = setup(**{"personal.method": "ditto", "privacy.enabled": "false",
                                       "personal.early-stopping": "false"})
    store = StateStore(tmp_path / "state", client_data(config, 1).client_id)
    personalise(config, 1, worker.initial, Request(1))
    first = load_state(store.personal_path("ditto"))
    personalise(config, 1, worker.initial, Request(2))
    second = load_state(store.personal_path("ditto"))
    assert any(not torch.equal(first[k], worker.initial[k]) for k in first)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_personal_steps_are_charged_to_the_ledger(setup, tmp_path):
    from fedllm.privacy.ledger import Ledger
    from fedllm.state import StateStore

    config, _, worker = setup(**{"personal.method": "finetune", "personal.steps": 3})
    update = train_round(config, 2, worker.initial, Request(1))
    personalise(config, 2, worker.initial, Request(2))
    ledger = Ledger.load(StateStore(tmp_path / "state", update.client_id).ledger_path)
    assert [(c.round, c.kind, c.steps) for c in ledger.history] == [
        (1, "train", config.local_steps), (2, "personal", 3), (2, "local-only", 3)]
    assert ledger.epsilon() <= ledger.target_epsilon
    assert ledger.planned_steps >= config.local_steps + 6


def test_nothing_personal_leaves_the_device(tmp_path, cache_dir):
    """Every message a client sends: train replies carry exactly the global adapter's keys
    (its delta), evaluate and query replies carry no tensor at all."""
    from fedllm.simulate import load_experiment, simulate

    run_dir = tmp_path / "run"
    config = load_experiment(TINY, {"personal.method": "adapter", "clients-per-round": 3})
    simulate(config, run_dir, client_app="recording_client:app")
    sent = [json.loads(line) for line in (run_dir / "sent.jsonl").read_text().splitlines()]
    kinds = {e["kind"] for e in sent}
    assert kinds == {"train", "evaluate", "query"}
    for entry in sent:
        if entry["kind"] == "train":
            assert list(entry["sent_arrays"]) == ["arrays"]
            assert sorted(entry["sent_arrays"]["arrays"]) == entry["received"]
        else:
            assert entry["sent_arrays"] == {}
        assert not any("personal" in k for arrays in entry["sent_arrays"].values() for k in arrays)
    assert any("personal-perplexity" in e["metric_keys"] for e in sent)  # personalisation did run
    # ... and nothing outside the wire contract (fedllm/messages.py): no record, no field
    from fedllm import messages as wire

    contract = {"train": wire.TRAIN_REPLY, "evaluate": wire.EVAL_REPLY, "query": wire.QUERY_REPLY}
    for entry in sent:
        allowed = contract[entry["kind"]]
        assert set(entry["fields"]) <= set(allowed), entry
        for name, fields in entry["fields"].items():
            assert set(fields) <= (set(entry["received"]) if allowed[name] is None else allowed[name]), (name, fields)
    assert list((run_dir / "clients").glob("*/personal-adapter.safetensors"))  # ... and kept its adapter
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"personalised", "local_only", "personalisation"} <= set(summary)
    # DP is on in this run: the server's copy of an evaluated client's report shows its personal steps
    reports = [json.loads(p.read_text()) for p in (run_dir / "privacy" / "clients").glob("*.json")]
    assert any({"personal", "local-only"} <= {h["kind"] for h in r["history"]} for r in reports)
    assert (run_dir / "personalisation.csv").exists() and (run_dir / "personalisation.png").exists()
