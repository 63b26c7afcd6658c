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


def test_every_round_personalisation_versions_and_charges_each_participation(setup, tmp_path):
    """Ditto's protocol with personal.every-round: each training participation also trains
    the personal adapter against the global one received, charged and versioned."""
    from fedllm.device_status import status_lines
    from fedllm.personal_round import train_and_personalise
    from fedllm.privacy.ledger import Ledger
    from fedllm.state import StateStore

    config, _, worker = setup(**{"personal.method": "ditto", "personal.steps": 2, "personal.every-round": "true",
                                 "privacy.planned-rounds": 3})
    store = None
    for server_round in (1, 2, 3):
        update = train_and_personalise(config, 1, worker.initial, Request(server_round, "run1"))
        store = StateStore(tmp_path / "state", update.client_id)
        info = store.personal_info()
        assert (info["version"], info["global_round"], info["reason"]) == (server_round, server_round, "every-round")
        assert store.model_info()["global_round"] == server_round  # the global adapter it trained from is kept
    ledger = Ledger.load(store.ledger_path)
    assert [(c.round, c.kind) for c in ledger.history] == [(r, k) for r in (1, 2, 3) for k in ("train", "personal")]
    assert info["epsilon"] == pytest.approx(ledger.epsilon()) == pytest.approx(update.report["epsilon"])
    assert ledger.planned_steps >= 3 * (config.local_steps + 2)  # calibrated for the personal steps too
    assert any("ditto version 3" in line for line in status_lines(store))


@pytest.fixture(scope="module")
def personal_run(tmp_path_factory, cache_dir):
    """One private run with stacked personal adapters, every reply recorded."""
    from fedllm.simulate import load_experiment, simulate

    run_dir = tmp_path_factory.mktemp("personal") / "run"
    config = load_experiment(TINY, {"personal.method": "adapter", "clients-per-round": 3})
    simulate(config, run_dir, client_app="recording_client:app")
    return run_dir


def test_nothing_personal_leaves_the_device(personal_run):
    """Every message a client sends: train replies carry exactly the global adapter's keys
    (its delta), evaluate and query replies carry no tensor at all."""
    run_dir = personal_run
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


def _evaluated_client(run_dir):
    """A client that personalised (it has a personal.json) and its partition id."""
    from fedllm.config import Config
    from fedllm.data import load_clients

    stores = sorted(p.parent for p in (run_dir / "clients").glob("*/personal.json"))
    assert stores, "no client personalised"
    config = Config.from_flat({**json.loads((run_dir / "config.json").read_text()), "run-dir": str(run_dir)})
    ids = [c.client_id for c in load_clients(config)]
    return config, stores[0].name, ids.index(stores[0].name)


