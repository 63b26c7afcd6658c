"""The device owns its privacy: requests are checked against its own policy before anything
is charged. Driven through the real ClientApp handlers (`client.app.train`) with Flower
Messages, as a real device (node config from `fedllm client`) and as a simulated one (the
run's config): the only thing missing is the transport."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import TINY
from fedllm.config import Config, load_toml
from fedllm.errors import ConfigError
from fedllm.privacy.policy import DevicePolicy, device_config, refusal


@pytest.fixture(scope="module")
def setup(cache_dir, tmp_path_factory):
    from fedllm.data import load_clients
    from fedllm.model import adapter_state, attach_lora, load_base, resolve_base

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = Config.from_flat(load_toml(TINY))
    model, _ = load_base(resolve_base(config, progress=False))
    initial = adapter_state(attach_lora(model, config.lora, config.seed))
    client = load_clients(config)[0]
    root = tmp_path_factory.mktemp("device")
    data = root / f"{client.client_id}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in (*client.train, *client.heldout)))
    return config, initial, data, root


def _ask(config: Config, initial, context: Context, server_round: int = 1, **changes) -> Message:
    from client.app import train

    flat = {**config.to_flat(), **changes, "server-round": server_round, "run-id": "test-run"}
    msg = Message(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord(flat)}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    return train(msg, context)


def _declined(reply: Message) -> str:
    return str(reply.content["client"]["declined"])


def _device(setup, state: str, **policy) -> Context:
    _, _, data, root = setup
    node = {"data-path": str(data), "state-dir": str(root / state), "require-dp": True, "max-epsilon": 8.0,
            "max-delta": 1e-5, **policy}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_a_real_device_refuses_looser_or_different_mechanisms_and_keeps_its_ledger(setup):
    config, initial, _, root = setup
    device = _device(setup, "state")
    first = _ask(config, initial, device)
    assert not _declined(first) and "arrays" in first.content.array_records
    ledger = next((root / "state").glob("*/ledger.json"))
    before = ledger.read_bytes()
    charged = json.loads(before)["history"]
    assert [e["steps"] for e in charged] == [config.local_steps]  # charged exactly the steps that ran
    hostile = {
        "privacy.enabled": (False, "privacy.enabled=false"),
        "privacy.target-epsilon": (9.0, "privacy.target-epsilon=9"),
        "privacy.delta": (2e-5, "privacy.delta=2e-05"),
        "train.batch-size": (config.train.batch_size * 3, "train.batch-size=24 gives sample rate"),
        "privacy.max-grad-norm": (5.0, "privacy.max-grad-norm=5"),
        "privacy.accountant": ("rdp", "privacy.accountant=rdp"),
    }
    for key, (value, named) in hostile.items():
        reply = _ask(config, initial, device, 2, **{key: value})
        assert _declined(reply).startswith("refused:") and named in _declined(reply), (key, _declined(reply))
        assert "arrays" not in reply.content.array_records
        assert ledger.read_bytes() == before, f"{key}: the ledger changed"
    # A malformed request (a value the config refuses) is refused too, naming the key.
    reply = _ask(config, initial, device, 2, **{"privacy.target-epsilon": 1000.0})
    assert "privacy.target-epsilon" in _declined(reply) and ledger.read_bytes() == before
    # Stricter is accepted and recorded; server-sent paths are ignored.
    evil = root / "evil"
    reply = _ask(config, initial, device, 2, **{"privacy.target-epsilon": 6.0, "privacy.state-dir": str(evil),
                                                "model.cache-dir": str(evil / "cache"), "run-dir": str(evil / "run"),
                                                "data.holdout-fraction": 0.5})
    report = json.loads(reply.content["privacy"]["report"])
    assert report["target_epsilon_applied"] == 6.0 and report["target_epsilon"] == 8.0
    assert not evil.exists()
    assert len(json.loads(ledger.read_text())["history"]) == 2 or _declined(reply).startswith("declined")


def test_a_device_without_a_ledger_refuses_a_budget_above_its_maximum(setup):
    config, initial, _, root = setup
    device = _device(setup, "fresh", **{"max-epsilon": 2.0})
    reply = _ask(config, initial, device)
    assert "exceeds this device's maximum 2" in _declined(reply)
    assert not list((root / "fresh").glob("*/ledger.json"))  # nothing was created, nothing charged
    optional = _device(setup, "optional", **{"require-dp": False})
    plain = _ask(config, initial, optional, **{"privacy.enabled": False})
    assert not _declined(plain) and "arrays" in plain.content.array_records  # its operator allowed it


def test_a_simulated_device_pins_the_runs_mechanism(setup, tmp_path, monkeypatch):
    from fedllm.simulate import DEVICE_CONFIG_ENV

    config, initial, _, _ = setup
    local = config.with_values({"run-dir": str(tmp_path)})
    monkeypatch.setenv(DEVICE_CONFIG_ENV, json.dumps(local.to_flat()))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 6}, state=RecordDict(),
                      run_config={})
    for key, value in {"privacy.planned-rounds": 1, "local-steps": config.local_steps + 5,
                       "privacy.max-grad-norm": 0.5}.items():
        reply = _ask(local, initial, context, **{key: value})
        assert _declined(reply).startswith("refused:"), key
        assert key in _declined(reply) or "noise multiplier" in _declined(reply), _declined(reply)
    assert not (tmp_path / "clients").exists()
    reply = _ask(local, initial, context)
    assert not _declined(reply)
    assert list((tmp_path / "clients").glob("*/ledger.json"))  # in the run's own state store


def test_local_keys_never_come_from_the_request():
    local = {"privacy.state-dir": "/mine", "model.name": "builtin", "data.min-records": 20}
    config = device_config({"privacy.state-dir": "/theirs", "model.name": "/etc", "data.path": "/x",
                            "simulation.cpus-per-client": 64, "lora.r": 4}, local)
    assert config.privacy.state_dir == "/mine" and config.model.name == "builtin" and config.data.path == ""
    assert config.simulation.cpus_per_client == 1 and config.lora.r == 4
    with pytest.raises(ConfigError):
        device_config({"privacy.target-epsilon": float("nan")}, local)


def test_policy_from_flags_is_checked():
    with pytest.raises(ConfigError):
        DevicePolicy(max_epsilon=500)
    with pytest.raises(ConfigError):
        DevicePolicy.from_node_config({"max-delta": "lots"})
    policy = DevicePolicy(require_secagg=True, require_user_dp=True)
    why = refusal(policy, Config())
    assert "secagg.enabled=false" in why and "user-dp.enabled=false" in why


def test_charge_must_equal_what_ran():
    import torch

    from fedllm.privacy.engine import PrivacyError, make_private
    from fedllm.train import loader_for

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.Linear(3, 2)

    loader = loader_for([[1, 2, 3]] * 20, 5, 0, 0)  # Poisson rate 1/4
    model = Tiny()
    with pytest.raises(PrivacyError, match="differs from the charged 0.5"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, 1.0, 1.0, charged_rate=0.5)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, 1.0, 1.0, charged_rate=0.25)
    try:
        private.check_charged(1.0, 0.25, 0, 1.0)  # what ran: no step yet
        with pytest.raises(PrivacyError, match="steps: charged 3, ran 0"):
            private.check_charged(1.0, 0.25, 3, 1.0)
        with pytest.raises(PrivacyError, match="noise multiplier: charged 2.0, ran 1.0"):
            private.check_charged(2.0, 0.25, 0, 1.0)
    finally:
        private.close()


def test_simulated_devices_refuse_a_server_asking_for_more(tmp_path, cache_dir):
    """On Flower's simulation engine: the server asks for target 9 and twice the batch size;
    every device (the run's config: target 8) refuses before charging; no ledger exists."""
    from fedllm.simulate import load_experiment, simulate

    devices = load_experiment(TINY, {"num-server-rounds": 1})
    server = devices.with_values({"privacy.target-epsilon": 9.0, "train.batch-size": 16})
    summary = simulate(devices, tmp_path / "run", server_config=server)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    declined = rounds[1]["train"]["declined"]
    assert len(declined) == 3 and not rounds[1]["train"]["clients"]
    for d in declined:
        assert "refused: privacy.target-epsilon=9 exceeds this device's maximum 8" in d["reason"]
        assert "train.batch-size=16" in d["reason"]
    assert summary["privacy"]["declines"] == 3
    assert not list((tmp_path / "run" / "clients").glob("*/ledger.json"))
