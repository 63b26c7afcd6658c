"""A client's on-device state store: one directory per client, written atomically.

It holds what must survive the client process (a real device runs a fresh process per
message, and may be killed at any time): the privacy ledger now, the personal adapter
later. Nothing in it is ever sent to the server.
"""

from __future__ import annotations

import re
from pathlib import Path


def safe_name(client_id: str) -> str:
    """A client id as a file or folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", client_id)


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


def state_root(config) -> Path:
    """Where client state stores live: privacy.state-dir, else <run-dir>/clients."""
    if config.privacy.state_dir:
        return Path(config.privacy.state_dir)
    if not config.run_dir:
        raise ValueError("run-dir is not set; the server sets it before sending the config")
    return Path(config.run_dir) / "clients"
