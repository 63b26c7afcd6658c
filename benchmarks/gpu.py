"""The GPU table (`benchmarks/gpu.sh` runs this): four measurements at a real model shape,
each side by side in this one run.

    (a) DP-SGD step time / non-private step time: fedllm's DP path and stock Opacus
        (`PrivacyEngine.make_private`, hooks mode, wrapping the model), same model, same batches
    (b) the worker-cache throughput ratio (`benchmarks/throughput.py`) on the device
    (c) client updates per second in a simulated cohort, for several clients per GPU
    (d) a bfloat16 base against a float32 one: step time, and held-out loss after the same steps

    python benchmarks/gpu.py --base DIR [--device cuda] [--quick]

`--quick` shrinks every measurement (a smoke test of the script's logic, on CPU too).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedllm.config import Config
from fedllm.devices import resolve_device, resolve_dtype, synchronize
from fedllm.evaluate import evaluate
from fedllm.model import adapter_state, attach_lora, load_adapter_state, load_base
from fedllm.privacy.engine import make_private
from fedllm.train import loader_for, make_optimizer, train_local

ROOT = Path(__file__).resolve().parents[1]
LORA = {"lora.r": 16, "lora.alpha": 32, "lora.target-modules": "q_proj,k_proj,v_proj,o_proj"}


def _batches(vocab: int, batch: int, length: int, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fixed full-length batches (no padding): every path steps over exactly these."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (batch, length), generator=g) for _ in range(count)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def _per_step(model, batches, optimizer, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    train_local(model, batches, optimizer, len(batches))
    synchronize(device)
    return (time.perf_counter() - started) / len(batches)


def dp_step_ratios(base: str, device: torch.device, dtype: torch.dtype, batch: int, length: int, steps: int,
                   blocks: int) -> dict[str, float]:
    """(a): seconds per step, non-private / fedllm DP / stock Opacus, alternating blocks."""
    from opacus import PrivacyEngine

    config = Config.from_flat(LORA)
    model, _ = load_base(base, dtype, device)
    peft_model = attach_lora(model, config.lora, 0)
    start = adapter_state(peft_model)
    batches = _batches(peft_model.config.vocab_size, batch, length, steps)
    dataset = [b["input_ids"][i].tolist() for b in batches for i in range(batch)]
    loader = loader_for(dataset, batch, 0, seed=0)  # what make_private wraps; the timed steps use `batches`

    def plain():
        load_adapter_state(peft_model, start)
        return peft_model, make_optimizer(peft_model, 1e-4, 0.0), lambda: None

    def ours():
        load_adapter_state(peft_model, start)
        p = make_private(peft_model, make_optimizer(peft_model, 1e-4, 0.0), loader, 1.0, 1.0)
        return peft_model, p.optimizer, p.close

    def stock():
        load_adapter_state(peft_model, start)
        peft_model.train()  # Opacus validates the module in training mode
        engine = PrivacyEngine(accountant="prv")
        wrapped, optimizer, _ = engine.make_private(module=peft_model, optimizer=make_optimizer(peft_model, 1e-4, 0.0),
                                                    data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                    grad_sample_mode="hooks")
        return wrapped, optimizer, wrapped._close

    times: dict[str, list[float]] = {"plain": [], "ours": [], "stock": []}
    for block in range(blocks + 1):  # block 0 warms up (kernels, allocator) and is not counted
        for name, build in (("plain", plain), ("ours", ours), ("stock", stock)):
            module, optimizer, close = build()
            try:
                seconds = _per_step(module, batches, optimizer, device)
            finally:
                close()
            if block:
                times[name].append(seconds)
    plain_s, ours_s, stock_s = (statistics.median(times[k]) for k in ("plain", "ours", "stock"))
    return {"plain_ms": 1000 * plain_s, "ours_ms": 1000 * ours_s, "stock_ms": 1000 * stock_s,
            "ours_ratio": ours_s / plain_s, "stock_ratio": stock_s / plain_s}


def precision(base: str, device: torch.device, batch: int, length: int, steps: int) -> dict[str, dict[str, float]]:
    """(d): the same steps from the same adapter on a float32 and a bfloat16 base."""
    from fedllm.data import load_clients
    from fedllm.data.tokens import encode

    out = {}
    config = Config.from_flat(LORA)
    clients = load_clients(Config.from_flat({"num-clients": 4, "clients-per-round": 4}))
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_base(base, dtype, device)
        peft_model = attach_lora(model, config.lora, 0)
        train = [ids for c in clients for ids in encode(tokenizer, c.train, length)]
        heldout = [ids for c in clients for ids in encode(tokenizer, c.heldout, length)][:64]
        loader = loader_for(train, batch, tokenizer.pad_token_id, seed=0)
        batches = [b for _, b in zip(range(steps), iter(loader))]
        seconds = _per_step(peft_model, batches, make_optimizer(peft_model, 1e-3, 0.0), device)
        loss = evaluate(peft_model, heldout, batch, tokenizer.pad_token_id)["loss"]
        out[str(dtype).removeprefix("torch.")] = {"step_ms": 1000 * seconds, "heldout_loss": loss}
        del model, peft_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def throughput(base: str, device: str, quick: bool) -> dict[str, float]:
    """(b): benchmarks/throughput.py on the device, parsed from its output."""
    args = ["--updates", "2" if quick else "8", "--blocks", "1" if quick else "3", "--set", f"model.name={base}",
            "--set", f"device={device}", "--set", "local-steps=5", "--set", "model.max-length=256"]
    text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout

    def value(label: str) -> float:
        return float(re.search(rf"^{label}\s+(-?[\d.]+)", text, re.M).group(1))

    return {"pure_ms": value("pure local training"), "ours_ms": value("ours \\(cached worker\\)"),
            "rebuilt_ms": value("rebuilt per call"), "overhead_pct": value("framework overhead"),
            "ratio": value("ratio")}


def cohort(base: str, device: str, share: float, clients: int, quick: bool, work: Path) -> float:
    """(c): updates per second of a round of `clients` clients, each with `share` of a GPU
    (the second of three rounds: no calibration, no evaluation in it)."""
    run_dir = work / f"cohort-{share}"
    overrides = {"model.name": base, "device": device, "num-clients": clients, "clients-per-round": clients,
                 "num-server-rounds": 3, "local-steps": 2 if quick else 5, "evaluate.every": 1000,
                 "evaluate.num-clients": 2, "simulation.gpus-per-client": share, "model.max-length": 256,
                 "privacy.enabled": "false"}
    command = [sys.executable, "-m", "fedllm.cli", "simulate", "--run-dir", str(run_dir)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    second = next(r for r in rounds if r["round"] == 2)
    return len(second["train"]["clients"]) / second["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a model directory (`fedllm base shape smollm2-135m`)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--work", type=Path, default=None, help="where the cohort runs write (default: a temp dir)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedllm-gpu-"))
    q = args.quick
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device {name}; base {args.base} ({str(dtype).removeprefix('torch.')}); LoRA r=16 on q/k/v/o", flush=True)

    a = dp_step_ratios(args.base, device, dtype, batch=8, length=32 if q else 256, steps=2 if q else 10,
                       blocks=1 if q else 3)
    print("(a) done", flush=True)
    b = throughput(args.base, args.device, q)
    print("(b) done", flush=True)
    shares = (1.0, 0.25, 0.125) if device.type == "cuda" else (0.0,)
    c = {s: cohort(args.base, args.device, s, 4 if q else 32, q, work) for s in shares}
    print("(c) done", flush=True)
    d = precision(args.base, device, batch=8, length=32 if q else 256, steps=3 if q else 30)

    rows = [
        ("(a) DP step / plain step, fedllm", f"{a['ours_ratio']:.2f}x",
         f"{a['ours_ms']:.1f} vs {a['plain_ms']:.1f} ms (goal <= 1.3x)"),
        ("(a) DP step / plain step, stock Opacus", f"{a['stock_ratio']:.2f}x",
         f"{a['stock_ms']:.1f} ms (anchor on an H100: 1.94x)"),
        ("(b) rebuilt / ours per update", f"{b['ratio']:.2f}x",
         f"pure {b['pure_ms']:.0f}, ours {b['ours_ms']:.0f}, rebuilt {b['rebuilt_ms']:.0f} ms; overhead "
         f"{b['overhead_pct']:.1f}% (goal >= 5x)"),
        *[(f"(c) updates/s, gpus-per-client {s:g}", f"{rate:.2f}", f"{1 / s:g} clients per GPU" if s else "CPU")
          for s, rate in c.items()],
        *[(f"(d) {k} base", f"{v['step_ms']:.1f} ms/step", f"held-out loss {v['heldout_loss']:.4f}")
          for k, v in d.items()],
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>12}  {note}")


if __name__ == "__main__":
    main()
