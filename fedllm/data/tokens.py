"""Records to token ids: one record is one example, truncated, never split."""

from __future__ import annotations

import torch


def encode(tokenizer, texts: list[str] | tuple[str, ...], max_length: int) -> list[list[int]]:
    """`<bos> text <eos>` per record, cut to `max_length` tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [(bos + ids + eos)[:max_length] for ids in encoded]


def collate(examples: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; the attention mask marks real tokens."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example, dtype=torch.long)
        attention_mask[row, : len(example)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
