import pytest

from fedllm.config import KEYS, Config, describe_keys, load_toml, parse_assignment
from fedllm.errors import ConfigError

REQUIRED = ["num-server-rounds", "clients-per-round", "num-clients", "local-steps", "lora.r", "model.name", "seed"]


def test_required_keys_exist_and_round_trip():
    assert set(REQUIRED) <= set(KEYS)
    config = Config()
    assert Config.from_flat(config.to_flat()) == config
    assert all(isinstance(v, (bool, int, float, str)) for v in config.to_flat().values())


def test_values_are_typed_by_key():
    config = Config.from_flat({"lora.r": "4", "train.lr": "1e-3", "model.name": "builtin", "num-clients": 50.0})
    assert config.lora.r == 4 and config.train.lr == 1e-3 and config.num_clients == 50


@pytest.mark.parametrize("values, message", [
    ({"lora.rank": 4}, r"unknown config key 'lora.rank'; did you mean 'lora.r'"),
    ({"nonsense": 1}, r"unknown config key 'nonsense'"),
    ({"lora.r": 0}, r"'lora.r': got 0, expected an integer in 1..1024"),
    ({"lora.r": "eight"}, r"'lora.r': got 'eight', expected an integer"),
    ({"lora.r": True}, r"'lora.r'.*expected an integer"),
    ({"local-steps": 2.5}, r"'local-steps'.*expected an integer"),
    ({"train.lr": "nan"}, r"'train.lr'.*finite"),
    ({"train.lr": -1}, r"'train.lr'.*> 0"),
    ({"strategy.name": "fedsgd"}, r"'strategy.name'.*one of 'fedavg', 'fedadam', 'fedprox'"),
    ({"train.optimizer": "adam"}, r"'train.optimizer'.*one of 'adamw', 'sgd'"),
    ({"data.holdout-fraction": 1}, r"strictly between 0 and 1"),
    ({"model.name": " "}, r"'model.name'"),
    ({"clients-per-round": 200}, r"clients-per-round=200 exceeds num-clients=100"),
    ({"base.hidden-size": 30, "base.heads": 4}, r"multiple of base.heads"),
])
def test_bad_values_are_refused_naming_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_flat(values)


def test_toml_tables_and_dotted_keys(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[config]\nnum-clients = 12\n"lora.r" = 2\n[config.train]\nlr = 0.5\n')
    config = Config.from_flat(load_toml(path))
    assert (config.num_clients, config.lora.r, config.train.lr) == (12, 2, 0.5)


def test_bad_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("num-clients = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_set_assignment_parsing():
    assert parse_assignment("lora.r=4") == ("lora.r", "4")
    assert parse_assignment("model.name=a=b") == ("model.name", "a=b")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("lora.r")


def test_every_key_is_described():
    assert {row[0] for row in describe_keys()} == set(KEYS)


def test_pyproject_declares_every_key_with_its_default():
    """Flower only accepts `--run-config` overrides of keys the app declares."""
    import tomllib
    from pathlib import Path

    table = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = table["tool"]["flwr"]["app"]["config"]
    assert declared == Config().to_flat()
