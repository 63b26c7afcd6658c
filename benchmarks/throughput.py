"""Client updates per second: fedllm's worker-cached base against rebuilding per call.

The common pattern in Flower apps builds everything inside each client call: load the
base model and tokenizer from disk, attach LoRA, load and tokenise the client's data,
then train. fedllm keeps the frozen base, its LoRA slot and the tokenised data in the
worker process and swaps only adapter tensors. Both paths run the same local training
(the default config's `local-steps`), on the same clients, side by side in one process.

    python benchmarks/throughput.py [--updates N] [--set KEY=VALUE ...]

Prints `ratio <cached / rebuilt updates per second>` as its last line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedllm import worker
from fedllm.client_round import Request, train_round
from fedllm.config import parse_assignment
from fedllm.model import adapter_state, attach_lora, load_base, resolve_base
from fedllm.simulate import load_experiment


def timed_updates(config, partitions, global_state, rebuild: bool) -> float:
    started = time.perf_counter()
    for i, partition in enumerate(partitions):
        if rebuild:
            worker.reset()  # every per-process cache, as a client that builds per call would
        train_round(config, partition, global_state, Request(server_round=1 + i))
    return len(partitions) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=6, help="client updates per timed block")
    parser.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per path")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    # Privacy off by default: this measures what the worker cache saves, not DP accounting.
    overrides = {"privacy.enabled": "false", **dict(parse_assignment(a) for a in args.assignments)}
    config = load_experiment(None, overrides)
    torch.set_num_threads(1)  # one simulation worker = one CPU

    base = resolve_base(config)
    model, _ = load_base(base)
    global_state = adapter_state(attach_lora(model, config.lora, config.seed))
    partitions = [i % config.num_clients for i in range(args.updates)]

    rates: dict[bool, list[float]] = {False: [], True: []}
    for block in range(args.blocks + 1):  # block 0 warms both paths up and is not counted
        for rebuild in (False, True):
            rate = timed_updates(config, partitions, global_state, rebuild)
            if block:
                rates[rebuild].append(rate)
    cached, rebuilt = statistics.median(rates[False]), statistics.median(rates[True])

    print(f"base model            {base}")
    print(f"local steps / update  {config.local_steps} (batch {config.train.batch_size}), privacy off")
    print(f"cached base           {cached:.3f} updates/s (median of {args.blocks} blocks of {args.updates})")
    print(f"rebuilt per call      {rebuilt:.3f} updates/s")
    print(f"ratio {cached / rebuilt:.2f}")


if __name__ == "__main__":
    main()
