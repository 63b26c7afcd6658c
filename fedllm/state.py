"""A client's on-device state store: one directory per client, written atomically.

It holds what must survive the client process (a real device runs a fresh process per
message, and may be killed at any time) and everything the device needs to use its model
offline (`fedllm generate`, `fedllm export`): the privacy ledger, the latest global adapter
it received with what it is an adapter of (`model.json`), and its personal adapter with its
version (`personal.json`). Nothing in it is ever sent to the server.

    ledger.json                   every DP charge (fedllm.privacy.ledger)
    global.safetensors            the latest global adapter this device received (a hive's every specialist)
    hive.json                     the specialist it chose last (fedllm.hive_device)
    model.json                    base model path, LoRA and personal settings, global round
    personal-{method}.safetensors its personal adapter ("finetune", "adapter" or "ditto")
    personal.json                 the personal adapter's version, round, records seen, epsilon
    local-only.safetensors        the local-only baseline (its data alone)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from fedllm import atomic
from fedllm.errors import FedllmError
from fedllm.untrusted import number_in

# The config keys that say what the stored adapters are adapters of (model.json).
MODEL_KEYS = ("model.name", "model.max-length", "lora.r", "lora.alpha", "lora.dropout", "lora.target-modules",
              "lora.freeze-a", "personal.method", "personal.r", "seed", "hive.k")


def safe_name(client_id: str) -> str:
    """A client id as a file or folder name; never one that is (or climbs above) its folder."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", client_id)
    if name in ("", ".", ".."):
        raise FedllmError(f"client id {client_id!r} names no folder of its own (its state store would be the "
                          "state root or above it): give the client a name with a letter or digit")
    return name


def check_client_ids(client_ids) -> None:
    """Refuse ids that would share a state store or a report file once sanitised (`a b`, `a*b`
    and `a_b` are all `a_b`): one device's ledger would be charged for another's releases."""
    seen: dict[str, str] = {}
    for client_id in client_ids:
        name = safe_name(client_id)
        if name in seen and seen[name] != client_id:
            raise FedllmError(f"client ids {seen[name]!r} and {client_id!r} both become {name!r} as file names, "
                              "so they would share one state store and ledger: rename one of them")
        seen[name] = client_id


class StateStore:
    def __init__(self, root: Path | str, client_id: str):
        self.dir = Path(root) / safe_name(client_id)
        self.client_id = client_id

    @property
    def ledger_path(self) -> Path:
        return self.dir / "ledger.json"

    def personal_path(self, method: str) -> Path:
        """The personal adapter of `method` ("adapter" or "ditto"); never sent."""
        return self.dir / f"personal-{method}.safetensors"

    @property
    def local_only_path(self) -> Path:
        """The local-only baseline adapter (this client's data alone); never sent."""
        return self.dir / "local-only.safetensors"

    @property
    def global_path(self) -> Path:
        return self.dir / "global.safetensors"

    @property
    def model_path(self) -> Path:
        return self.dir / "model.json"

    @property
    def personal_info_path(self) -> Path:
        return self.dir / "personal.json"

    def model_info(self) -> dict[str, Any] | None:
        """What the stored adapters belong to, or None before the first global adapter."""
        return _read_json(self.model_path, MODEL_FIELDS)

    def personal_info(self) -> dict[str, Any] | None:
        """The personal adapter's version record, or None before the first personalisation."""
        return _read_json(self.personal_info_path, PERSONAL_FIELDS)

    def save_global(self, state: dict, info: dict[str, Any]) -> None:
        """Keep the global adapter just received, then what it is an adapter of: a crash
        between the two leaves the older round number, never a wrong base."""
        from fedllm.personal import save_state

        save_state(self.global_path, state)
        atomic.write_json(self.model_path, info)

    def record_personal(self, method: str, global_round: int, run: str, records_seen: int,
                        epsilon: float | None, reason: str) -> dict[str, Any]:
        """One more version of the personal adapter (written after its tensors)."""
        try:
            previous = self.personal_info() or {}
        except FedllmError:  # a damaged version record: the tensors just written start a new count
            previous = {}
        version = previous["version"] + 1 if previous.get("method") == method else 1
        info = {"method": method, "version": version, "global_round": global_round, "run": run,
                "records_seen": records_seen, "epsilon": epsilon, "reason": reason}
        atomic.write_json(self.personal_info_path, info)
        return info


# What a reader of model.json and personal.json relies on: field -> check (files on disk are not trusted)
MODEL_FIELDS: dict[str, Callable[[Any], bool]] = {
    "base": lambda v: isinstance(v, str) and 0 < len(v) <= 4096,
    "config": lambda v: isinstance(v, dict),
    "global_round": lambda v: number_in(v, 0, 10**9, integer=True),
    "records": lambda v: number_in(v, 0, 2**31, integer=True),
}
PERSONAL_FIELDS: dict[str, Callable[[Any], bool]] = {
    "method": lambda v: v in ("finetune", "adapter", "ditto"),
    "version": lambda v: number_in(v, 1, 10**9, integer=True),
    "global_round": lambda v: number_in(v, 0, 10**9, integer=True),
    "records_seen": lambda v: number_in(v, 0, 2**31, integer=True),
    "epsilon": lambda v: v is None or number_in(v, 0.0, 1e4),
}


def _read_json(path: Path, fields: dict[str, Callable[[Any], bool]]) -> dict[str, Any] | None:
    """The JSON object at `path` (None when absent), refused with a reason unless each of
    `fields` it holds passes its check."""
    if not path.exists():
        return None
    advice = "move it aside (the next round writes it again)"
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedllmError(f"{path} is unreadable ({exc}); {advice}") from exc
    if not isinstance(value, dict):
        raise FedllmError(f"{path} is not a JSON object; {advice}")
    bad = [name for name, ok in fields.items() if name in value and not ok(value[name])]
    if bad:
        raise FedllmError(f"{path}: {', '.join(bad)} out of range or of the wrong type; {advice}")
    return value


def find_store(root: Path | str, client_id: str = "") -> StateStore:
    """The store of `client_id` under `root` (a device's --state-dir or a simulation's
    <run-dir>/clients), or its only client when none is named."""
    root = Path(root)
    if not root.is_dir():
        raise FedllmError(f"--state-dir {root}: no such directory")
    if client_id:
        store = StateStore(root, client_id)
        if not store.dir.is_dir():
            raise FedllmError(f"--state-dir {root} holds no client {client_id!r}")
        return store
    clients = sorted(p.name for p in root.iterdir() if (p / "model.json").exists() or (p / "ledger.json").exists())
    if len(clients) != 1:
        shown = ", ".join(clients[:8]) + (" ..." if len(clients) > 8 else "")
        raise FedllmError(f"--state-dir {root} holds {len(clients)} clients ({shown or 'none'}); "
                          "name one with --client-id")
    return StateStore(root, clients[0])


def state_root(config) -> Path:
    """Where client state stores live: privacy.state-dir, else <run-dir>/clients."""
    if config.privacy.state_dir:
        return Path(config.privacy.state_dir)
    if not config.run_dir:
        raise ValueError("run-dir is not set; the server sets it before sending the config")
    return Path(config.run_dir) / "clients"
