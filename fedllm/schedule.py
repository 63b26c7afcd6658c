"""When a device trains: its operator's conditions (`fedllm client --train-window`,
`--require-ac-power`, `--max-threads`, `--max-participations-per-day`), read from its node
config, never from the server.

A device outside its conditions answers that it is not available: nothing is charged and
the server books a decline, not a failure. The conditions are checked again after every
training step (`still_available`), so a window that closes or a charger that is pulled
stops training cleanly; the steps already charged stay charged.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedllm import atomic
from fedllm.errors import FedllmError

NODE_WINDOW = "train-window"
NODE_AC_POWER = "require-ac-power"
NODE_MAX_THREADS = "max-threads"
NODE_MAX_PER_DAY = "max-participations-per-day"
POWER_SUPPLY_ENV = "FEDLLM_POWER_SUPPLY_DIR"  # where Linux reports power (tests point it at a fake one)
UNAVAILABLE = "not available"  # how a decline for the device's own conditions starts
STOPPED = "stopped"  # ... and one of training cut short by them (charged)


class Unavailable(Exception):
    """Raised between training steps when the device's conditions stop holding."""


def parse_window(text: str) -> tuple[dt.time, dt.time]:
    """'22:00-06:00' -> (22:00, 06:00); a window may cross midnight."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if not match:
        raise FedllmError(f"--train-window {text!r}: expected HH:MM-HH:MM in local time, e.g. 22:00-06:00")
    h1, m1, h2, m2 = map(int, match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59 or (h1, m1) == (h2, m2):
        raise FedllmError(f"--train-window {text!r}: hours 0-23, minutes 0-59, and start != end")
    return dt.time(h1, m1), dt.time(h2, m2)


def in_window(window: tuple[dt.time, dt.time], now: dt.datetime) -> bool:
    start, end = window
    t = now.time()
    return start <= t < end if start < end else (t >= start or t < end)


def on_ac_power() -> bool | None:
    """True on mains power, False on battery, None where the OS does not say."""
    root = Path(os.environ.get(POWER_SUPPLY_ENV, "/sys/class/power_supply"))
    if root.is_dir():
        supplies = [p for p in root.iterdir() if (p / "type").exists()]
        mains = [p for p in supplies if _read(p / "type") in ("Mains", "USB", "USB_C", "USB_PD")]
        if any(_read(p / "online") == "1" for p in mains):
            return True
        batteries = [p for p in supplies if _read(p / "type") == "Battery"]
        return False if mains or batteries else None  # a supply is reported and none is online mains
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["pmset", "-g", "batt"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        return True if "AC Power" in out else False if "Battery Power" in out else None
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def check_node_schedule(node: Mapping[str, Any]) -> None:
    """At daemon start: bad values, or a condition this OS cannot check, named now."""
    if node.get(NODE_WINDOW):
        parse_window(str(node[NODE_WINDOW]))
    for key in (NODE_MAX_THREADS, NODE_MAX_PER_DAY):
        value = node.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FedllmError(f"--{key} {value!r}: expected an integer >= 1 (0: no limit)")
    if node.get(NODE_AC_POWER) and on_ac_power() is None:
        raise FedllmError("--require-ac-power: this system does not report whether it runs on mains power "
                          "(Linux: nothing under /sys/class/power_supply; macOS: pmset says neither); on a machine "
                          "without a battery, drop the flag")


def participations_path(state_root: Path, client_id: str) -> Path:
    from fedllm.state import StateStore

    return StateStore(state_root, client_id).dir / "participations.json"


def _participations(path: Path) -> list[str]:
    try:
        value = json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FedllmError(f"{path} is unreadable; move it aside (the participation cap then restarts for today)")
    return value


def participations_today(path: Path, now: dt.datetime | None = None) -> int:
    today = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).date().isoformat()
    return sum(1 for stamp in _participations(path) if stamp.startswith(today))


def record_participation(path: Path, now: dt.datetime | None = None) -> None:
    """One more training participation (kept for a week: the cap needs today's)."""
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    week_ago = (now - dt.timedelta(days=7)).isoformat()
    kept = [s for s in _participations(path) if s >= week_ago]
    atomic.write_json(path, [*kept, now.isoformat()])


def conditions(node: Mapping[str, Any], now: dt.datetime | None = None) -> str:
    """Why the device's time and power conditions do not hold now ("" when they do)."""
    if node.get(NODE_WINDOW):
        local_now = now.astimezone() if now is not None else dt.datetime.now().astimezone()
        if not in_window(parse_window(str(node[NODE_WINDOW])), local_now):
            return f"{UNAVAILABLE}: outside its train window {node[NODE_WINDOW]} (local time {local_now:%H:%M})"
    if node.get(NODE_AC_POWER) and on_ac_power() is not True:
        return f"{UNAVAILABLE}: on battery (it trains on mains power only)"
    return ""


def availability(node: Mapping[str, Any], state_root: Path | None, client_id: str,
                 now: dt.datetime | None = None) -> str:
    """Why this device does not train now ("" when it does): its conditions, and its cap."""
    why = conditions(node, now)
    if why or not node.get(NODE_MAX_PER_DAY) or state_root is None:
        return why
    cap = int(node[NODE_MAX_PER_DAY])
    if participations_today(participations_path(state_root, client_id), now) >= cap:
        return f"{UNAVAILABLE}: it trained {cap} times today (UTC), its cap (--max-participations-per-day)"
    return ""


def still_available(node: Mapping[str, Any]) -> Callable[[], str] | None:
    """The check training runs after every step; None when the device set no condition."""
    if not (node.get(NODE_WINDOW) or node.get(NODE_AC_POWER)):
        return None
    return lambda: conditions(node)


def limit_threads(node: Mapping[str, Any]) -> None:
    if node.get(NODE_MAX_THREADS):
        import torch

        torch.set_num_threads(int(node[NODE_MAX_THREADS]))
