"""`fedllm base shape NAME --out DIR`: a randomly initialised model of a real architecture
and size, with a tokenizer of the matching vocabulary size, so that the cost of real-size
bases (memory, step time, bytes sent) can be measured offline, where no weights can be
downloaded. The weights are random: such a base supports cost figures only, never a
utility claim, and every run on one says so (`SHAPE_FILE` marks the directory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError

SHAPE_FILE = "fedllm-shape.json"
# Published configurations (their config.json on the hub), as plain numbers.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"architecture": "llama", "hidden_size": 576, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                     "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "parameters": 134_515_008},
    "qwen2.5-0.5b": {"architecture": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                     "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                     "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "parameters": 494_032_768},
}
OVERRIDABLE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size")


def shape_config(name: str, overrides: dict[str, int] | None = None):
    """The transformers config of shape `name`, with `overrides` (a reduced size, for tests)."""
    from transformers import LlamaConfig, Qwen2Config

    if name not in SHAPES:
        raise ConfigError(f"base shape {name!r}: known shapes are {', '.join(SHAPES)}")
    values = {k: v for k, v in SHAPES[name].items() if k not in ("architecture", "parameters")}
    for key, value in (overrides or {}).items():
        if key not in OVERRIDABLE:
            raise ConfigError(f"--set {key}: a shape overrides only {', '.join(OVERRIDABLE)}")
        values[key] = int(value)
    if values["num_attention_heads"] % values["num_key_value_heads"] or values["hidden_size"] % values[
            "num_attention_heads"]:
        raise ConfigError("a shape needs hidden_size divisible by num_attention_heads, and num_attention_heads by "
                          "num_key_value_heads")
    kind = LlamaConfig if SHAPES[name]["architecture"] == "llama" else Qwen2Config
    return kind(**values)


def shape_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the public plays, grown to exactly `vocab_size` entries
    with reserved tokens (what a real tokenizer of that size would cost in embeddings)."""
    from fedllm.base import train_tokenizer
    from fedllm.data.corpus import embedded_split, public_texts

    public, _ = embedded_split(0.5, 0)
    tokenizer = train_tokenizer(public_texts(public), vocab_size)
    missing = vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(missing)], special_tokens=True)
    return tokenizer


def build_shape(name: str, out: Path, overrides: dict[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the model directory; returns what `SHAPE_FILE` records (with the parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = shape_config(name, overrides)
    tokenizer = shape_tokenizer(config.vocab_size)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"shape": name, "overrides": dict(overrides or {}), "parameters": count, "random_weights": True,
            "note": "randomly initialised: cost figures only, no utility claim"}
    (out / SHAPE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def shape_of(base: str) -> dict[str, Any] | None:
    """What `SHAPE_FILE` says of a base directory (None for a trained base)."""
    path = Path(base) / SHAPE_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"shape": "unknown", "random_weights": True}
    return info if isinstance(info, dict) else {"shape": "unknown", "random_weights": True}
