import pytest
import torch

from fedllm.config import LoraConfig
from fedllm.errors import ModelError
from fedllm.model import (adapter_state, attach_lora, base_model_bytes, load_adapter_state, load_base, save_adapter,
                          state_bytes)


def test_lora_on_llama_only_adapter_is_trainable(tiny_llama):
    model, tokenizer = load_base(str(tiny_llama))
    peft = attach_lora(model, LoraConfig(r=2), seed=0)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    assert state_bytes(adapter_state(peft)) < 0.1 * base_model_bytes(peft)


def test_lora_targets_per_architecture(tiny_gpt2):
    model, _ = load_base(str(tiny_gpt2))
    peft = attach_lora(model, LoraConfig(r=2), seed=0)
    assert all("c_attn" in k for k in adapter_state(peft))


def test_explicit_target_modules_and_bad_ones(tiny_llama):
    model, _ = load_base(str(tiny_llama))
    peft = attach_lora(model, LoraConfig(r=2, target_modules="k_proj, o_proj"), seed=0)
    assert {k.split(".")[-3] for k in adapter_state(peft)} == {"k_proj", "o_proj"}
    model, _ = load_base(str(tiny_llama))
    with pytest.raises(ModelError, match="lora.target-modules"):
        attach_lora(model, LoraConfig(target_modules="no_such_module"), seed=0)


def test_adapter_state_round_trip_through_peft_directory(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = load_base(str(tiny_llama))
    peft = attach_lora(model, LoraConfig(r=2), seed=0)
    state = {k: torch.randn_like(v) for k, v in adapter_state(peft).items()}
    save_adapter(peft, state, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter")
    again = adapter_state(reloaded)
    assert set(again) == set(state)
    assert all(torch.equal(again[k], state[k]) for k in state)
    # and back into a fresh model
    model2, _ = load_base(str(tiny_llama))
    peft2 = attach_lora(model2, LoraConfig(r=2), seed=1)
    load_adapter_state(peft2, again)
    assert all(torch.equal(adapter_state(peft2)[k], state[k]) for k in state)


def test_adapter_state_refuses_foreign_keys_and_shapes(tiny_llama):
    model, _ = load_base(str(tiny_llama))
    peft = attach_lora(model, LoraConfig(r=2), seed=0)
    state = adapter_state(peft)
    with pytest.raises(ModelError, match="unexpected"):
        load_adapter_state(peft, {**state, "lm_head.weight": torch.zeros(3)})
    key = next(iter(state))
    with pytest.raises(ModelError, match="shape"):
        load_adapter_state(peft, {**state, key: torch.zeros(1, 1)})


def test_missing_local_model_and_offline_hub_id(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        load_base(str(tmp_path / "missing-model"))
    with pytest.raises(ModelError, match="runs offline"):
        load_base("nobody/no-such-model-anywhere")
