"""FFA-LoRA (`lora.freeze-a`) at the device's real handler: only B leaves the device, a
request carrying A is refused, and A is the same seeded draw wherever it is built."""

from __future__ import annotations

import torch

import test_policy
from test_policy import _ask, _declined, _device

setup = test_policy.setup  # the device fixture: one tiny model, one client's records


def test_only_b_leaves_a_device_with_a_frozen(setup):
    config, initial, _, _ = setup
    frozen = config.with_values({"lora.freeze-a": True})
    b_only = {k: v for k, v in initial.items() if "lora_B" in k}
    assert b_only and len(b_only) == len(initial) / 2
    reply = _ask(frozen, b_only, _device(setup, "ffa"))
    assert not _declined(reply)
    sent = reply.content.array_records["arrays"]
    assert set(sent) == set(b_only)  # the message holds B's tensors and nothing else
    assert sum(a.numpy().nbytes for a in sent.values()) * 2 == sum(v.numel() * 4 for v in initial.values())
    refused = _ask(frozen, initial, _device(setup, "ffa-a-sent"))  # a server that sends A too
    assert "arrays" not in refused.content.array_records and "lora_A" in _declined(refused), _declined(refused)


def test_a_is_the_seeds_wherever_it_is_built(setup):
    from fedllm.model import attach_lora, load_base, resolve_base

    config, _, _, _ = setup
    frozen = config.with_values({"lora.freeze-a": True})

    def a_of(seed):
        model, _ = load_base(resolve_base(frozen, progress=False))
        peft_model = attach_lora(model, frozen.lora, seed)
        assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_A" in n)
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}

    one, two, other = a_of(frozen.seed), a_of(frozen.seed), a_of(frozen.seed + 1)
    assert all(torch.equal(one[n], two[n]) for n in one)  # two devices, one draw
    assert not all(torch.equal(one[n], other[n]) for n in one)
