"""Personalisation on the device: methods that turn the global adapter into one that
fits this client better, without anything personal leaving the device.

- none:     the global adapter as it is.
- finetune: fine-tune a copy of the global adapter on local records; kept in the state store.
- adapter:  a second LoRA adapter ("personal") stacked on the frozen global one; only it
            trains, and it is kept in the client's state store.
- ditto:    a personal copy of the adapter, trained with (lambda/2)||v - w_global||^2
            pulling it toward the global one (Li et al., 2021); kept in the state store.

Each method is a `train(steps)` hook plus what to keep; the caller decides whether the
steps run privately. Only `fedllm.model`'s "default" adapter is ever sent anywhere.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from fedllm import atomic
from fedllm.model import AdapterState, target_modules, train_adapter

PERSONAL = "personal"
METHODS = ("none", "finetune", "adapter", "ditto")


def save_state(path: Path, state: AdapterState) -> None:
    """Atomically write adapter tensors (safetensors format)."""
    from safetensors.torch import save

    atomic.write_bytes(path, save({k: v.contiguous() for k, v in state.items()}))


MAX_STATE_BYTES = 4 << 30  # an adapter file larger than this is not one fedllm wrote for a model it can load
MAX_HEADER_BYTES = 16 << 20


def load_state(path: Path) -> AdapterState | None:
    """The adapter tensors in a state-store file, or None when it is absent. The file is on
    disk, so it is not trusted: its size, its header, every tensor's dtype and every value
    are checked, and anything else is refused in one line that names the file."""
    import json
    import struct

    from safetensors import SafetensorError
    from safetensors.torch import load

    from fedllm.errors import MOVE_ASIDE, FedllmError

    path = Path(path)
    if not path.exists():
        return None

    def refuse(why: str) -> FedllmError:
        return FedllmError(f"{path}: {why}; {MOVE_ASIDE}")

    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise refuse(f"{size} bytes, over the {MAX_STATE_BYTES >> 30} GiB an adapter file may have")
        data = path.read_bytes()
    except OSError as exc:
        raise refuse(f"unreadable ({exc.strerror or exc})") from None
    if len(data) < 8:
        raise refuse("truncated: not a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise refuse(f"its header claims {header_len} bytes, the file has {len(data) - 8}: truncated or damaged")
    try:
        header = json.loads(data[8:8 + header_len])
        state = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, RuntimeError, OverflowError) as exc:
        raise refuse(f"not a readable safetensors file ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise refuse(f"tensor {key[:80]!r} has dtype {tensor.dtype}, not a floating-point adapter tensor")
        if tensor.ndim > 4:
            raise refuse(f"tensor {key[:80]!r} has {tensor.ndim} dimensions, an adapter tensor has at most 4")
        if not torch.isfinite(tensor).all():
            raise refuse(f"tensor {key[:80]!r} holds values that are not finite (NaN or infinity)")
    if not state:
        raise refuse("it holds no tensor")
    return state


def personal_state(model) -> AdapterState:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=PERSONAL)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


@contextlib.contextmanager
def stacked_personal_adapter(model, personal, lora, state: AdapterState | None, seed: int):
    """Within the block, `model` computes with global + personal adapters and only the
    personal one is trainable; on exit the personal adapter is removed again."""
    from peft import LoraConfig, set_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=personal.r, lora_alpha=2 * personal.r, lora_dropout=0.0,
                        target_modules=target_modules(model, lora.target_modules), task_type="CAUSAL_LM")
    model.add_adapter(PERSONAL, config)
    model.base_model.set_adapter(["default", PERSONAL])
    for name, param in model.named_parameters():
        param.requires_grad_(f".{PERSONAL}." in name)
    if state is not None:
        set_peft_model_state_dict(model, state, adapter_name=PERSONAL)
    try:
        yield
    finally:
        model.base_model.set_adapter("default")
        model.delete_adapter(PERSONAL)
        train_adapter(model)


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: Ditto's anchor (the global weights)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class EarlyStopping:
    """Keep the trainable weights with the lowest loss on a validation split of the
    client's *training* records (its last ones), checked every `every` steps and before
    the first. Never looks at the held-out set. Used without DP only: choosing among
    checkpoints on private records is itself a release that DP-SGD does not account for.
    """

    def __init__(self, model, validation_loss, every: int):
        self.model, self.validation_loss, self.every = model, validation_loss, every
        self.best_loss, self.best_step = validation_loss(), 0
        self.best = trainable_snapshot(model)

    def __call__(self, step: int) -> None:
        if step % self.every:
            return
        loss = self.validation_loss()
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.best = loss, step, trainable_snapshot(self.model)

    def restore(self) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.best:
                    param.copy_(self.best[name])
