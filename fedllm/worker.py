"""What a worker process keeps between clients: the frozen base with its LoRA slot, and
tokenised client data. Only adapter tensors are swapped per client.

Flower's simulation engine reuses worker (Ray actor) processes across virtual clients, so
this cache turns "load the model per client" into "once per worker". `reset()` empties it
(benchmarks time a cold start with it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedllm.config import Config
from fedllm.data import ClientData, forget_clients
from fedllm.data.tokens import encode
from fedllm.devices import resolve_device, resolve_dtype
from fedllm.model import adapter_state, attach_lora, load_base, resolve_base

Examples = list[list[int]]


@dataclass
class Worker:
    model: object  # PeftModel
    tokenizer: object
    base: str
    initial: dict  # the adapter as initialised (B = 0): the start of every local-only baseline
    device: torch.device = torch.device("cpu")
    cache_bytes: int = 256 * 2**20  # simulation.cache-mib: the tokenised clients this worker keeps


_WORKERS: dict[tuple, Worker] = {}
class _TokenCache:
    """Tokenised clients, least recently used first, with the bytes they hold kept as
    entries come and go (not summed on every call)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, tuple[tuple[Examples, Examples], int]] = OrderedDict()
        self.held = 0

    def get(self, key: tuple) -> tuple[Examples, Examples] | None:
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key][0]

    def put(self, key: tuple, examples: tuple[Examples, Examples], limit: int) -> None:
        """Keep `examples`, then drop the least recently used until `limit` holds (the newest stays)."""
        size = _bytes(examples)
        self.entries[key] = examples, size
        self.held += size
        while len(self.entries) > 1 and self.held > limit:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.held -= dropped

    def clear(self) -> None:
        self.entries.clear()
        self.held = 0


_EXAMPLES = _TokenCache()


def worker_for(config: Config) -> Worker:
    """This process's model for `config` (loaded once, on the configured device and in its
    dtype; one base per process)."""
    base = resolve_base(config, progress=False)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.model.dtype, device)
    key = (base, config.lora, config.seed, str(device), dtype)
    if key not in _WORKERS:
        torch.set_num_threads(max(1, config.simulation.cpus_per_client))
        model, tokenizer = load_base(base, dtype, device)
        _WORKERS.clear()
        peft_model = attach_lora(model, config.lora, config.seed)
        _WORKERS[key] = Worker(peft_model, tokenizer, base, adapter_state(peft_model), device,
                               config.simulation.cache_mib * 2**20)
    return _WORKERS[key]


def examples_for(worker: Worker, data: ClientData, max_length: int) -> tuple[Examples, Examples]:
    """(train, held-out) token ids of one client, tokenised when the client is asked for and
    kept while they fit in `worker.cache_bytes` (least recently used clients go first)."""
    # a device's file can grow between calls: its size and last records are part of the key
    key = (worker.base, data.client_id, max_length, len(data.train), len(data.heldout),
           hash((data.train[-1:], data.heldout[-1:])))
    examples = _EXAMPLES.get(key)
    if examples is None:
        examples = (encode(worker.tokenizer, data.train, max_length),
                    encode(worker.tokenizer, data.heldout, max_length))
        _EXAMPLES.put(key, examples, worker.cache_bytes)
    return examples


def cached_bytes() -> int:
    """What the tokenised-client cache holds now (estimated as Python stores it)."""
    return _EXAMPLES.held


def cached_clients() -> int:
    return len(_EXAMPLES.entries)


def _bytes(examples: tuple[Examples, Examples]) -> int:
    """A list of n ints costs about 8n (pointers) + 28n (int objects) + 56 bytes."""
    return sum(56 + 36 * len(ids) for part in examples for ids in part)


def reset() -> None:
    """Forget every loaded model, read and tokenised client (a cold worker)."""
    _WORKERS.clear()
    _EXAMPLES.clear()
    forget_clients()
