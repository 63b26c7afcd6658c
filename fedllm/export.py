"""`fedllm export`: the device's merged model as a standalone folder another program loads.

    hf     safetensors + config + tokenizer: `AutoModelForCausalLM.from_pretrained(OUT)`
    onnx   model.onnx (input_ids -> logits, any batch and length) + tokenizer, for
           onnxruntime; checked by loading it in onnxruntime and comparing next-token
           logits with the PyTorch model before the export is declared done

Every export writes `export.json`: what was merged (client, adapter, global round,
personal version) and the ledger's epsilon, since the weights carry the personal
adapter's privacy cost with them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedllm import atomic
from fedllm.errors import MOVE_ASIDE, FedllmError
from fedllm.personal_model import DeviceModel, generate, load_device_model
from fedllm.state import StateStore

FORMATS = ("hf", "onnx", "gguf")
ONNX_TOLERANCE = 1e-3  # max |logit difference| onnxruntime vs PyTorch, float32 on CPU
SPEED_TOKENS = 32


@dataclass
class ExportResult:
    out: Path
    format: str
    bytes_on_disk: int
    tokens_per_second: float
    checks: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        rows = [f"exported {self.format} to {self.out}: {self.bytes_on_disk / 2**20:.2f} MiB on disk",
                f"generation on this CPU: {self.tokens_per_second:.1f} tokens/s ({self.format})"]
        rows += [f"{name}: {value}" for name, value in self.checks.items()]
        return rows


def export(store: StateStore, out: Path, fmt: str = "hf", which: str = "personal") -> ExportResult:
    """Write the merged model `which` of `store` to `out` in `fmt`, verified."""
    if fmt == "gguf":
        raise FedllmError("--format gguf: not in this build (llama-cpp-python, needed to verify a GGUF file, "
                          "compiles llama.cpp on install); use --format onnx for an on-device runtime")
    if fmt not in FORMATS:
        raise FedllmError(f"--format {fmt}: expected hf or onnx")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedllmError(f"--out {out} is not empty: give a new folder (nothing was overwritten)")
    device_model = load_device_model(store, which)
    _check_finite(device_model, store)
    out.mkdir(parents=True, exist_ok=True)
    device_model.tokenizer.save_pretrained(out)
    if fmt == "hf":
        device_model.model.save_pretrained(out, safe_serialization=True)
        result = ExportResult(out, fmt, _size(out), _torch_speed(device_model))
    else:
        result = _onnx(device_model, out)
    atomic.write_json(out / "export.json", _provenance(store, device_model, fmt))
    result.bytes_on_disk = _size(out)
    return result


def _check_finite(device_model: DeviceModel, store: StateStore) -> None:
    """An adapter with a NaN or inf weight gives NaN logits on every prompt: never ship it as verified."""
    for name, tensor in device_model.model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FedllmError(f"the merged model's {name} holds non-finite values (from the adapters in {store.dir}): "
                              f"nothing was exported; {MOVE_ASIDE}")


def _provenance(store: StateStore, device_model: DeviceModel, fmt: str) -> dict[str, Any]:
    from fedllm.privacy.ledger import Ledger

    epsilon = Ledger.load(store.ledger_path).epsilon() if store.ledger_path.exists() else None
    personal = device_model.personal if device_model.which == "personal" else None
    return {"format": fmt, "adapter": device_model.which, "client_id": device_model.info.get("client_id"),
            "base": device_model.info["base"], "global_round": device_model.info.get("global_round"),
            "personal": personal, "ledger_epsilon": epsilon,
            "note": "the weights include adapters trained on this device's records; ledger_epsilon bounds "
                    "what they reveal about any one record" if epsilon is not None else "no DP ledger"}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class _Logits(torch.nn.Module):
    """input_ids -> logits, without a cache: one graph for any prompt length."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _onnx(device_model: DeviceModel, out: Path) -> ExportResult:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise FedllmError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'fedllm[export]'") from exc
    model, path = device_model.model, out / "model.onnx"
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    example = torch.tensor([_probe(device_model, 12, 0)], dtype=torch.long)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf's 2 GiB limit
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), warnings.catch_warnings(), _quiet("torch.onnx"):
            warnings.simplefilter("ignore")  # the exporter's deprecation notes are not the operator's to act on
            torch.onnx.export(_Logits(model).eval(), (example,), str(path), input_names=["input_ids"],
                              output_names=["logits"], dynamo=True, external_data=big,
                              dynamic_shapes=({0: torch.export.Dim("batch", max=64),
                                               1: torch.export.Dim("sequence", min=2, max=limit)},))
    except Exception as exc:  # the exporter's own errors are many and specific: say where to look
        raise FedllmError(f"ONNX export failed ({type(exc).__name__}: {str(exc)[:300]}); exporter output:\n"
                          f"{captured.getvalue()[-2000:]}") from exc
    session = _session(path)
    diff = _compare_logits(device_model, session)
    if not diff <= ONNX_TOLERANCE:
        raise FedllmError(f"ONNX export does not reproduce the model: next-token logits differ by {diff:.3g} "
                          f"(tolerance {ONNX_TOLERANCE:g}); {out} is not usable")
    speed = _onnx_speed(device_model, session)
    return ExportResult(out, "onnx", _size(out), speed, {
        "onnxruntime next-token logits vs PyTorch": f"max |diff| {diff:.2e} (tolerance {ONNX_TOLERANCE:g})",
        "PyTorch generation on this CPU": f"{_torch_speed(device_model):.1f} tokens/s (with a KV cache)"})


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _probe(device_model: DeviceModel, length: int, seed: int) -> list[int]:
    """A token sequence to compare on: <bos> and seeded random tokens from the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(device_model.model.config.vocab_size)
    bos = device_model.tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + torch.randint(0, vocab, (length,), generator=generator).tolist()


def onnx_logits(session, ids: list[int]):
    import numpy as np

    return session.run(["logits"], {"input_ids": np.asarray([ids], dtype=np.int64)})[0][0]


@torch.no_grad()
def _compare_logits(device_model: DeviceModel, session) -> float:
    """Max |difference| of next-token logits over prompts of several lengths."""
    worst = 0.0
    for seed, length in enumerate((1, 7, 31)):
        ids = _probe(device_model, length, seed)
        reference = device_model.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        runtime = torch.from_numpy(onnx_logits(session, ids)[-1]).float()
        worst = max(worst, float((reference - runtime).abs().max()))
    return worst


def _onnx_speed(device_model: DeviceModel, session) -> float:
    """Greedy tokens/s in onnxruntime (the whole prefix each step: the graph has no cache)."""
    ids = _probe(device_model, 4, 1)
    start = time.perf_counter()
    for _ in range(SPEED_TOKENS):
        ids.append(int(onnx_logits(session, ids)[-1].argmax()))
    return SPEED_TOKENS / (time.perf_counter() - start)


def _torch_speed(device_model: DeviceModel) -> float:
    start = time.perf_counter()
    _, n = generate(device_model.model, device_model.tokenizer, "", SPEED_TOKENS, temperature=0.0, seed=0,
                    stop_at_eos=False)
    return max(n, 1) / (time.perf_counter() - start)
