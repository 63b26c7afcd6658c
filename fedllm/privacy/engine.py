"""The one front door to DP-SGD: `make_private` turns the plain model, optimizer and
loader of `fedllm.train` into private ones, with Opacus, and refuses states in which
the reported epsilon would not hold.

Choices (see ../shared/ARCHITECTURE.md): per-sample gradients by hooks on the LoRA
layers only, flat clipping, Poisson sampling; the HF model is not wrapped. Sampling and
noise draw from generators seeded with OS entropy, never from the run seed (the server
knows that seed, and knowing the noise would undo it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedllm.errors import FedllmError


# Expected here, and stated in every report instead (`secure_rng: false`): torch 2.x has no
# secure RNG for Opacus; and the frozen base means no *input* needs a gradient.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


class PrivacyError(FedllmError):
    """A state in which a reported epsilon would be false; training must stop."""


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS, on `device` (Opacus draws the noise where the gradients are)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def poisson_sample_rate(num_records: int, batch_size: int) -> float:
    """The rate Opacus' DPDataLoader uses: 1 / (number of batches of the plain loader)."""
    return 1.0 / -(-num_records // min(batch_size, num_records))


def check_only_adapter_trainable(model) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    foreign = [n for n in trainable if "lora_A" not in n and "lora_B" not in n]
    if foreign:
        raise PrivacyError(f"non-adapter parameters are trainable under DP: {foreign[:3]}; only LoRA may train")
    if not trainable:
        raise PrivacyError("no trainable LoRA parameters: nothing to train privately")


@dataclass
class Private:
    """The private training objects, and the hooks to remove when the round is done."""

    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    sample_rate: float
    hooks: object
    steps_taken: int = 0  # updates the optimizer really applied (counted by a step hook)
    _step_hook: object = None

    def ran(self) -> tuple[float, float, int, float]:
        """(noise multiplier, sample rate, steps, clip) of what actually ran: what the charge must equal."""
        return (float(self.optimizer.noise_multiplier), float(self.loader.batch_sampler.sample_rate),
                self.steps_taken, float(self.optimizer.max_grad_norm))

    def check_charged(self, noise_multiplier: float, sample_rate: float, steps: int, max_grad_norm: float) -> None:
        """The invariant of every report: the ledger charged exactly the mechanism that ran."""
        ran = self.ran()
        charged = (noise_multiplier, sample_rate, steps, max_grad_norm)
        names = ("noise multiplier", "sample rate", "steps", "clip norm")
        differ = [f"{n}: charged {c!r}, ran {r!r}" for n, c, r in zip(names, charged, ran) if abs(c - r) > 1e-12]
        if differ:
            raise PrivacyError("the ledger's charge differs from what ran (" + "; ".join(differ) + "); this round's "
                               "report would be false, so it is not sent")

    def noise_step(self, batch) -> bool:
        """Take the step of an empty Poisson batch (noise alone) and say so; False for a
        batch with records, which the training loop steps as usual."""
        if not is_empty(batch):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        noise_only_step(self.optimizer)
        return True

    def close(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
        self.hooks.cleanup()
        for p in self.optimizer.params:
            p.grad_sample = None


def make_private(model, optimizer, loader, noise_multiplier: float, max_grad_norm: float,
                 charged_rate: float | None = None) -> Private:
    """Opacus DP-SGD over `model`'s trainable (LoRA) parameters, Poisson-sampled; refuses a
    loader whose sample rate is not `charged_rate` (the one the ledger charges)."""
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    check_only_adapter_trainable(model)
    model.train()  # Opacus attaches per-sample hooks only to a model in training mode
    plain = torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                                        generator=entropy_generator())
    engine = PrivacyEngine(accountant="prv", secure_mode=False)
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=plain, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks", wrap_model=False,
        noise_generator=entropy_generator(next(p for p in model.parameters() if p.requires_grad).device),
    )
    expected = poisson_sample_rate(len(loader.dataset), loader.batch_size)
    sampler = getattr(dp_loader, "batch_sampler", None)
    why = ""
    if not isinstance(dp_loader, DPDataLoader) or not isinstance(sampler, UniformWithReplacementSampler):
        why = "DP-SGD loader is not Poisson-sampled; the reported epsilon would not hold"
    elif abs(sampler.sample_rate - expected) > 1e-12:
        why = f"Poisson sample rate {sampler.sample_rate} differs from the expected {expected}"
    elif charged_rate is not None and abs(sampler.sample_rate - charged_rate) > 1e-12:
        why = f"Poisson sample rate {sampler.sample_rate} differs from the charged {charged_rate}"
    if why:
        hooks.cleanup()  # the model stays usable (a worker reuses it for the next client)
        raise PrivacyError(why)
    private = Private(dp_optimizer, dp_loader, expected, hooks)
    private._step_hook = optimizer.register_step_post_hook(lambda *_: setattr(private, "steps_taken",
                                                                                private.steps_taken + 1))
    return private


def is_empty(batch) -> bool:
    """An empty Poisson batch: Opacus returns empty tensors shaped like the first batch,
    or, when the very first batch is empty, a list of empty tensors."""
    if isinstance(batch, Mapping):
        return batch["input_ids"].shape[0] == 0
    if all(torch.is_tensor(t) and t.numel() == 0 for t in batch):
        return True
    raise TypeError(f"unexpected batch of type {type(batch).__name__}")


def noise_only_step(optimizer) -> None:
    """An empty Poisson batch still takes a step: zero clipped sum plus noise.

    HF models cannot run a forward pass on zero rows, and skipping the step would make
    the mechanism differ from the one accounted for.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        p.grad = torch.zeros_like(p)
    optimizer.step()


def check_adapter_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Opacus has a known silent failure in which LoRA weights never change while
    epsilon is still spent; refuse to report such a round."""
    if all(torch.equal(before[k], after[k]) for k in before):
        raise PrivacyError("LoRA weights did not change after DP-SGD steps; per-sample gradients are not reaching "
                           "the adapter (was the model moved to its device after peft wrapped it?)")
