"""The device's own model, from its state store alone: base + the latest global adapter it
received + its personal adapter, merged into a plain transformers model that `fedllm
generate` samples from and `fedllm export` writes out. Nothing is fetched: the base is
the local path the device trained on (recorded in model.json).

Which adapters make "personal" depends on the method that trained it:

    finetune, ditto   the personal adapter replaces the global one (a full LoRA adapter)
    adapter           the personal adapter is stacked on the global one
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from fedllm.config import Config
from fedllm.errors import MOVE_ASIDE, FedllmError
from fedllm.state import MODEL_KEYS, StateStore

CHOICES = ("personal", "global", "base", "hive")


@dataclass
class DeviceModel:
    model: Any  # a transformers causal LM, adapters merged
    tokenizer: Any
    which: str
    config: Config  # the stored settings (model.json), checked
    info: dict[str, Any]  # model.json
    personal: dict[str, Any] | None  # personal.json
    specialist: int | None = None  # a hive's specialist in the model (hive.k > 1)


def stored_config(store: StateStore) -> tuple[Config, dict[str, Any]]:
    """The settings the stored adapters were trained with, checked like any config (the
    file is on disk, so it is not trusted until it parses)."""
    info = store.model_info()
    if info is None:
        raise FedllmError(f"{store.dir} holds no global adapter yet: the device keeps one from its first round "
                          "(train or evaluate) on")
    values = info.get("config")
    if not isinstance(values, dict) or set(values) - set(MODEL_KEYS) or not isinstance(info.get("base"), str):
        raise FedllmError(f"{store.model_path}: expected 'base' and 'config' with keys {list(MODEL_KEYS)}; "
                          "move it aside (the next round writes it again)")
    try:
        return Config.from_flat(values), info
    except FedllmError as exc:
        raise FedllmError(f"{store.model_path}: {exc}; move it aside (the next round writes it again)") from None


def load_device_model(store: StateStore, which: str = "personal", device: str = "cpu",
                      prompt: str = "") -> DeviceModel:
    """The model `which` (personal | global | base | hive), merged, in float32 on `device`.

    With a hive of specialists (hive.k > 1) `global` and `personal` use the specialist the
    device chose last on its records (hive.json), and `hive` routes: the specialist with the
    lowest loss on `prompt`, the same local score (fedllm.hive_device), alone on the base."""
    from fedllm.model import attach_lora, load_base
    from fedllm.personal import load_state

    if which not in CHOICES:
        raise FedllmError(f"--adapter {which}: expected one of {', '.join(CHOICES)}")
    config, info = stored_config(store)
    personal = store.personal_info()
    model, tokenizer = load_base(info["base"], torch.float32, device)
    if which == "base":
        return DeviceModel(model, tokenizer, which, config, info, personal)
    peft_model = attach_lora(model, config.lora, config.seed)
    global_state = load_state(store.global_path)
    if global_state is None:
        raise FedllmError(f"{store.global_path} is missing: the device has not kept a global adapter")
    specialist = None
    if config.hive.k > 1:
        global_state, specialist = _specialist(store, config, peft_model, tokenizer, global_state, which, prompt)
    elif which == "hive":
        raise FedllmError(f"--adapter hive: {store.dir} was trained with one global adapter (hive.k=1); use "
                          "--adapter global or personal")
    _load(peft_model, global_state, store.global_path)
    if which == "personal":
        method = (personal or {}).get("method", config.personal.method)
        state = load_state(store.personal_path(method)) if method in ("finetune", "ditto", "adapter") else None
        if state is None:
            raise FedllmError(f"{store.dir} holds no personal adapter (personal.method={method}): run with "
                              "personal.method=finetune|adapter|ditto, or use --adapter global")
        if method == "adapter":
            try:
                _stack(peft_model, config, state)
            except (FedllmError, RuntimeError, ValueError, KeyError) as exc:
                raise FedllmError(f"{store.personal_path(method)}: does not fit the stored model ({str(exc)[:160]}); "
                                  f"{MOVE_ASIDE}") from None
        else:
            _load(peft_model, state, store.personal_path(method))
    merged = peft_model.merge_and_unload()  # merges the active adapters: default, and personal when stacked
    merged.eval()
    return DeviceModel(merged, tokenizer, which, config, info, personal, specialist)


def _load(peft_model, state: dict, path) -> None:
    """An adapter from the state store into the model: a file whose keys or shapes do not
    fit the stored settings is refused, naming it."""
    from fedllm.model import load_adapter_state

    try:
        load_adapter_state(peft_model, state)
    except (FedllmError, RuntimeError, ValueError) as exc:
        raise FedllmError(f"{path}: does not fit the stored model ({str(exc)[:160]}); {MOVE_ASIDE}") from None


def _specialist(store: StateStore, config: Config, peft_model, tokenizer, packed: dict, which: str,
                prompt: str) -> tuple[dict, int]:
    """(the adapter of the specialist to use, its index): routed on the prompt for `hive`
    (when it has a token to score), else the device's kept choice (0 before it has one)."""
    from fedllm.hive import unpack
    from fedllm.hive_device import read_choice, scores

    try:
        states = unpack(packed, config.hive.k)
    except FedllmError as exc:
        raise FedllmError(f"{store.global_path}: {exc}; move it aside (the next round writes it again)") from None
    ids = prompt_ids(tokenizer, prompt)
    if which == "hive" and len(ids) >= 2:
        chosen = int(scores(peft_model, tokenizer.pad_token_id, states, [ids], 1)[0].argmin())
        return states[chosen], chosen
    kept = read_choice(store.dir)
    chosen = kept["specialist"] if kept is not None and kept["specialist"] < len(states) else 0
    return states[chosen], chosen


