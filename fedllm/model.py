"""Load a base causal LM, attach LoRA, and move adapter tensors in and out.

Only adapter tensors ever cross the wire or get checkpointed; the keys are peft's
(`get_peft_model_state_dict`), the same as in a saved `adapter_model.safetensors`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedllm.base import BaseRecipe, default_cache_dir, ensure_base
from fedllm.errors import ModelError

# Attention projections LoRA adapts, per `config.model_type`; q and v as in the LoRA paper.
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
}

AdapterState = dict[str, torch.Tensor]
# transformers 5 deprecates an attribute peft reads on every wrap: nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def base_recipe(config) -> BaseRecipe:
    b = config.base
    return BaseRecipe(
        vocab_size=b.vocab_size, hidden_size=b.hidden_size, layers=b.layers, heads=b.heads,
        seq_len=b.seq_len, steps=b.steps, batch_size=b.batch_size, lr=b.lr, seed=b.seed,
        public_fraction=config.data.public_fraction, split_seed=config.data.split_seed,
    )


def resolve_base(config, progress: bool = True) -> str:
    """A path or hub id that `from_pretrained` loads; builds the built-in base if needed."""
    if config.model.name == "builtin":
        cache = Path(config.model.cache_dir) if config.model.cache_dir else default_cache_dir()
        return str(ensure_base(base_recipe(config), cache, progress=progress))
    return config.model.name


def load_base(name_or_path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Model (frozen, eval mode, in `dtype` on `device`) and tokenizer from a local path or
    the local HF cache. The model is on its device before peft wraps it: Opacus's hooks
    and peft's adapter then live where the forward pass runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    if (name_or_path.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise ModelError(f"model.name={name_or_path}: no such model directory")
    source = str(local) if local.is_dir() else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.name={name_or_path}: cannot load it ({exc}). fedllm runs offline: give a local "
            "directory in Hugging Face format, a hub id already in the local cache, or 'builtin'"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return model.to(device), tokenizer


def target_modules(model, setting: str = "auto") -> list[str]:
    if setting != "auto":
        return [name.strip() for name in setting.split(",") if name.strip()]
    model_type = getattr(model.config, "model_type", "")
    if model_type not in TARGET_MODULES:
        raise ModelError(
            f"no default LoRA target modules for model type '{model_type}'; "
            "set lora.target-modules to a comma-separated list of module names"
        )
    return TARGET_MODULES[model_type]


def attach_lora(model, lora, seed: int):
    """Wrap `model` with one trainable LoRA adapter; the initial A is seeded, B is zero."""
    from peft import LoraConfig, get_peft_model

    names = target_modules(model, lora.target_modules)
    torch.manual_seed(seed)
    # peft keeps the adapter in float32 over a half-precision base (autocast_adapter_dtype)
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names, task_type="CAUSAL_LM"
    )
    try:
        peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise ModelError(f"lora.target-modules={lora.target_modules}: {exc}") from exc
    peft_model.fedllm_freeze_a = bool(getattr(lora, "freeze_a", False))
    train_adapter(peft_model)
    return peft_model


def frozen_a(peft_model) -> bool:
    """Whether A is frozen (lora.freeze-a): then it is never trained, sent or received."""
    return bool(getattr(peft_model, "fedllm_freeze_a", False))


def train_adapter(peft_model) -> None:
    """The LoRA tensors train, A only when not frozen; nothing of the base does."""
    frozen = frozen_a(peft_model)
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name and not (frozen and "lora_A" in name))


def adapter_state(peft_model) -> AdapterState:
    """A detached fp32 copy of the adapter tensors that train and travel, keyed as peft saves
    them (with A frozen, B alone: A is the seed's on every device and in every checkpoint)."""
    from peft import get_peft_model_state_dict

    frozen = frozen_a(peft_model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(peft_model).items()
            if not (frozen and "lora_A" in k)}


def adapter_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """Why `state` is not an adapter of `expected`'s keys and shapes ("" when it is)."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return f"adapter keys do not match: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            return f"adapter tensor {key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
    return ""


def load_adapter_state(peft_model, state: AdapterState) -> None:
    """Copy adapter tensors in; refuses anything but exactly the adapter's own keys."""
    from peft import set_peft_model_state_dict

    why = adapter_mismatch(adapter_state(peft_model), state)
    if why:
        raise ModelError(why)
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"adapter keys not used by the model: {result.unexpected_keys[:3]}")


def base_model_bytes(model) -> int:
    """Bytes of the base model's own parameters (LoRA tensors excluded)."""
    seen, total = set(), 0
    for name, param in model.named_parameters():
        if "lora_" in name or id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def state_bytes(state: AdapterState) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(peft_model, state: AdapterState, path: Path) -> None:
    """Write `state` as a PEFT adapter directory (`PeftModel.from_pretrained` loads it)."""
    load_adapter_state(peft_model, state)
    peft_model.save_pretrained(str(path))
    for written in Path(path).rglob("*"):  # peft writes 0644; a run's checkpoints are its owner's alone
        if written.is_file():
            os.chmod(written, 0o600)
