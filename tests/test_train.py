import math

import torch

from fedllm.config import LoraConfig
from fedllm.data.tokens import collate, encode
from fedllm.evaluate import evaluate
from fedllm.model import adapter_state, attach_lora, load_base
from fedllm.train import loader_for, make_optimizer, sequence_losses, train_local

TEXTS = ["To be, or not to be, that is the question.", "All the world's a stage.", "Words, words, words."] * 4


def _setup(path):
    model, tokenizer = load_base(str(path))
    return attach_lora(model, LoraConfig(r=4), seed=0), tokenizer


def test_one_record_is_one_truncated_example(tiny_llama):
    _, tokenizer = load_base(str(tiny_llama))
    examples = encode(tokenizer, ["short", "a much longer record " * 20], max_length=16)
    assert len(examples) == 2 and len(examples[1]) == 16
    assert examples[0][0] == tokenizer.bos_token_id and examples[0][-1] == tokenizer.eos_token_id


def test_sequence_loss_ignores_padding_and_other_sequences(tiny_llama):
    model, tokenizer = _setup(tiny_llama)
    examples = encode(tokenizer, TEXTS[:3], 32)
    alone = sequence_losses(model, **collate(examples[1:2], tokenizer.pad_token_id))
    together = sequence_losses(model, **collate(examples, tokenizer.pad_token_id))
    assert together.shape == (3,)
    assert torch.allclose(alone[0], together[1], atol=1e-5)


def test_local_training_moves_only_the_adapter_and_lowers_loss(tiny_llama):
    model, tokenizer = _setup(tiny_llama)
    examples = encode(tokenizer, TEXTS, 32)
    before_eval = evaluate(model, examples, 4, tokenizer.pad_token_id)
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = adapter_state(model)
    loader = loader_for(examples, 4, tokenizer.pad_token_id, seed=0)
    result = train_local(model, loader, make_optimizer(model, 1e-2, 0.0), steps=20)
    assert result.steps == 20 and result.num_examples == 80
    after = adapter_state(model)
    assert any(not torch.equal(after[k], adapter_before[k]) for k in after)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    after_eval = evaluate(model, examples, 4, tokenizer.pad_token_id)
    assert after_eval["loss"] < before_eval["loss"]


def test_proximal_term_keeps_weights_closer(tiny_llama):
    model, tokenizer = _setup(tiny_llama)
    examples = encode(tokenizer, TEXTS, 32)
    start = adapter_state(model)

    def distance(mu):
        from fedllm.model import load_adapter_state
        load_adapter_state(model, start)
        loader = loader_for(examples, 4, tokenizer.pad_token_id, seed=0)
        train_local(model, loader, make_optimizer(model, 1e-2, 0.0), steps=10, proximal_mu=mu)
        end = adapter_state(model)
        return sum(((end[k] - start[k]) ** 2).sum().item() for k in end)

    assert distance(100.0) < distance(0.0)


def test_evaluate_metrics(tiny_llama):
    model, tokenizer = _setup(tiny_llama)
    metrics = evaluate(model, encode(tokenizer, TEXTS, 32), 5, tokenizer.pad_token_id)
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]))
    assert 0 <= metrics["top1"] <= metrics["top3"] <= 1 and metrics["tokens"] > 0
