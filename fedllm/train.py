"""The local training loop: one plain loop for private and non-private training.

A DP engine wraps the model, optimizer and loader *before* they reach this loop
(`loader_for` builds the loader it would replace); the loop itself never changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from fedllm.data.tokens import collate


@dataclass(frozen=True)
class TrainResult:
    steps: int
    loss: float  # mean over steps of the batch-mean per-sequence loss
    num_examples: int


def model_device(model) -> torch.device:
    """Where the model's (trainable, else any) parameters are: batches go there."""
    params = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    return params[0].device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}


def sequence_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sequence, shape (batch,).

    Per sequence, then averaged by the caller: HF's `out.loss` averages tokens across the
    whole batch, which couples examples (and breaks per-sample clipping under DP).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets, mask = input_ids[:, 1:], attention_mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def loader_for(examples: list[list[int]], batch_size: int, pad_id: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled batches of whole records; reshuffled each pass, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        examples, batch_size=min(batch_size, len(examples)), shuffle=True, generator=generator,
        collate_fn=partial(collate, pad_id=pad_id),
    )


def make_optimizer(model, lr: float, weight_decay: float, name: str = "adamw") -> torch.optim.Optimizer:
    """The local optimizer (train.optimizer). Under DP with few local steps, plain SGD: a
    fresh Adam's first steps are lr x sign(gradient + noise) per coordinate, so noise moves
    every coordinate as far as signal does; SGD's step is proportional to the noised mean."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)


def proximal_term(model, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: (mu / 2) * ||w - w_global||^2 over the trainable (adapter) weights."""
    terms = [((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad]
    return 0.5 * mu * torch.stack(terms).sum()


def train_local(model, loader, optimizer, steps: int, proximal_mu: float = 0.0,
                anchor: dict[str, torch.Tensor] | None = None, after_step=None,
                on_empty: Callable[[Any], bool] | None = None) -> TrainResult:
    """Run `steps` optimizer steps, cycling through the loader as often as needed.

    With `proximal_mu` > 0, the loss gets (mu/2)||w - anchor||^2 over the trainable
    weights; the anchor defaults to the weights at the start (FedProx), Ditto passes the
    global adapter. `after_step(step)` is called after each step (early stopping uses it).
    `on_empty(batch)` takes the step of a batch with no record and says it did (the DP
    engine's rule: `Private.noise_step`); the loop itself knows nothing of DP.
    """
    if proximal_mu <= 0:
        anchor = None
    elif anchor is None:
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    device = model_device(model)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    total, seen, empties = torch.zeros((), dtype=torch.float64, device=device), 0, 0  # summed on the device: no sync
    for step in range(1, steps + 1):
        batch = next(batches)
        if on_empty is not None and on_empty(batch):  # only a Poisson (DP) loader yields these
            empties += 1
            if after_step is not None:
                after_step(step)
            continue
        batch = to_device(batch, device)
        loss = sequence_losses(model, batch["input_ids"], batch["attention_mask"]).mean()
        objective = loss + proximal_term(model, anchor, proximal_mu) if anchor is not None else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        total += loss.detach().double()
        seen += len(batch["input_ids"])
        if after_step is not None:
            model.eval()
            after_step(step)
            model.train()
    model.eval()
    batches_with_data = max(1, steps - empties)
    return TrainResult(steps=steps, loss=total.item() / batches_with_data, num_examples=seen)
