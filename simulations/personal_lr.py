"""Choose the personal learning rate on *training* records only, never on held-out ones.

For a sample of clients, fit on the first 80% of each client's training records and
measure the validation loss on the last 20%, starting from a global adapter checkpoint,
for a few learning rates and both trainable personal forms. Prints the mean validation
gain (loss at step 0 minus loss after k steps) per learning rate and step count.

    python -m simulations.personal_lr RUN_DIR/checkpoints/round-5 [--clients 20]

This is how `personal.lr`'s default (1e-3) was chosen: 1e-2 lowered validation loss on
no step count; 1e-3 did for every one.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

from safetensors.torch import load_file

from fedllm.data import load_clients
from fedllm.worker import examples_for, worker_for
from fedllm.evaluate import evaluate
from fedllm.model import adapter_state, load_adapter_state
from fedllm.personal import stacked_personal_adapter
from fedllm.train import loader_for, make_optimizer, train_local
from fedllm.simulate import experiment_path, load_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/round-N directory of a run")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = load_experiment(experiment_path("plays.toml"), {"privacy.enabled": "false"})
    worker = worker_for(config)
    saved = load_file(str(args.checkpoint / "adapter_model.safetensors"))
    global_state = {k: saved[k] for k in adapter_state(worker.model)}
    clients = load_clients(config)
    clients = clients[:: max(1, len(clients) // args.clients)][: args.clients]
    pad = worker.tokenizer.pad_token_id
    for method in ("finetune", "adapter"):
        for lr in (1e-3, 3e-3, 1e-2):
            gains: dict[int, list[float]] = {s: [] for s in range(2, args.steps + 1, 2)}
            for client in clients:
                train, _ = examples_for(worker, client, config.model.max_length)
                n_val = max(2, len(train) // 5)
                fit, val = train[:-n_val], train[-n_val:]
                load_adapter_state(worker.model, global_state)
                personal = (stacked_personal_adapter(worker.model, config.personal, config.lora, None, 0)
                            if method == "adapter" else contextlib.nullcontext())
                with personal:
                    start = evaluate(worker.model, val, 16, pad)["loss"]

                    def after(step: int) -> None:
                        if step in gains:
                            gains[step].append(start - evaluate(worker.model, val, 16, pad)["loss"])

                    train_local(worker.model, loader_for(fit, config.train.batch_size, pad, 0),
                                make_optimizer(worker.model, lr, 0.0), args.steps, after_step=after)
            print(method, lr, {s: round(statistics.fmean(g), 4) for s, g in gains.items()}, flush=True)


if __name__ == "__main__":
    main()
