"""Record-level DP: accounting, the ledger, the DP-SGD front door and its safety checks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedllm.config import LoraConfig
from fedllm.data.tokens import encode
from fedllm.model import adapter_state, attach_lora, load_base
from fedllm.privacy.accounting import calibrate, epsilon
from fedllm.audit.evidence import recompute_epsilon
from fedllm.privacy.engine import PrivacyError, check_adapter_moved, make_private, poisson_sample_rate
from fedllm.privacy.events import Charge
from fedllm.privacy.ledger import Ledger, LedgerError
from fedllm.train import loader_for, make_optimizer, train_local

TEXTS = ["To be, or not to be, that is the question.", "All the world's a stage.", "Words, words, words."] * 4


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.2, 10), (0.7, 0.125, 25), (2.0, 0.05, 100)])
def test_opacus_prv_agrees_with_dp_accounting_pld(sigma, q, steps):
    charges = [Charge(r, sigma, q, steps // 2) for r in range(2)]
    history = [c.to_dict() for c in charges]
    prv, pld = epsilon(charges, 1e-5), recompute_epsilon(history, 1e-5, "pld")
    assert prv == pytest.approx(pld, rel=0.01)
    assert recompute_epsilon(history, 1e-5, "rdp") >= pld  # RDP is an upper bound


def test_merging_identical_mechanisms_changes_nothing():
    split = [Charge(r, 1.1, 0.2, 5) for r in range(4)]
    assert epsilon(split, 1e-5) == pytest.approx(epsilon([Charge(0, 1.1, 0.2, 20)], 1e-5), rel=1e-6)


def test_calibration_spends_the_target():
    sigma = calibrate(8.0, 1e-5, 0.2, 10)
    assert epsilon([Charge(1, sigma, 0.2, 10)], 1e-5) == pytest.approx(8.0, rel=0.01)


def _ledger(tmp_path, **kw):
    args = dict(client_id="c1", num_records=40, delta=1e-5, target_epsilon=8.0, sample_rate=0.2,
                max_grad_norm=1.0, planned_steps=10, accountant="prv")
    args.update(kw)
    return Ledger.open(tmp_path / "c1" / "ledger.json", **args)


def test_ledger_persists_and_continues(tmp_path):
    ledger = _ledger(tmp_path)
    charge = [ledger.next_charge(1, 5)]
    assert ledger.affordable(charge)[0]
    ledger.charge(charge)
    again = _ledger(tmp_path, target_epsilon=100.0)  # a later run: same ledger, same noise and target
    assert again.history == ledger.history and again.noise_multiplier == ledger.noise_multiplier
    assert again.target_epsilon == 8.0
    again.charge([again.next_charge(2, 5)])
    assert again.epsilon() == pytest.approx(8.0, rel=0.01)
    affordable, after = again.affordable([again.next_charge(3, 5)])
    assert not affordable and after > 8.0
    saved = json.loads((tmp_path / "c1" / "ledger.json").read_text())
    assert [h["round"] for h in saved["history"]] == [1, 2]
    assert saved["sampling"] == "poisson" and saved["secure_rng"] is False and "opacus" in saved["versions"]


def test_ledger_refuses_large_delta_foreign_and_corrupt_files(tmp_path):
    with pytest.raises(LedgerError, match="not below 1/n"):
        _ledger(tmp_path, num_records=10, delta=0.2)
    _ledger(tmp_path)
    with pytest.raises(LedgerError, match="belongs to client c1"):
        _ledger(tmp_path, client_id="c2")
    (tmp_path / "c1" / "ledger.json").write_text("{broken")
    with pytest.raises(LedgerError, match="unreadable"):
        _ledger(tmp_path)


def _private_setup(path, texts=TEXTS, batch_size=4):
    model, tokenizer = load_base(str(path))
    peft = attach_lora(model, LoraConfig(r=4), seed=0)
    examples = encode(tokenizer, texts, 32)
    loader = loader_for(examples, batch_size, tokenizer.pad_token_id, seed=0)
    return peft, loader, make_optimizer(peft, 1e-2, 0.0)


def test_dp_sgd_moves_only_lora_and_uses_poisson_sampling(tiny_llama):
    model, loader, optimizer = _private_setup(tiny_llama)
    before = adapter_state(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    private = make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    assert private.sample_rate == poisson_sample_rate(len(TEXTS), 4) == 1 / 3
    try:
        train_local(model, private.loader, private.optimizer, steps=5, on_empty=private.noise_step)
    finally:
        private.close()
    check_adapter_moved(before, adapter_state(model))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_empty_poisson_batches_take_a_noise_only_step(tiny_llama):
    model, loader, optimizer = _private_setup(tiny_llama, texts=TEXTS[:2], batch_size=1)
    private = make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    torch.manual_seed(0)
    try:
        result = train_local(model, private.loader, private.optimizer, steps=30, on_empty=private.noise_step)  # P(empty) = 1/4 per step
    finally:
        private.close()
    assert result.steps == 30 and result.num_examples < 60


def test_non_adapter_trainable_is_refused(tiny_llama):
    model, loader, _ = _private_setup(tiny_llama)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    with pytest.raises(PrivacyError, match="non-adapter parameters are trainable"):
        make_private(model, make_optimizer(model, 1e-2, 0.0), loader, 1.0, 1.0)


def test_unchanged_lora_is_refused():
    state = {"a": torch.ones(2)}
    with pytest.raises(PrivacyError, match="did not change"):
        check_adapter_moved(state, {"a": torch.ones(2)})


def test_non_poisson_sampling_is_refused(tiny_llama, monkeypatch):
    from opacus import PrivacyEngine

    model, loader, optimizer = _private_setup(tiny_llama)
    real = PrivacyEngine.make_private

    def shuffled(self, **kw):
        return real(self, **{**kw, "poisson_sampling": False})

    monkeypatch.setattr(PrivacyEngine, "make_private", shuffled)
    with pytest.raises(PrivacyError, match="not Poisson"):
        make_private(model, optimizer, loader, 1.0, 1.0)


CRASHING_CLIENT = """
import sys
from fedllm.client_round import Request, train_round
from fedllm.model import adapter_state, attach_lora, load_base, resolve_base
from fedllm.simulate import load_experiment
config = load_experiment(sys.argv[1], {"local-steps": 100000, "privacy.state-dir": sys.argv[2],
                                       "privacy.planned-rounds": 1})
