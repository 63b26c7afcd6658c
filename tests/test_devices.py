"""Device and precision on a CPU-only machine (CI): `auto` is the CPU, an absent device is
refused by name, a bfloat16 base trains (privately too) with float32 LoRA weights and
deltas, and `fedllm base shape` writes real-size models that run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from fedllm.config import Config
from fedllm.errors import ConfigError

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")


@NO_CUDA
def test_auto_is_the_cpu_here_and_an_absent_device_is_refused_by_name():
    from fedllm.devices import gpus_per_client, resolve_device, resolve_dtype

    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert gpus_per_client("auto", cpus=16, cpus_per_client=1) == 0.0
    for absent in ("cuda", "cuda:3"):
        with pytest.raises(ConfigError, match=r"not available on this machine; available: cpu"):
            resolve_device(absent)
    with pytest.raises(ConfigError, match="device"):
        Config.from_flat({"device": "gpu"})
    with pytest.raises(ConfigError, match="model.dtype"):
        Config.from_flat({"model.dtype": "float8"})


@NO_CUDA
def test_a_gpu_share_without_a_gpu_is_refused_before_ray_starts():
    from flwr.supercore.utils import simulation_config_from_json

    from fedllm.simulate import federation_config

    settings = federation_config(Config())
    assert settings["client_resources_num_gpus"] == 0.0 and settings["num_supernodes"] == Config().num_clients
    simulation_config_from_json(settings)  # every name is one of Flower's SimulationConfig fields
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        federation_config(Config.from_flat({"simulation.gpus-per-client": "0.25"}))
    with pytest.raises(ConfigError, match="gpus-per-client"):
        Config.from_flat({"simulation.gpus-per-client": "2"})


def test_a_bfloat16_base_trains_privately_with_float32_adapter_and_delta(tiny_llama, tmp_path):
    from fedllm.model import adapter_state, attach_lora, load_base, load_adapter_state
    from fedllm.privacy.engine import make_private
    from fedllm.train import loader_for, make_optimizer, train_local

    config = Config.from_flat({"lora.r": 2})
    model, tokenizer = load_base(str(tiny_llama), dtype=torch.bfloat16, device="cpu")
    peft_model = attach_lora(model, config.lora, 0)
    frozen = {p.dtype for n, p in peft_model.named_parameters() if "lora_" not in n}
    trainable = {p.dtype for p in peft_model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}

    start = adapter_state(peft_model)
    examples = [tokenizer("To be, or not to be, that is the question.")["input_ids"]] * 12
    loader = loader_for(examples, 4, tokenizer.pad_token_id, seed=0)
    result = train_local(peft_model, loader, make_optimizer(peft_model, 1e-2, 0.0), steps=3)
    assert result.loss == result.loss and result.loss > 0  # finite
    delta = {k: v - start[k] for k, v in adapter_state(peft_model).items()}
    assert {v.dtype for v in delta.values()} == {torch.float32} and any(v.abs().sum() > 0 for v in delta.values())

    load_adapter_state(peft_model, start)
    optimizer = make_optimizer(peft_model, 1e-2, 0.0)
    private = make_private(peft_model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    try:
        train_local(peft_model, private.loader, private.optimizer, steps=3, on_empty=private.noise_step)
    finally:
        private.close()
    assert {v.dtype for v in adapter_state(peft_model).values()} == {torch.float32}
    assert any(not torch.equal(v, start[k]) for k, v in adapter_state(peft_model).items())

    from fedllm.personal import personal_state, stacked_personal_adapter

    with stacked_personal_adapter(peft_model, config.personal, config.lora, None, seed=1):  # personalisation too
        assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}
        train_local(peft_model, loader, make_optimizer(peft_model, 1e-2, 0.0), steps=2)
        assert {v.dtype for v in personal_state(peft_model).values()} == {torch.float32}


def test_base_shape_smollm2_has_its_published_size(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.cli import main

    out = tmp_path / "smollm2"
    assert main(["base", "shape", "smollm2-135m", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 134_515_008) / 134_515_008 < 0.01
    assert len(AutoTokenizer.from_pretrained(out)) == model.config.vocab_size == 49152
    assert json.loads((out / "fedllm-shape.json").read_text())["random_weights"] is True


def test_a_private_run_on_a_reduced_shape_says_its_weights_are_random(tmp_path, cache_dir):
    from fedllm.cli import main
    from fedllm.simulate import load_experiment, simulate

    base = tmp_path / "qwen-small"
    assert main(["base", "shape", "qwen2.5-0.5b", "--out", str(base), "--set", "num_hidden_layers=2",
                 "--set", "hidden_size=64", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2",
                 "--set", "intermediate_size=128", "--set", "vocab_size=2048"]) == 0
    config = load_experiment(TINY, {"model.name": str(base), "num-server-rounds": 1, "model.dtype": "bfloat16",
                                    "device": "cpu"})
    assert config.privacy.enabled
    summary = simulate(config, tmp_path / "run")
    assert summary["base_shape"]["shape"] == "qwen2.5-0.5b" and summary["base_shape"]["random_weights"]
    assert summary["privacy"]["clients_reporting"] > 0
    assert "BASE WEIGHTS ARE RANDOM" in (tmp_path / "run" / "summary.txt").read_text()


@NO_CUDA
def test_the_gpu_script_fails_fast_without_a_gpu():
    import os
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr


def test_the_worker_keeps_tokenised_clients_within_its_byte_budget(tmp_path, cache_dir):
    """Memory flat in the population: a worker tokenises a client when asked for it and keeps
    at most simulation.cache-mib of them, least recently used dropped first."""
    from fedllm import worker as workers
    from fedllm.client_round import client_data
    from fedllm.simulate import load_experiment

    config = load_experiment(TINY, {"simulation.cache-mib": 1})
    workers.reset()
    w = workers.worker_for(config)
    w.cache_bytes = 300_000  # a few clients' worth
    first = workers.examples_for(w, client_data(config, 0), config.model.max_length)
    for i in range(config.num_clients):
        workers.examples_for(w, client_data(config, i), config.model.max_length)
        assert workers.cached_bytes() <= w.cache_bytes or workers.cached_clients() == 1  # one may exceed it alone
    assert workers.cached_clients() < config.num_clients  # the least recently used were dropped
    assert workers.examples_for(w, client_data(config, 0), config.model.max_length) == first  # re-tokenised
    workers.reset()
