"""Held-out loss, perplexity and next-token top-1/top-3 accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedllm.data.tokens import collate
from fedllm.train import model_device, to_device
from fedllm.messages import EVAL_VALUES as METRICS
from fedllm.messages import SUMMARY_VALUES as SUMMARY_METRICS  # averaged over clients, compared between models

__all__ = ["METRICS", "SUMMARY_METRICS", "evaluate"]


@torch.no_grad()
def evaluate(model, examples: list[list[int]], batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-weighted over the whole held-out set; perplexity is exp(mean token loss)."""
    model.eval()
    device = model_device(model)
    nll_sum, tokens, top1, top3 = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        targets, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        nll_sum += nll[mask].sum().item()
        tokens += int(mask.sum())
        best3 = logits.topk(3, dim=-1).indices
        hits = best3 == targets.unsqueeze(-1)
        top1 += int(hits[..., 0][mask].sum())
        top3 += int(hits.any(-1)[mask].sum())
    loss = nll_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "top1": top1 / max(tokens, 1),
            "top3": top3 / max(tokens, 1), "tokens": float(tokens)}


@torch.no_grad()
def record_losses(model, examples: list[list[int]], batch_size: int, pad_id: int) -> list[float]:
    """Mean token loss of each record on its own (a hive's per-record score)."""
    model.eval()
    device = model_device(model)
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        targets, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
        out.extend((nll.sum(1) / mask.sum(1).clamp(min=1)).tolist())
    return out
