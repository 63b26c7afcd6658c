"""Where the frozen base runs, and in what precision: the `device` and `model.dtype` keys.

Only the frozen base takes the chosen dtype; LoRA weights, optimizer state, per-sample
gradients and everything that leaves the device stay float32 (peft keeps an adapter in
float32 over a half-precision base, and `fedllm.model.adapter_state` copies out float32
on the CPU). A device that is not there is refused, naming what is.
"""

from __future__ import annotations

import re

import torch

from fedllm.errors import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available() -> list[str]:
    """What this machine offers, named as the `device` key takes it."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def valid_device(setting: str) -> bool:
    return bool(re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", setting))


def resolve_device(setting: str) -> torch.device:
    """`auto`: CUDA, then MPS, then CPU; anything else exactly as asked, if it is here."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not valid_device(setting):
        raise ConfigError(f"device={setting!r}: expected {DEVICES}")
    device = torch.device(setting)
    here = device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()) or (
        device.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    if not here:
        raise ConfigError(f"device={setting}: not available on this machine; available: {', '.join(available())} "
                          "(or device=auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype. `auto`: bfloat16 on a CUDA device that supports it, else float32."""
    if setting == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if setting not in DTYPES:
        raise ConfigError(f"model.dtype={setting!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[setting]


def gpus_per_client(setting: str, cpus: int, cpus_per_client: int) -> float:
    """simulation.gpus-per-client as a number. `auto`: none without a GPU; with GPUs, as many
    clients per GPU as the CPUs run at once (at most 8 per GPU, so each keeps its own base
    and activations in memory)."""
    if setting != "auto":
        return float(setting)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        return 0.0
    concurrent = max(1, cpus // max(1, cpus_per_client))
    return max(1 / 8, min(1.0, gpus / concurrent))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timings on an accelerator are otherwise of the launch only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
