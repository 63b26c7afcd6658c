"""Shared fixtures: tiny models the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "simulations" / "tiny.toml"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One built-in-base cache for the whole session, so the tiny base is built once."""
    path = tmp_path_factory.mktemp("fedllm-cache")
    os.environ["FEDLLM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 1-layer LLaMA with a small BPE tokenizer, saved in Hugging Face format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedllm.base import train_tokenizer

    texts = ["To be, or not to be, that is the question.", "All the world's a stage."] * 50
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A different architecture, to check per-architecture LoRA targets."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedllm.base import train_tokenizer

    tokenizer = train_tokenizer(["Now is the winter of our discontent."] * 50, vocab_size=300)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
