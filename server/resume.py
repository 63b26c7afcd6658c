"""What a restarted server trusts from its run directory: data only, checked.

Server optimizer state is saved as tensors (safetensors) and a JSON manifest, never pickled: a
planted file can at worst be refused. A restart whose config differs from the run's is
refused with the differing keys; `resume.accept-changes=true` accepts only keys that can
change neither privacy nor shapes. Every file read here that is missing or corrupt gives
one FedllmError naming the file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedllm import atomic
from fedllm.aggregate import ServerOptimizer
from fedllm.config import Config
from fedllm.errors import FedllmError

STATE_FILE, MANIFEST = "strategy.safetensors", "strategy.json"
OPTIMIZER_STATE = {"fedavgm": ("momentum_vector",), "fedadam": ("m_t", "v_t"), "fedyogi": ("m_t", "v_t"),
                   "fedadagrad": ("m_t", "v_t")}
# Keys a restart may change (with resume.accept-changes=true): neither privacy nor shapes depend on them.
SAFE_TO_CHANGE = frozenset({"round-timeout", "evaluate.every", "evaluate.batch-size", "simulation.num-cpus",
                            "simulation.cpus-per-client", "resume.accept-changes", "run-dir"})


def _corrupt(path: Path, what: str) -> FedllmError:
    return FedllmError(f"cannot resume: {path} {what}; restore it from a backup, or move {path.parent} aside "
                       "and delete checkpoints/latest.json to start the run over in a new run directory")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise _corrupt(path, "is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"is not valid JSON ({type(exc).__name__})") from None


def config_changes(saved: dict[str, Any], config: Config, accept: bool) -> None:
    """Refuse a restart whose config differs from the one the run started with."""
    now, defaults = config.to_flat(), Config().to_flat()
    saved = {**defaults, **saved}  # a key added by a later fedllm counts as its default in an older run
    differ = sorted(k for k in set(saved) | set(now) if k != "run-dir" and saved.get(k) != now.get(k))
    safe = set(SAFE_TO_CHANGE)
    if not config.user_dp.enabled and (not config.privacy.enabled or config.privacy.planned_rounds):
        safe.add("num-server-rounds")  # more rounds change no calibration: the noise was planned explicitly
    refused = [k for k in differ if not (accept and k in safe)]
    if refused:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in refused[:12])
        hint = (" (resume.accept-changes=true accepts only " + ", ".join(sorted(safe - {"run-dir"}))
                + "; num-server-rounds too when user-level DP is off and privacy.planned-rounds is set)")
        raise FedllmError(f"cannot resume: the config differs from the run's config.json in {shown}; run with the "
                          f"same config, or start a new run directory{hint}")


def save_optimizer(optimizer: ServerOptimizer, folder: Path) -> None:
    """The server optimizer's arrays (FedAdam's moments, FedAvgM's momentum) as tensors."""
    tensors: dict[str, np.ndarray] = {}
    manifest: dict[str, Any] = {"strategy": optimizer.name, "attributes": {}}
    for name, items in sorted(optimizer.state.items()):
        manifest["attributes"][name] = {"kind": "dict", "keys": list(items)}
        tensors.update({f"{name}/{k}": np.ascontiguousarray(v) for k, v in items.items()})
    data = _safetensors_bytes(tensors) if tensors else b""
    atomic.write_bytes(folder / STATE_FILE, data)
    atomic.write_json(folder / MANIFEST, manifest)


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


def load_optimizer(optimizer: ServerOptimizer, folder: Path, strategy: str,
                   shapes: dict[str, tuple[int, ...]]) -> ServerOptimizer:
    """Restore `optimizer` (freshly made from the config) from its saved array state; every
    attribute, kind, key and shape is checked. Reads what earlier fedllm wrote too (the
    Flower strategy's attributes: `current_arrays` is dropped, a momentum list is keyed)."""
    from safetensors.numpy import load

    manifest_path, state_path = folder / MANIFEST, folder / STATE_FILE
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or str(manifest.get("strategy", "")).lower() != strategy:
        raise _corrupt(manifest_path, f"is not the state of a {strategy} strategy")
    attributes = manifest.get("attributes")
    if not isinstance(attributes, dict):
        raise _corrupt(manifest_path, "has no attributes table")
    try:
        raw = state_path.read_bytes()
        tensors = load(raw) if raw else {}
    except FileNotFoundError:
        raise _corrupt(state_path, "is missing") from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise _corrupt(state_path, f"is not a safetensors file ({type(exc).__name__})") from None
    for name, entry in attributes.items():
        if name == "current_arrays":
            continue  # the global adapter, saved on its own
        if name not in OPTIMIZER_STATE.get(strategy, ()) or not isinstance(entry, dict) or \
                entry.get("kind") not in ("record", "dict", "list"):
            raise _corrupt(manifest_path, f"names an attribute {name!r} a {strategy} optimizer does not have")
        keys = entry.get("keys")
        if not isinstance(keys, list) or any(f"{name}/{k}" not in tensors for k in keys):
            raise _corrupt(state_path, f"lacks tensors of {name}")
        items = {str(k): tensors[f"{name}/{k}"] for k in keys}
        if entry["kind"] == "list":  # Flower's FedAvgM kept its momentum in the adapter's key order
            items = {k: items.get(str(i)) for i, k in enumerate(shapes)} if len(items) == len(shapes) else {}
        if set(items) != set(shapes) or any(tuple(v.shape) != shapes[k] for k, v in items.items()):
            raise _corrupt(state_path, f"holds {name} tensors that do not fit this run's adapter")
        if not all(np.isfinite(v).all() for v in items.values()):
            raise _corrupt(state_path, f"holds non-finite values in {name}")
        optimizer.state[name] = {k: np.asarray(v, np.float64) for k, v in items.items()}
    return optimizer


def check_server_state(state: Any, path: Path) -> dict[str, Any]:
    """server-state.json, typed."""
    fields = {"round": int, "run_id": str, "declined": dict, "rejected": int, "upload": list}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in fields.items()):
        raise _corrupt(path, "lacks a field of " + ", ".join(fields) + " or has one of the wrong type")
    return state


def read_genesis_registry(path: Path) -> dict[str, str]:
    """privacy.genesis-registry: client id -> ledger genesis (sha256 hex), as first seen."""
    try:
        registry = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        registry = None
    if not isinstance(registry, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in registry.items()):
        raise FedllmError(f"privacy.genesis-registry {path} is not a JSON object of client ids to genesis hashes; "
                          "restore it from a backup")
    return registry
