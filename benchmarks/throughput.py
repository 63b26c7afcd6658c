"""Where a client update's time goes: pure local training, fedllm's whole update, and the
rebuild-per-call pattern, side by side in one process.

The common pattern in Flower apps builds everything inside each client call: load the
base model and tokenizer from disk (and move it to the GPU), attach LoRA, load and
tokenise the client's data, then train. fedllm keeps the frozen base, its LoRA slot and
the tokenised data in the worker process and swaps only adapter tensors. All three run
the same local training (`local-steps`) on the same clients:

    pure       only the optimizer steps (model loaded, data tokenised, adapter set)
    ours       `fedllm.client_round.train_round`: data, policy, training, delta, reply
    rebuilt    the same call after emptying every per-process cache (`fedllm.worker.reset`)

    python benchmarks/throughput.py [--updates N] [--blocks B] [--set model.name=DIR] [--set device=cuda]

Prints the framework overhead ((ours - pure) / ours) and, last, `ratio <rebuilt / ours>`
(seconds per update).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedllm import worker
from fedllm.client_round import Request, client_data, client_seed, train_round, train_steps
from fedllm.config import parse_assignment
from fedllm.devices import resolve_device, resolve_dtype, synchronize
from fedllm.model import load_adapter_state
from fedllm.simulate import experiment_path, load_experiment
from fedllm.shapes import shape_of


def seconds_per_update(config, partitions, global_state, path: str) -> float:
    device = resolve_device(config.device)
    synchronize(device)
    total = 0.0
    for i, partition in enumerate(partitions):
        if path == "pure":  # everything but the steps happens outside the clock
            w = worker.worker_for(config)
            data = client_data(config, partition)
            examples, _ = worker.examples_for(w, data, config.model.max_length)
            load_adapter_state(w.model, global_state)
            synchronize(device)
            started = time.perf_counter()
            train_steps(config, w, examples, config.local_steps, config.train.lr,
                        client_seed(config.seed, 1 + i, data.client_id))
            synchronize(device)
            total += time.perf_counter() - started
            continue
        started = time.perf_counter()
        if path == "rebuilt":
            worker.reset()  # every per-process cache, as a client that builds per call would
        train_round(config, partition, global_state, Request(server_round=1 + i))
        synchronize(device)
        total += time.perf_counter() - started
    return total / len(partitions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=6, help="client updates per timed block")
    parser.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per path")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one simulation worker: 1)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    # Privacy off by default: this measures what the worker cache saves, not DP accounting.
    overrides = {"privacy.enabled": "false", **dict(parse_assignment(a) for a in args.assignments)}
    config = load_experiment(experiment_path("plays.toml"), overrides)
    torch.set_num_threads(args.threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.model.dtype, device)

    w = worker.worker_for(config)
    global_state = dict(w.initial)
    partitions = [i % config.num_clients for i in range(args.updates)]
    times: dict[str, list[float]] = {"pure": [], "ours": [], "rebuilt": []}
    for block in range(args.blocks + 1):  # block 0 warms every path up and is not counted
        for path in times:
            seconds = seconds_per_update(config, partitions, global_state, path)
            if block:
                times[path].append(seconds)
    pure, ours, rebuilt = (statistics.median(times[p]) for p in ("pure", "ours", "rebuilt"))

    shape = shape_of(w.base)
    print(f"base model            {w.base}" + (f" ({shape['shape']} shape, random weights)" if shape else ""))
    print(f"device                {device} ({str(dtype).removeprefix('torch.')} base), {args.threads} CPU thread(s)")
    print(f"local steps / update  {config.local_steps} (batch {config.train.batch_size}, "
          f"max length {config.model.max_length}), privacy {'on' if config.privacy.enabled else 'off'}")
    print(f"pure local training   {1000 * pure:.1f} ms/update (median of {args.blocks} blocks of {args.updates})")
    print(f"ours (cached worker)  {1000 * ours:.1f} ms/update")
    print(f"rebuilt per call      {1000 * rebuilt:.1f} ms/update")
    print(f"framework overhead    {100 * (ours - pure) / ours:.1f}% of our update time (ours minus pure training)")
    print(f"ratio {rebuilt / ours:.2f}")


if __name__ == "__main__":
    main()
