"""Turn raw text into a federation: one client per role (or per file), each with
its own training records and a held-out set made of its *last* records.

A record is one speech (or one line of a user's file). It is the unit the client trains
on and, later, the privacy unit of record-level DP, so it is never split or merged.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from fedllm.data.plays import Play, load_plays
from fedllm.errors import ConfigError, DataError


VERSE = "verse"  # ClientData.kind of a play's role


@dataclass(frozen=True)
class ClientData:
    client_id: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    kind: str = ""  # which population, when known: "verse" (a role), "code" (a module); "" for a user's data

    @property
    def num_records(self) -> int:
        return len(self.train)


def split_plays(plays: list[Play], public_fraction: float, seed: int) -> tuple[list[Play], list[Play]]:
    """Split whole plays into public (pre-training) and private (client) parts.

    Whole plays, so that no client's text is ever seen by the base model.
    """
    order = sorted(plays, key=lambda p: p.slug)
    random.Random(seed).shuffle(order)
    n_public = round(len(order) * public_fraction)
    public = sorted(order[:n_public], key=lambda p: p.slug)
    private = sorted(order[n_public:], key=lambda p: p.slug)
    return public, private


def holdout_split(records: list[str], holdout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The last records (in order) are held out: evaluation is on what comes next."""
    n_heldout = max(1, round(len(records) * holdout_fraction))
    return tuple(records[:-n_heldout]), tuple(records[-n_heldout:])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def clients_from_plays(plays: list[Play], min_records: int, holdout_fraction: float) -> list[ClientData]:
    """Every speaking role with at least `min_records` speeches becomes a client."""
    clients = []
    for play in plays:
        by_role: dict[str, list[str]] = {}
        for speech in play.speeches:
            by_role.setdefault(speech.role, []).append(speech.text)
        for role, texts in by_role.items():
            if len(texts) >= min_records:
                train, heldout = holdout_split(texts, holdout_fraction)
                clients.append(ClientData(f"{play.slug}.{_slug(role)}", train, heldout, VERSE))
    return sorted(clients, key=lambda c: c.client_id)


def clients_from_code(min_records: int, holdout_fraction: float) -> list[ClientData]:
    """Every module of the embedded source with at least `min_records` top-level definitions."""
    from fedllm.data.code import CODE, load_modules

    clients = []
    for client_id, records in load_modules():
        if len(records) >= min_records:
            train, heldout = holdout_split(list(records), holdout_fraction)
            clients.append(ClientData(client_id, train, heldout, CODE))
    return clients


def _read_records(path: Path) -> list[str]:
    """One record per non-empty line; JSONL lines are strings or objects with "text"."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if isinstance(value, dict):
                value = value.get("text")
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f'{path}:{number}: expected a JSON string or an object with a non-empty "text" string'
                )
            records.append(value.strip())
        else:
            records.append(line.strip())
    return records


def clients_from_folder(folder: Path, min_records: int, holdout_fraction: float) -> list[ClientData]:
    """A user's own data: one file per client (`<client-id>.txt` or `.jsonl`)."""
    if not folder.is_dir():
        raise DataError(f"data.path={folder} is not a directory; give a folder of per-client .txt/.jsonl files")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise DataError(f"data.path={folder} holds no .txt or .jsonl files (one file per client)")
    clients = []
    for path in files:
        records = _read_records(path)
        if len(records) >= min_records:
            train, heldout = holdout_split(records, holdout_fraction)
            clients.append(ClientData(path.stem, train, heldout))
    return clients


def device_client(path: Path, client_id: str, min_records: int, holdout_fraction: float) -> ClientData:
    """A real device's own data: one .txt/.jsonl file, or a folder holding exactly one."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        if len(files) != 1:
            raise DataError(f"data-path={path} holds {len(files)} .txt/.jsonl files; a device needs exactly one "
                            "(or give the file itself)")
        path = files[0]
    if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"data-path={path} is not a .txt or .jsonl file (one record per line)")
    records = _read_records(path)
    if len(records) < min_records:
        raise DataError(f"{path} has {len(records)} records; data.min-records={min_records} are needed "
                        "to train (and hold some out)")
    train, heldout = holdout_split(records, holdout_fraction)
    return ClientData(client_id or path.stem, train, heldout)


def select_clients(eligible: list[ClientData], num_clients: int, seed: int, min_records: int) -> list[ClientData]:
    """A seeded choice of `num_clients` clients, in a stable order (partition i = entry i).
    A mixed population (clients of several kinds) is drawn in equal shares per kind."""
    kinds = sorted({c.kind for c in eligible})
    if len(kinds) > 1:
        chosen = []
        for i, kind in enumerate(kinds):
            share = num_clients // len(kinds) + (1 if i < num_clients % len(kinds) else 0)
            pool = [c for c in eligible if c.kind == kind]
            if share > len(pool):
                raise ConfigError(f"num-clients={num_clients} needs {share} {kind} clients, but only {len(pool)} have "
                                  f"at least data.min-records={min_records} records; lower num-clients or "
                                  "data.min-records")
            chosen += random.Random(f"{seed}/{kind}").sample(pool, share)
        return sorted(chosen, key=lambda c: c.client_id)
    if num_clients > len(eligible):
        raise ConfigError(
            f"num-clients={num_clients} but only {len(eligible)} clients have at least "
            f"data.min-records={min_records} records; lower num-clients or data.min-records"
        )
    chosen = random.Random(seed).sample(eligible, num_clients)
    return sorted(chosen, key=lambda c: c.client_id)


def public_texts(plays: list[Play]) -> list[str]:
    """Text of the public plays, one string per speech, for pre-training the base."""
    return [speech.text for play in plays for speech in play.speeches]


def embedded_split(public_fraction: float, split_seed: int) -> tuple[list[Play], list[Play]]:
    return split_plays(load_plays(), public_fraction, split_seed)
