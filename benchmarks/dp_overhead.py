"""DP-SGD step time against non-private step time, side by side in one run.

Same model (the default config's base with its LoRA), same client data, same batch
size, same number of steps; the only difference is `fedllm.privacy.engine.make_private`
(Opacus per-sample gradient hooks on the LoRA layers, clipping, noise, Poisson sampling).
The two are timed in alternating blocks so that drift in machine speed hits both.

Both sides step over the *same* batches (drawn once from the client's data), so the
ratio is the cost of per-sample gradients, clipping and noise, not of a different batch
size: Poisson sampling would make the private batches vary in size around the plain
one. The Poisson loader itself is exercised by the tests, not timed here.

    python benchmarks/dp_overhead.py [--steps N] [--blocks K] [--set KEY=VALUE ...]

Prints `ratio <private / non-private seconds per step>` as its last line.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from fedllm.client_round import client_data
from fedllm.worker import examples_for, worker_for
from fedllm.config import parse_assignment
from fedllm.model import adapter_state, load_adapter_state
from fedllm.privacy.engine import make_private
from fedllm.train import loader_for, make_optimizer, train_local
from fedllm.simulate import experiment_path, load_experiment


def time_block(model, batches, optimizer) -> float:
    """Seconds per step over `batches`, one optimizer step each."""
    started = time.perf_counter()
    train_local(model, batches, optimizer, len(batches))
    return (time.perf_counter() - started) / len(batches)


def hooked(model) -> int:
    return sum(1 for name, _ in model.named_modules() if name.endswith("lora_A.default"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per side")
    parser.add_argument("--client", type=int, default=0, help="partition whose data is used")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_experiment(experiment_path("plays.toml"), dict(parse_assignment(a) for a in args.assignments))
    torch.set_num_threads(1)  # one simulation worker = one CPU

    worker = worker_for(config)
    data = client_data(config, args.client)
    examples, _ = examples_for(worker, data, config.model.max_length)
    model, pad = worker.model, worker.tokenizer.pad_token_id
    start = adapter_state(model)

    loader = loader_for(examples, config.train.batch_size, pad, seed=0)
    batches = [batch for _, batch in zip(range(args.steps), itertools.cycle(loader))]
    tokens = statistics.fmean(int(b["attention_mask"].sum()) for b in batches)

    def plain():
        load_adapter_state(model, start)
        return make_optimizer(model, config.train.lr, config.train.weight_decay), None

    def private():
        load_adapter_state(model, start)
        optimizer = make_optimizer(model, config.train.lr, config.train.weight_decay)
        p = make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=config.privacy.max_grad_norm)
        return p.optimizer, p

    times: dict[str, list[float]] = {"non-private": [], "private": []}
    for block in range(args.blocks + 1):  # block 0 warms both paths up and is not counted
        for name, build in (("non-private", plain), ("private", private)):
            optimizer, handle = build()
            try:
                seconds = time_block(model, batches, optimizer)
            finally:
                if handle is not None:
                    handle.close()
            if block:
                times[name].append(seconds)

    plain_s, private_s = statistics.median(times["non-private"]), statistics.median(times["private"])
    print(f"model                 {worker.base} (LoRA r={config.lora.r}, {config.lora.target_modules})")
    print(f"client                {data.client_id}: {data.num_records} records, batch {config.train.batch_size}")
    print(f"batches               {len(batches)} x {config.train.batch_size} records, {tokens:.0f} tokens each on average")
    print(f"non-private           {1000 * plain_s:.1f} ms/step (median of {args.blocks} blocks)")
    print(f"private (DP-SGD)      {1000 * private_s:.1f} ms/step (hooks on {hooked(model)} LoRA layers)")
    print(f"ratio {private_s / plain_s:.3f}")


if __name__ == "__main__":
    main()