base = resolve_base(config)
model, _ = load_base(base)
state = adapter_state(attach_lora(model, config.lora, config.seed))
train_round(config, 0, state, Request(server_round=1))
"""


def test_killed_client_never_under_reports(tmp_path, cache_dir):
    """SIGKILL between charging the ledger and finishing training: the ledger already
    holds the whole round's steps, so it reports at least what was actually spent."""
    from conftest import ROOT, TINY

    from fedllm.model import resolve_base
    from fedllm.simulate import load_experiment

    resolve_base(load_experiment(TINY, {}), progress=False)  # build the tiny base first
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_CLIENT, str(TINY), str(state)], cwd=ROOT,
                            env={**os.environ, "FEDLLM_CACHE": str(cache_dir)})
    ledgers = []
    deadline = time.time() + 120
    while time.time() < deadline and not ledgers:
        ledgers = [p for p in state.glob("*/ledger.json") if json.loads(p.read_text())["history"]]
        time.sleep(0.2)
    time.sleep(2)  # let it take some steps
    assert proc.poll() is None, "the client finished or failed before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ledgers, "the client never charged its ledger"
    ledger = Ledger.load(ledgers[0])
    charged = sum(c.steps for c in ledger.history)
    assert charged == 100000  # the whole round was charged before the first step
    # whatever number of steps ran before the kill (fewer than 100000), epsilon is monotone in steps:
    spent_at_most = epsilon([Charge(1, ledger.noise_multiplier, ledger.sample_rate, charged - 1)], ledger.delta)
    assert ledger.epsilon() >= spent_at_most


def test_empty_batch_shapes_from_opacus():
    from fedllm.privacy.engine import is_empty

    assert is_empty({"input_ids": torch.empty(0, 7, dtype=torch.long), "attention_mask": torch.empty(0, 7)})
    assert is_empty([torch.tensor([], dtype=torch.long)] * 3)  # the very first batch was empty
    assert not is_empty({"input_ids": torch.ones(2, 7, dtype=torch.long)})
