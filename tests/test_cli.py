"""The `fedllm` command refuses bad input before anything runs, without a traceback."""

import pytest

from conftest import TINY
from fedllm.cli import main


@pytest.mark.parametrize("args, message", [
    (["--set", "lora.r=0"], "config key 'lora.r': got 0, expected an integer in 1..1024"),
    (["--set", "lora.rank=4"], "unknown config key 'lora.rank'; did you mean 'lora.r'"),
    (["--set", "lora.r"], "--set expects KEY=VALUE"),
    (["--config", "no-such-file.toml"], "config file no-such-file.toml does not exist"),
    (["--set", "data.path=/no/such/folder"], "data.path=/no/such/folder is not a directory"),
    (["--set", "num-clients=100000", "--set", "clients-per-round=3"], "num-clients=100000 but only"),
    (["--set", "privacy.delta=0.5"], "privacy.delta=0.5 is not below 1/n"),
])
def test_bad_input_is_refused_with_a_message(args, message, capsys, tmp_path):
    code = main(["simulate", "--config", str(TINY), "--run-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_keys_lists_every_key(capsys):
    from fedllm.config import KEYS

    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in KEYS)