def _stack(peft_model, config: Config, state: dict) -> None:
    from peft import LoraConfig, set_peft_model_state_dict

    from fedllm.model import target_modules
    from fedllm.personal import PERSONAL

    extra = LoraConfig(r=config.personal.r, lora_alpha=2 * config.personal.r, lora_dropout=0.0,
                       target_modules=target_modules(peft_model, config.lora.target_modules), task_type="CAUSAL_LM")
    peft_model.add_adapter(PERSONAL, extra)
    result = set_peft_model_state_dict(peft_model, state, adapter_name=PERSONAL)
    if getattr(result, "unexpected_keys", None):
        raise FedllmError(f"personal adapter keys not used by the model: {result.unexpected_keys[:3]}")
    peft_model.base_model.set_adapter(["default", PERSONAL])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """`<bos> prompt`, as the model saw records in training (fedllm.data.tokens)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / T) with `generator`."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
             seed: int = 0, stop_at_eos: bool = True) -> tuple[str, int]:
    """(the text generated after `prompt`, tokens generated): stops at end-of-sequence
    (unless timing) or the model's context; deterministic for a seed on one machine."""
    if max_new_tokens < 1 or not 0 <= temperature <= 100:
        raise FedllmError("--max-new-tokens must be >= 1 and --temperature in 0..100")
    generator = torch.Generator().manual_seed(seed)
    ids = prompt_ids(tokenizer, prompt)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    device = next(model.parameters()).device
    # transformers 5 renames `past_key_values` to `cache`, model by model
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    new: list[int] = []
    past = None
    step_input = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        if len(ids) + len(new) >= limit:
            break
        out = model(input_ids=step_input, use_cache=True, **{cache_name: past})
        past = getattr(out, cache_name)
        token = next_token(out.logits[0, -1].float().cpu(), temperature, generator)
        if stop_at_eos and token == tokenizer.eos_token_id:
            break
        new.append(token)
        step_input = torch.tensor([[token]], dtype=torch.long, device=device)
    return tokenizer.decode(new, skip_special_tokens=True), len(new)