def test_generate_uses_the_devices_own_model_and_is_deterministic_for_a_seed(personal_run, capsys):
    from fedllm.cli import main

    _, client, _ = _evaluated_client(personal_run)
    args = ["generate", "--state-dir", str(personal_run / "clients"), "--client-id", client,
            "--prompt", "To be", "--max-new-tokens", "12"]
    outputs = []
    for seed in ("3", "3", "4"):
        assert main(args + ["--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("To be") and len(outputs[0].strip()) > len("To be")
    assert main(args + ["--adapter", "global", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert main(["client", "status", "--state-dir", str(personal_run / "clients"), "--client-id", client]) == 0
    status = capsys.readouterr().out
    assert "personal adapter: adapter version 1" in status and "ledger: epsilon" in status
    # several clients and none named: told to choose, nothing guessed
    assert main(["generate", "--state-dir", str(personal_run / "clients")]) == 2
    assert "--client-id" in capsys.readouterr().err


def test_exports_reproduce_the_personalised_model(personal_run, tmp_path, capsys):
    """hf: the held-out loss of the stacked, unmerged personal model within 1e-4; onnx:
    next-token logits in onnxruntime itself within 1e-3 of the hf export's."""
    import numpy as np
    import onnxruntime
    from transformers import AutoModelForCausalLM

    from fedllm.cli import main
    from fedllm.data.tokens import collate
    from fedllm.evaluate import evaluate
    from fedllm.model import load_adapter_state
    from fedllm.personal import load_state, stacked_personal_adapter
    from fedllm.state import StateStore
    from fedllm.worker import examples_for, worker_for

    config, client, partition = _evaluated_client(personal_run)
    config = config.with_values({"privacy.enabled": False})
    store = StateStore(personal_run / "clients", client)
    worker = worker_for(config)
    _, heldout = examples_for(worker, client_data(config, partition), config.model.max_length)
    pad = worker.tokenizer.pad_token_id
    load_adapter_state(worker.model, load_state(store.global_path))
    with stacked_personal_adapter(worker.model, config.personal, config.lora,
                                  load_state(store.personal_path("adapter")), seed=0):
        personal_loss = evaluate(worker.model, heldout, 8, pad)["loss"]

    assert main(["export", "--state-dir", str(personal_run / "clients"), "--client-id", client,
                 "--out", str(tmp_path / "hf")]) == 0
    assert "MiB on disk" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert abs(evaluate(exported, heldout, 8, pad)["loss"] - personal_loss) < 1e-4

    assert main(["export", "--state-dir", str(personal_run / "clients"), "--client-id", client,
                 "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "max |diff|" in out
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    batch = collate(heldout[:3], pad)
    with torch.no_grad():
        reference = exported(**batch).logits.numpy()
    for row, example in enumerate(heldout[:3]):
        runtime = session.run(["logits"], {"input_ids": np.asarray([example], dtype=np.int64)})[0][0]
        assert np.abs(runtime - reference[row, : len(example)]).max() < 1e-3
    provenance = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert provenance["client_id"] == client and provenance["ledger_epsilon"] > 0
    # a second export into the same folder overwrites nothing
    assert main(["export", "--state-dir", str(personal_run / "clients"), "--client-id", client,
                 "--out", str(tmp_path / "hf")]) == 2


def test_new_records_personalise_again_at_daemon_start_and_are_charged_honestly(setup, tmp_path, capsys):
    """A device's file grows: the daemon's start personalises again on its own, charged at
    the sample rate of the new record count (a zero-step 'records' entry marks the change),
    and the ledger still passes the independent audit."""
    from fedllm.cli import main
    from fedllm.data import load_clients
    from fedllm.deploy.daemon import supernode_command
    from fedllm.privacy.engine import poisson_sample_rate
    from fedllm.privacy.ledger import Ledger
    from fedllm.state import StateStore

    config, _, worker = setup(**{"personal.method": "finetune", "personal.steps": 2, "privacy.planned-rounds": 4})
    lines = [r.replace("\n", " ") for c in load_clients(config) for r in c.train][:120]
    data = tmp_path / "device.txt"
    data.write_text("\n".join(lines[:60]) + "\n")
    node = {"data-path": str(data), "state-dir": str(tmp_path / "state"), "require-dp": True, "max-epsilon": 8.0,
            "max-delta": 1e-5, "model": "builtin", "device": "cpu", "dtype": "auto"}
    update = train_round(config, node, worker.initial, Request(1, "run1"))
    personalise(config, node, worker.initial, Request(1, "run1"))
    store = StateStore(tmp_path / "state", update.client_id)
    assert store.personal_info()["records_seen"] == 60

    for name in ("ca.crt", "key"):
        (tmp_path / name).write_text("x")
    start = dict(superlink="127.0.0.1:1", ca_cert=tmp_path / "ca.crt", key=tmp_path / "key", data=data,
                 state_dir=tmp_path / "state", device="cpu", personalise_on_new_data=True)
    supernode_command(**start)  # nothing new: nothing trained, nothing charged
    assert "no new records (60 records" in capsys.readouterr().out
    before = len(Ledger.load(store.ledger_path).history)

    with data.open("a") as handle:  # the device's owner writes more
        handle.write("\n".join(lines[60:100]) + "\n")
    supernode_command(**start)  # the daemon restarts
    out = capsys.readouterr().out
    assert "personalised on 40 new records (100 in all, newest 20 held out)" in out, out
    info = store.personal_info()
    assert (info["version"], info["records_seen"], info["reason"]) == (2, 100, "new-data")
    ledger = Ledger.load(store.ledger_path)
    new = ledger.history[before:]
    assert [(c.kind, c.steps, c.run) for c in new] == [("records", 0, "device"), ("personal", 2, "device")]
    assert new[0].sample_rate == new[1].sample_rate == poisson_sample_rate(80, config.train.batch_size)
    assert new[1].sample_rate < ledger.sample_rate  # more records: each is sampled less often, and charged so
    assert ledger.epsilon() == pytest.approx(info["epsilon"])
    assert main(["audit", str(store.dir), "--out", str(tmp_path / "audit")]) == 0
